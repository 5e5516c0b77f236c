"""Issue 13: compile_lm(max_batch=2) failed ("do not broadcast at dim 0: batch vs batch_1"): torch.export gives
inputs sharing a Dim of range [1, 2] one symbol each; the frontend now merges the symbols of one Dim."""
import pytest

import llmasos
from llmasos.frontends import torch_export
from llmasos.llm.export import export_decoder
from llmasos.llm.model import Decoder
from llmasos.llm.presets import decoder_config, hf_model


@pytest.fixture(scope="module")
def llama_dec():
    return Decoder.random(decoder_config("llama-tiny"))


@pytest.mark.parametrize("max_batch", [1, 2, 3, 8] + [pytest.param(b, marks=pytest.mark.slow) for b in (4, 5, 6, 7)])
def test_every_max_batch_exports_and_imports_with_one_batch_symbol(llama_dec, max_batch):
    for phase in ("prefill", "decode") if max_batch == 2 else ("decode",):
        g = torch_export.import_exported_program(export_decoder(llama_dec, phase, None, max_batch, 16),
                                                 name=phase).graph
        if max_batch == 1:
            assert "batch" not in g.symbols
        else:
            assert [n for n in g.symbols if n.startswith("batch")] == ["batch"]
            assert g.symbols["batch"] == (1, max_batch)


def test_gpt2_max_batch_2_imports():
    dec = Decoder.random(decoder_config("gpt2-tiny"))
    g = torch_export.import_exported_program(export_decoder(dec, "decode", None, 2, 16), name="decode").graph
    assert [n for n in g.symbols if n.startswith("batch")] == ["batch"]


def test_compile_lm_max_batch_2_generates_like_one_by_one():
    lm = llmasos.compile_lm(hf_model("llama-tiny", seed=3), "cpu", max_seq=32, max_batch=2)
    prompts = [[5, 7, 9], [1, 2, 3, 4, 5, 6]]
    assert lm.generate(prompts, 6) == [lm.generate(p, 6) for p in prompts]
