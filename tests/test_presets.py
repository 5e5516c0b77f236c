"""One preset table (llmasos/llm/presets.py): every name once, the same names for both front doors, the CLI and
the benchmarks."""
import re
from pathlib import Path

import pytest

from llmasos.llm import presets

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = {"gpt2-tiny", "gpt2-small", "llama-tiny", "llama-135m", "bert-tiny",     # llmasos.zoo's
             "gpt2-124m", "llama-1b"}                                                 # llmasos.llm.model's


def test_every_preset_name_is_defined_once():
    every = [n for p in presets.PRESETS for n in (p.name, *p.aliases)]
    assert len(every) == len(set(every)) == len(presets.names())
    with pytest.raises(ValueError, match=r"preset name 'x' is defined twice \(x and y\)"):
        presets._index([presets.Preset("x", "llama"), presets.Preset("y", "llama", aliases=("x",))])


def test_the_old_names_still_work_for_their_front_doors():
    assert OLD_NAMES <= set(presets.names())
    assert set(presets.names(decoders_only=True)) == set(presets.names()) - {"bert-tiny"}
    with pytest.raises(ValueError, match=r"preset 'bert-tiny' \(bert\) is not a decoder-only causal LM"):
        presets.decoder_config("bert-tiny")
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt3'; known: bert-tiny, gemma-tiny, gpt2-124m"):
        presets.get("gpt3")
    assert presets.get("gpt2-small") is presets.get("gpt2-124m")


def test_both_front_doors_see_the_same_model():
    """The Decoder config of a preset is the adapter's mapping of the very config its transformers model has."""
    from llmasos.llm.config import DecoderConfig
    for name in ("gpt2-tiny", "llama-tiny", "qwen2-tiny"):
        assert presets.decoder_config(name) == DecoderConfig.from_hf(presets.hf_model(name).config)
    smol = presets.decoder_config("llama-135m")
    assert (smol.norm_eps, smol.rope_theta, smol.tie_embeddings, smol.kv_heads) == (1e-5, 100000.0, True, 3)


def test_cli_and_bench_defaults_name_presets():
    text = (ROOT / "llmasos" / "cli.py").read_text() + (ROOT / "bench" / "decode.py").read_text()
    for models in re.findall(r'"--models", default="([^"]+)"', text):
        assert set(models.split(",")) <= set(presets.names(decoders_only=True))
