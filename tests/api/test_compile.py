"""llmasos.compile end to end: torch model -> IR -> TVM (CPU) matches PyTorch at many sizes from one compile."""
import numpy as np
import pytest
import torch

import llmasos
from tests import models

SIZES = [(1, 5), (2, 8), (3, 17)]


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _close(got, ref):
    got, ref = got.detach().float(), ref.detach().float()
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= 1e-4 * scale, f"max abs err {err} > 1e-4 * {scale}"


@pytest.fixture(scope="session")
def compiled_zoo():
    """Each model compiled once for the CPU; every test shares them."""
    out = {}
    for name, build in [("gpt2", models.gpt2), ("llama", models.llama), ("bert", models.bert)]:
        m = build()
        out[name] = (m, llmasos.compile(m, target="cpu", example_inputs=(models.token_ids(2, 8),), max_batch=8))
    return out


def test_mlp_dynamic_batch():
    m = models.mlp()
    cm = llmasos.compile(m, target="cpu", example_inputs=(torch.randn(4, 16),))
    for b in (1, 4, 9):
        x = torch.randn(b, 16)
        _close(cm(x), m(x))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("batch,seq", SIZES)
def test_transformers_match_torch(compiled_zoo, name, batch, seq):
    m, cm = compiled_zoo[name]
    ids = models.token_ids(batch, seq)
    with torch.no_grad():
        ref = m(ids)
    got = cm(ids)
    assert type(got) is type(ref)  # same output structure as the model
    _close(_logits(got), _logits(ref))
    if name == "bert":
        _close(got.pooler_output, ref.pooler_output)


def test_ir_text_and_symbols(compiled_zoo):
    _, cm = compiled_zoo["llama"]
    text = cm.ir
    assert text.startswith("graph @") or "\ngraph @" in text
    assert "sdpa(" in text
    assert "rms_norm(" in text or "rsqrt(" in text
    assert cm.graph.inputs[0].type.symbols() == {"batch", "seq"}
    assert cm.graph.symbols["batch"] == (1, 8)


def test_save_load_roundtrip(compiled_zoo, tmp_path):
    m, cm = compiled_zoo["gpt2"]
    path = tmp_path / "gpt2.llmasos"
    cm.save(path)
    cm2 = llmasos.load(path)
    for batch, seq in [(1, 4), (2, 11)]:
        ids = models.token_ids(batch, seq, seed=3)
        a, b = _logits(cm(ids)), _logits(cm2(ids))
        assert torch.equal(a, b)
    assert type(cm2(ids)) is type(cm(ids))


def test_wrong_inputs_are_clear(compiled_zoo):
    _, cm = compiled_zoo["gpt2"]
    with pytest.raises(llmasos.InputError, match=r"expected dtype i64, got torch.int32"):
        cm(models.token_ids(1, 4).to(torch.int32))
    with pytest.raises(llmasos.InputError, match=r"input %input_ids: expected rank 2 .*got shape \[4\]; this model "
                                                 r"was compiled for \(%input_ids: i64\[batch, seq\]\) with batch in "
                                                 r"\[1, 8\], seq in \[2, 64\]"):
        cm(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(llmasos.InputError, match=r"'batch' = 9 is outside its declared range \[1, 8\]"):
        cm(models.token_ids(9, 4))
    with pytest.raises(llmasos.InputError, match=r"'seq' = 65 is outside its declared range \[2, 64\]"):
        cm(models.token_ids(1, 65))
    with pytest.raises(llmasos.InputError, match=r"token ids must be in \[0, 128\), got values in \[0, 128\]"):
        cm(torch.tensor([[0, 5, 128]]))
    with pytest.raises(llmasos.InputError, match=r"token ids must be in \[0, 128\), got values in \[-1, 5\]"):
        cm(torch.tensor([[-1, 5, 3]]))
    with pytest.raises(llmasos.InputError, match=r"takes 1 tensor input"):
        cm(models.token_ids(1, 4), models.token_ids(1, 4))


def test_unknown_target_lists_known():
    with pytest.raises(ValueError, match=r"unknown target 'tpu'.*cpu.*cuda"):
        llmasos.compile(models.mlp(), target="tpu", example_inputs=(torch.randn(2, 16),))


def test_corrupted_and_truncated_artifacts(compiled_zoo, tmp_path):
    _, cm = compiled_zoo["llama"]
    path = tmp_path / "llama.llmasos"
    cm.save(path)
    w = path / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(llmasos.ArtifactError, match=r"weights.safetensors: truncated"):
        llmasos.load(path)
    w.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(llmasos.ArtifactError, match=r"weights.safetensors: corrupted"):
        llmasos.load(path)
    w.write_bytes(data)
    (path / "module.so").unlink()
    with pytest.raises(llmasos.ArtifactError, match=r"module.so is missing"):
        llmasos.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(llmasos.ArtifactError, match=r"corrupted manifest"):
        llmasos.load(path)
    with pytest.raises(llmasos.ArtifactError, match=r"not an LLMasOS artifact"):
        llmasos.load(tmp_path / "nothing-here")


def test_compile_rejects_non_models():
    with pytest.raises(llmasos.CompileError, match=r"takes a torch.nn.Module or torch.export.ExportedProgram"):
        llmasos.compile(lambda x: x, example_inputs=(torch.zeros(1),))


def test_calibration_is_checked_against_the_imported_graph_before_any_pass():
    from llmasos.passes.calibration import CalibrationError
    model = models.llama()
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(CalibrationError, match=r"calibration batch 0: input %input_ids must have dtype i64, got float32"):
        llmasos.compile(model, "cpu", (ids,), passes="quantize{method=gptq}",
                        calibration=[np.zeros((1, 8), np.float32)])
    with pytest.raises(CalibrationError, match=r"token ids in \[0, 500\], outside the vocabulary \[0, 128\)"):
        llmasos.compile(model, "cpu", (ids,), passes="prune{method=wanda}",
                        calibration=[np.array([[0, 500, 3]], np.int64)])
