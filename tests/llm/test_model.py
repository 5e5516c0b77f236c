"""The static-KV-cache decoder against transformers: full sequence, incremental decode, greedy generation,
torch.compile tracing and torch.export of the prefill / decode steps. Tiny random models, fp32, no downloads."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch

from llmasos.llm.export import export_decoder
from llmasos.llm.model import Decoder, DecoderConfig
from llmasos.llm.presets import decoder_config
from tests.models import gpt2, llama

TOL = 1e-4
MAX_SEQ = 48

_HF_BUILDERS = {
    "llama-gqa": lambda: llama(seed=1, rope_theta=100000.0),           # 4 heads over 2 kv heads, untied
    "llama-tied": lambda: llama(seed=2, num_key_value_heads=1, tie_word_embeddings=True),
    "gpt2": lambda: gpt2(seed=3),
}


@functools.cache
def hf_model(name: str):
    # built once per session: nothing below mutates an HF model (generate only reads it)
    return _HF_BUILDERS[name]()


@pytest.fixture(scope="module", params=sorted(_HF_BUILDERS))
def hf(request):
    return hf_model(request.param)


def make(hf_model, mode: str, batch: int):
    """(decoder, step) where step(ids, pos, last) -> logits and carries the caches between calls."""
    d = Decoder.from_hf(hf_model, mode=mode)
    if mode == "torch":
        d.setup_caches(batch, MAX_SEQ)
        return d, lambda ids, pos, last: d(ids, pos, last)
    caches = d.new_caches(batch, MAX_SEQ)

    def step(ids, pos, last):
        logits, *new = d(ids, pos, last, *caches)
        caches[:] = new
        return logits
    return d, step


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def i64(*v):
    return torch.tensor(v, dtype=torch.int64)


@pytest.mark.parametrize("mode", ["export", "torch"])
def test_full_sequence_matches_hf(hf, mode):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits
    _, step = make(hf, mode, batch=2)
    with torch.no_grad():
        got = step(ids, i32(0, 0), i64(8, 3))
    torch.testing.assert_close(got, torch.stack([ref[0, 8], ref[1, 3]]), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mode", ["export", "torch"])
def test_prefill_then_decode_matches_full_recompute(hf, mode):
    # two rows, prompts of 6 and 3 tokens right-padded to 6, then 5 decode steps each at its own position
    g = torch.Generator().manual_seed(1)
    full = [torch.randint(0, 128, (11,), generator=g), torch.randint(0, 128, (8,), generator=g)]
    lens = [6, 3]
    ref = [hf(seq[None]).logits[0] for seq in full]                  # causal: position t = recompute at t
    _, step = make(hf, mode, batch=2)
    prompt = torch.zeros(2, 6, dtype=torch.int64)
    prompt[0], prompt[1, :3] = full[0][:6], full[1][:3]
    prompt[1, 3:] = 7                                                 # padding the mask must hide later
    with torch.no_grad():
        got = step(prompt, i32(0, 0), i64(5, 2))
        torch.testing.assert_close(got, torch.stack([ref[0][5], ref[1][2]]), atol=TOL, rtol=TOL)
        for s in range(5):
            p = [n + s for n in lens]
            got = step(torch.stack([full[0][p[0]], full[1][p[1]]])[:, None], i32(*p), i64(0, 0))
            want = torch.stack([ref[0][p[0]], ref[1][p[1]]])
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m: f"decode step {s}: {m}")


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_greedy_32_tokens_equal_hf_generate(name):
    hf = hf_model(name)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.eos_token_id = None                     # a random model may emit EOS: compare all 32 tokens
    gen_cfg.pad_token_id = 0
    gen_cfg.max_new_tokens, gen_cfg.do_sample, gen_cfg.use_cache = 32, False, True
    want = hf.generate(prompt, generation_config=gen_cfg)[0, 5:].tolist()
    assert len(want) == 32
    for mode in ("export", "torch"):
        _, step = make(hf, mode, batch=1)
        out = []
        with torch.no_grad():
            logits = step(prompt, i32(0), i64(4))
            for t in range(32):
                tok = int(logits.argmax(-1))
                out.append(tok)
                logits = step(i64(tok)[None], i32(5 + t), i64(0))
        assert out == want, f"mode={mode}"


def test_torch_mode_compiles_fullgraph_for_decode():
    # aot_eager: dynamo must trace the decode step without a graph break (in-place cache writes included)
    # and functionalise it, without paying for inductor's C++ build on the CI machine
    d, _ = make(hf_model("llama-gqa"), "torch", batch=2)
    ref, _ = make(hf_model("llama-gqa"), "torch", batch=2)
    fn = torch.compile(d, backend="aot_eager", fullgraph=True)
    prompt = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d(prompt, i32(0, 0), i64(3, 3))
        ref(prompt, i32(0, 0), i64(3, 3))
        for t in range(3):
            ids = torch.full((2, 1), t + 1, dtype=torch.int64)
            got = fn(ids, i32(4 + t, 4 + t), i64(0, 0))
            want = ref(ids, i32(4 + t, 4 + t), i64(0, 0))
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(d.blocks[1].attn.k_cache, ref.blocks[1].attn.k_cache)



@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_copy_as_keeps_the_weights_in_another_mode(name):
    """bench draws the torch-mode model once on the GPU and compiles an export-mode copy of it."""
    to = Decoder.random(decoder_config(name), mode="torch", seed=3, dtype=torch.float16)
    ex = to.copy_as("export", "cpu")
    assert ex.mode == "export" and ex.dtype == torch.float16
    a, b = to.state_dict(), ex.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ex.lm_head.weight is ex.embed.weight) == decoder_config(name).tie_embeddings
    ex.embed.weight.data.zero_()  # a copy: the original is untouched
    assert float(to.embed.weight.abs().sum()) > 0
    to.setup_caches(1, 16)
    ids = torch.randint(0, decoder_config(name).vocab, (1, 5), generator=torch.Generator().manual_seed(4))
    ex2 = to.copy_as("export")
    with torch.no_grad():
        torch.testing.assert_close(ex2.float()(ids, i32(0), i64(4), *ex2.float().new_caches(1, 16))[0],
                                   to.float()(ids, i32(0), i64(4)), atol=TOL, rtol=TOL)

@pytest.mark.slow
def test_torch_mode_reduce_overhead_compile():
    d, _ = make(hf_model("llama-gqa"), "torch", batch=1)
    ref, _ = make(hf_model("llama-gqa"), "torch", batch=1)
    fn = torch.compile(d, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for t in range(3):
            ids = torch.full((1, 1), t + 1, dtype=torch.int64)
            torch.testing.assert_close(fn(ids, i32(t), i64(0)), ref(ids, i32(t), i64(0)), atol=TOL, rtol=TOL)


@pytest.fixture(scope="module")
def exported():
    d = Decoder.from_hf(hf_model("llama-gqa"))
    return d, {ph: export_decoder(d, ph, batch=None, max_batch=4, max_seq=MAX_SEQ) for ph in ("prefill", "decode")}


def _kv_ops_exist() -> bool:
    from llmasos.ir.ops import OpError, get_op
    try:
        get_op("kv.append")
        get_op("kv.attention")
    except OpError:
        return False
    return True


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_export_keeps_one_kv_node_per_cache_and_layer(exported, phase):
    d, eps = exported
    ep = eps[phase]
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("llmasos.kv_append.default") == 2 * d.cfg.layers       # k and v
    assert targets.count("llmasos.kv_attention.default") == d.cfg.layers
    shapes = {n.name: n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder"}
    batch = shapes["ids"][0]
    assert isinstance(batch, torch.SymInt)
    assert all(shapes[f"caches_{i}"][0] == batch for i in range(2 * d.cfg.layers))   # one batch symbol
    assert isinstance(shapes["ids"][1], torch.SymInt) == (phase == "prefill")
    # the exported program runs at a batch and length other than the example's
    B, T = 3, (5 if phase == "prefill" else 1)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(4))
    pos = i32(0, 0, 0) if phase == "prefill" else i32(2, 7, 4)
    args = (ids, pos, torch.full((B,), T - 1), *d.new_caches(B, MAX_SEQ))
    for a, b in zip(ep.module()(*args), d(*args)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not _kv_ops_exist(), reason="IR ops kv.append / kv.attention are not registered yet "
                                                 "(another engineer adds them with their converters)")
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_export_imports_and_interprets_like_torch(exported, phase):
    from llmasos.frontends.torch_export import import_exported_program
    from llmasos.ir.interpreter import run
    d, eps = exported
    imp = import_exported_program(eps[phase])
    B, T = 2, (4 if phase == "prefill" else 1)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(5))
    pos = i32(0, 0) if phase == "prefill" else i32(3, 9)
    caches = [torch.randn(s, generator=torch.Generator().manual_seed(6)) for s in d.cache_shapes(B, MAX_SEQ)]
    args = (ids, pos, torch.full((B,), T - 1), *caches)
    with torch.no_grad():
        want = d(*args)
    got = run(imp.graph, [a.numpy() for a in args])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=TOL, rtol=TOL)


def test_from_hf_config_and_errors():
    import transformers
    cfg = DecoderConfig.from_hf(hf_model("llama-tied").config)
    assert (cfg.arch, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.tie_embeddings) == ("llama", 4, 1, 16, True)
    assert DecoderConfig.from_hf(transformers.GPT2Config()) == decoder_config("gpt2-124m")
    smol = transformers.LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                    max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                                    rms_norm_eps=1e-5)
    assert DecoderConfig.from_hf(smol) == decoder_config("llama-135m")
    scaled = transformers.LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match="rope type 'llama3' is not implemented"):
        DecoderConfig.from_hf(scaled)
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        DecoderConfig.from_hf(transformers.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        DecoderConfig.from_hf(transformers.BertConfig())
    d = Decoder.random(decoder_config("llama-tiny"), mode="torch")
    with pytest.raises(RuntimeError, match="call setup_caches"):
        d(i64(1, 2)[None], i32(0), i64(1))
    with pytest.raises(TypeError, match="takes 4 caches"):
        Decoder.random(decoder_config("llama-tiny"))(i64(1, 2)[None], i32(0), i64(1))


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_random_init_export_and_torch_modes_agree(name):
    cfg = decoder_config(name)
    ex = Decoder.random(cfg, mode="export", seed=7)
    to = Decoder.random(cfg, mode="torch", seed=7)
    w = dict(ex.named_parameters())["blocks.0.attn.wqkv.weight"]
    assert 0.015 < float(w.detach().std()) < 0.025
    if cfg.tie_embeddings:
        assert ex.lm_head.weight is ex.embed.weight
    to.setup_caches(1, 16)
    ids = torch.randint(0, cfg.vocab, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a = ex(ids, i32(0), i64(5), *ex.new_caches(1, 16))[0]
        b = to(ids, i32(0), i64(5))
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_smollm2_decode_equals_hf_full_recompute():
    from llmasos.zoo import load_smollm2
    hf, tok = load_smollm2(verbose=False)
    assert DecoderConfig.from_hf(hf.config).rope_theta == 100000.0
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    n = ids.shape[1]
    for mode in ("export", "torch"):
        _, step = make(hf, mode, batch=1)
        out, logits = [], []
        with torch.no_grad():
            lg = step(ids, i32(0), i64(n - 1))
            for t in range(16):
                logits.append(lg[0])
                out.append(int(lg.argmax(-1)))
                lg = step(i64(out[-1])[None], i32(n + t), i64(0))
            ref = hf(torch.cat([ids[0], torch.tensor(out)])[None]).logits[0, n - 1:n + 15]
        # logits of SmolLM2 reach ~30: 1e-3 absolute is float32 reduction-order noise over 30 layers
        torch.testing.assert_close(torch.stack(logits), ref, atol=1e-3, rtol=1e-4, msg=lambda m: f"{mode}: {m}")
        assert out == ref.argmax(-1).tolist()


def test_export_decoder_rejects_bad_arguments():
    d = Decoder.random(decoder_config("llama-tiny"))
    for args, msg in [(("prefill", None, 1, 65), "max_seq 65 > the model's max_positions 64"),
                      (("bogus", None, 1, 8), "phase must be one of ('prefill', 'decode', 'ragged'), got 'bogus'"),
                      (("decode", 5, 4, 8), "batch 5 is outside 1..max_batch=4"),
                      (("prefill", None, 2, 1), "prefill needs max_seq >= 2"),
                      (("ragged", None, 2, 8), "the ragged step is paged only (give block_size)")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            export_decoder(d, *args)
    with pytest.raises(ValueError, match="needs Decoder\\(mode='export'\\), got mode='torch'"):
        export_decoder(Decoder.random(decoder_config("llama-tiny"), mode="torch"), "decode", None, 2, 8)
