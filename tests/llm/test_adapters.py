"""Model-family adapters (llmasos/llm/adapters/): the registry, each family's config and weight maps, and the
families added as one file each -- Qwen2 (q/k/v biases) and Mistral (sliding window) -- against transformers'
greedy tokens on tiny random configs."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import llmasos
from llmasos.llm.adapter import Adapter, adapter_for, register_adapter, registered
from llmasos.llm.adapters.llama import llama_config, llama_weights
from llmasos.llm.model import Decoder, DecoderConfig
from llmasos.llm.presets import decoder_config, hf_config, hf_model

N_NEW = 24


@functools.cache
def hf(name: str):
    m = hf_model(name, seed=3, eos_token_id=None)  # a random model may emit EOS: compare every token
    with torch.no_grad():  # transformers initialises biases to zero: make Qwen2's q/k/v biases matter
        for n, p in m.named_parameters():
            if n.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
    return m


def _prompt():
    return torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))


@functools.cache
def hf_greedy(name: str) -> list:
    m = hf(name)
    cfg = copy.deepcopy(m.generation_config)
    cfg.eos_token_id, cfg.pad_token_id = None, 0
    cfg.max_new_tokens, cfg.do_sample, cfg.use_cache = N_NEW, False, True
    return m.generate(_prompt(), generation_config=cfg)[0, 5:].tolist()


def test_registry_lists_the_families_and_refuses_unknown_ones():
    assert {"llama", "gpt2", "qwen2", "mistral"} <= set(registered())
    import transformers
    with pytest.raises(ValueError, match=r"DecoderConfig.from_hf: model_type 'bert' is not supported; registered "
                                         r"model types: gemma, gpt2, llama, mistral, phi3, qwen2"):
        DecoderConfig.from_hf(transformers.BertConfig())
    with pytest.raises(ValueError, match=r"Decoder.from_hf: model_type 'bert' is not supported"):
        Decoder.from_hf(hf_model("bert-tiny"))
    with pytest.raises(ValueError, match=r"model_type 'llama' already has the adapter 'llama'"):
        register_adapter(Adapter("other", ("llama",), llama_config, llama_weights))
    with pytest.raises(ValueError, match=r"attention_bias / mlp_bias are not supported"):
        DecoderConfig.from_hf(transformers.LlamaConfig(attention_bias=True))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "mistral-tiny", "llama-135m"])
def test_each_weight_map_covers_the_decoder_exactly(name):
    cfg = decoder_config(name)
    adapter = adapter_for(hf_config(name))
    with torch.device("meta"):
        ours = set(Decoder(cfg).state_dict())
    mapped = set(adapter.weights(cfg))
    assert ours - mapped <= ({"lm_head.weight"} if cfg.tie_embeddings else set()) and mapped <= ours


def test_family_configs():
    q = decoder_config("qwen2-tiny")
    assert q.arch == "llama" and q.qkv_bias and q.max_positions == 64
    assert decoder_config("mistral-tiny").max_positions == 32          # capped at the sliding window
    assert decoder_config("mistral-tiny", sliding_window=None).max_positions == 64
    # Qwen2 slides only in layers from max_window_layers on (transformers' layer_types)
    assert decoder_config("qwen2-tiny", use_sliding_window=True, sliding_window=16).max_positions == 64
    assert decoder_config("qwen2-tiny", use_sliding_window=True, sliding_window=16,
                          max_window_layers=1).max_positions == 16
    assert not decoder_config("llama-tiny").qkv_bias


@pytest.mark.parametrize("name", ["qwen2-tiny", "mistral-tiny"])
@pytest.mark.parametrize("mode", ["export", "torch"])
def test_new_families_decode_the_greedy_tokens_of_transformers(name, mode):
    d = Decoder.from_hf(hf(name), mode=mode)
    if name == "qwen2-tiny":
        assert float(d.blocks[0].attn.wqkv.bias.detach().abs().max()) > 0 and d.blocks[0].attn.wo.bias is None
    max_seq = d.cfg.max_positions
    caches = None
    if mode == "torch":
        d.setup_caches(1, max_seq)
    else:
        caches = d.new_caches(1, max_seq)

    def step(ids, pos, last):
        if caches is None:
            return d(ids, torch.tensor([pos], dtype=torch.int32), torch.tensor([last]))
        logits, *new = d(ids, torch.tensor([pos], dtype=torch.int32), torch.tensor([last]), *caches)
        caches[:] = new
        return logits

    out = []
    with torch.no_grad():
        logits = step(_prompt(), 0, 4)
        for t in range(N_NEW):
            out.append(int(logits.argmax(-1)))
            logits = step(torch.tensor([[out[-1]]]), 5 + t, 0)
    assert out == hf_greedy(name)


def test_qwen2_compiles_to_the_greedy_tokens_of_transformers():
    lm = llmasos.compile_lm(hf("qwen2-tiny"), "cpu", max_seq=32, batch=1)
    assert lm.generate(_prompt()[0].tolist(), N_NEW) == hf_greedy("qwen2-tiny")


def test_mistral_sequences_past_the_window_are_refused():
    with pytest.raises(ValueError, match=r"max_seq=48 exceeds the model's 32 positions"):
        llmasos.compile_lm(hf("mistral-tiny"), "cpu", max_seq=48)


def test_a_single_kv_head_llama_compiles_to_the_greedy_tokens_of_transformers():
    """MQA (num_key_value_heads=1): its one-head KV append once failed DLight's GEMV rule at build time."""
    m = hf_model("llama-tiny", seed=3, eos_token_id=None, num_key_value_heads=1)
    cfg = copy.deepcopy(m.generation_config)
    cfg.eos_token_id, cfg.pad_token_id = None, 0
    cfg.max_new_tokens, cfg.do_sample, cfg.use_cache = N_NEW, False, True
    want = m.generate(_prompt(), generation_config=cfg)[0, 5:].tolist()
    lm = llmasos.compile_lm(m, "cpu", max_seq=32, batch=1)
    assert lm.generate(_prompt()[0].tolist(), N_NEW) == want
