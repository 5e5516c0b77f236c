"""Issue 13: compile_lm for the families people deploy, one adapter file each (llmasos/llm/adapters/): Phi-3
(fused qkv and gate|up projections) and Gemma (GeGLU, sqrt(hidden) embedding scale, 1 + weight RMSNorm),
next to Qwen2 and Mistral (tests/llm/test_adapters.py): 32 greedy tokens equal transformers' on small random
configs. Before, both were refused ("model_type 'phi3' is not supported")."""
import copy

import pytest
import torch

import llmasos
from llmasos.llm.adapter import registered
from llmasos.llm.presets import decoder_config, hf_model

N_NEW = 32


def _hf(name: str):
    m = hf_model(name, seed=3, eos_token_id=None)
    with torch.no_grad():   # random norm weights: Gemma's 1 + weight offset must matter
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return m


def _greedy(m, prompt) -> list:
    cfg = copy.deepcopy(m.generation_config)
    cfg.eos_token_id, cfg.pad_token_id = None, 0
    cfg.max_new_tokens, cfg.do_sample, cfg.use_cache = N_NEW, False, True
    return m.generate(prompt, generation_config=cfg)[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["phi3-tiny", "gemma-tiny"])
def test_greedy_tokens_equal_transformers(name):
    m = _hf(name)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    lm = llmasos.compile_lm(m, "cpu", max_seq=40, batch=1)
    assert lm.generate(prompt[0].tolist(), N_NEW) == _greedy(m, prompt)


def test_family_configs_map_their_options():
    assert {"phi3", "gemma"} <= set(registered())
    g = decoder_config("gemma-tiny")
    assert (g.mlp_act, g.embed_scale, g.tie_embeddings) == ("gelu_tanh", 8.0, True)
    p = decoder_config("phi3-tiny")
    assert (p.mlp_act, p.embed_scale, p.tie_embeddings) == ("silu", 1.0, False)
    with pytest.raises(ValueError, match=r"gemma hidden_act 'gelu' is not supported \(gelu_pytorch_tanh"):
        decoder_config("gemma-tiny", hidden_activation="gelu")
    with pytest.raises(ValueError, match=r"phi3 partial_rotary_factor 0.5 is not supported"):
        decoder_config("phi3-tiny", partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match=r"model_type 'gemma2' is not supported"):
        import transformers
        llmasos.llm.config.DecoderConfig.from_hf(transformers.Gemma2Config())
