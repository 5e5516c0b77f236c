"""The engine and server over a real paged runner (llmasos.llm.TorchPagedRunner: the paged Decoder with the
kv_paged_* ops) on a small random Llama with SmolLM2's vocabulary, checked token for token against
transformers' model recomputing the whole sequence for every token (no cache, no batching). The compiled
SmolLM2-135M (TVM, CPU) behind the HTTP server is the slow test at the end."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmasos.llm import TorchPagedRunner  # noqa: E402
from llmasos.serve import Engine, SamplingParams  # noqa: E402
from llmasos.serve.server import Server  # noqa: E402

VOCAB = 49152


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.config.use_cache = False
    return m


def hf_greedy(model, ids, n, stop=()):
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t in stop:
                break
    return out


def prompts_with_shared_stems(tok):
    stems = ["You are a helpful assistant. Answer briefly and precisely, with one example. ",
             "Translate the following English sentence into French, keeping the tone: "]
    tails = ["What is a cache?", "Why is the sky blue?", "Name three rivers.", "I like green tea.",
             "The train leaves at noon.", "2 + 2 =", "Tell me a joke about compilers."]
    return [tok(stems[i % 2] + t, add_special_tokens=False)["input_ids"] for i, t in enumerate(tails)]


def test_busy_batch_with_preemption_and_prefix_sharing_equals_alone(tiny_llama, smol_tokenizer):
    ps = prompts_with_shared_stems(smol_tokenizer)[:5]
    n = [8 + 4 * (i % 2) for i in range(len(ps))]
    want = [hf_greedy(tiny_llama, p, k) for p, k in zip(ps, n)]
    # 5 requests of ~20 prompt tokens + 8..12 new, blocks of 8: 7 blocks cannot hold 2 of them at full length
    runner = TorchPagedRunner(tiny_llama, 7, 8, max_seq=128, max_batch=4)
    eng = Engine(runner, max_batch=4, prefill_chunk=16, prefill_budget=24, prefix_sharing=False)
    got = eng.generate(ps, [SamplingParams(max_tokens=k, ignore_eos=True) for k in n])
    assert got == want
    assert eng.scheduler.num_preemptions > 0
    eng.blocks.check()
    assert eng.blocks.num_used == 0
    # a roomy pool: no preemption; the second pass reuses every full prompt block of the first (prefix cache)
    eng = Engine(TorchPagedRunner(tiny_llama, 64, 8, max_seq=128, max_batch=8), max_batch=8, prefill_chunk=16)
    assert eng.generate(ps, [SamplingParams(max_tokens=k, ignore_eos=True) for k in n]) == want
    hits = eng.blocks.hits
    copies = []
    eng.runner.copy_blocks = (lambda f: lambda pairs: (copies.extend(pairs), f(pairs)))(eng.runner.copy_blocks)
    assert eng.generate([ps[0], ps[0]], SamplingParams(max_tokens=6, ignore_eos=True)) == [want[0][:6]] * 2
    assert eng.blocks.hits - hits >= 2 * (len(ps[0]) // 8) and eng.scheduler.num_preemptions == 0


def test_openai_client_against_real_model(tiny_llama, smol_tokenizer):
    openai = pytest.importorskip("openai")
    tok = smol_tokenizer
    runner = TorchPagedRunner(tiny_llama, 64, 16, max_seq=128, max_batch=8)
    with Server(Engine(runner, tok), model_name="tiny", port=0).start() as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        want = hf_greedy(tiny_llama, ids, 12, stop=(tok.eos_token_id,))
        text = tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == text and r.usage.completion_tokens == len(want)
        chunks = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
        p = "The quick brown fox"
        pid = tok(p, add_special_tokens=False)["input_ids"]
        want = hf_greedy(tiny_llama, pid, 8, stop=(tok.eos_token_id,))
        r = c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
        assert r.choices[0].text == tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)


@pytest.mark.slow
def test_compiled_smollm2_served_equals_generate():
    """SmolLM2-135M compiled twice for the CPU: kv='paged' behind the server, and the contiguous cache's
    CompiledLM.generate; the chat answers through the openai client equal generate's tokens."""
    openai = pytest.importorskip("openai")
    from llmasos.serve.load import load_engine
    import llmasos
    from llmasos.zoo import load_smollm2
    engine, name = load_engine("smollm2", target="cpu", max_batch=4, max_seq=256)
    model, tok = load_smollm2(verbose=False)
    lm = llmasos.compile_lm(model, "cpu", max_seq=256, max_batch=4, tokenizer=tok)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    with Server(engine, model_name=name, port=0).start() as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(3) as ex:
            rs = list(ex.map(lambda q: c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0), questions))
    for q, r in zip(questions, rs):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        want = lm.generate(ids, 24, stop=[tok.eos_token_id])
        assert r.choices[0].message.content == tok.decode([t for t in want if t != tok.eos_token_id],
                                                          skip_special_tokens=True)
