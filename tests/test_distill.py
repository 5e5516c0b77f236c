"""llmasos.distill: a 50%-pruned tiny Llama student recovers toward its teacher; masks, checkpoints, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import llmasos
from llmasos.distill import DistillError, distillation_loss
from llmasos.eval import perplexity
from llmasos.frontends.torch_export import import_module
from llmasos.ir import Graph
from llmasos.ir.graph import param_array
from tests.models import llama


def _sample(teacher, n, seq, seed):
    """Token windows sampled from the teacher itself: text the teacher finds likely."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seq - 1):
            p = torch.softmax(teacher(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids.numpy()


def _pruned(model):
    """50% unstructured magnitude pruning of every linear weight (per matrix), done directly in torch."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    return student


@pytest.fixture(scope="module")
def setup():
    # a wide init makes the random teacher's predictions peaked: at the default 0.02 they are near uniform,
    # and pruning would change nothing measurable
    teacher = llama(seed=0, initializer_range=0.4)
    train = _sample(teacher, 32, 24, seed=1)
    held = _sample(teacher, 16, 24, seed=2)
    return teacher, train, held


def _kl(teacher, student, windows):
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        return float(distillation_loss(student(ids).logits, teacher(ids).logits, ids, alpha=0.0, temperature=1.0))


def _zeros(model):
    return {n: p.detach() == 0 for n, p in model.named_parameters() if p.ndim == 2 and "proj" in n}


def test_pruned_student_recovers(setup):
    teacher, train, held = setup
    student = _pruned(teacher)
    zeros = _zeros(student)
    assert all(z.float().mean() >= 0.5 for z in zeros.values())
    kl0, ppl0 = _kl(teacher, student, held), perplexity(student, held)
    res = llmasos.distill(teacher, student, train, alpha=0.5, temperature=2.0, steps=30, lr=1e-2,
                          batch_size=4, progress=False)
    assert res.student is student and len(res.losses) == 30 and res.seconds > 0
    assert sorted(res.masks) == sorted(zeros)  # "auto" found every pruned matrix, nothing else
    for n, p in student.named_parameters():
        if n in zeros:
            assert torch.all(p[zeros[n]] == 0), n  # pruned weights stay pruned
    kl1, ppl1 = _kl(teacher, student, held), perplexity(student, held)
    ppl_teacher = perplexity(teacher, held)
    # measured: KL 4.47 -> 3.35, perplexity 642 -> 213 (teacher 6.9)
    assert kl1 < 0.85 * kl0, (kl0, kl1)
    assert ppl_teacher < ppl1 < 0.6 * ppl0, (ppl0, ppl1, ppl_teacher)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])


def test_graph_student_keeps_masks(setup):
    teacher, train, held = setup
    pruned = _pruned(teacher)
    graph = import_module(pruned, (torch.from_numpy(train[:2]),)).graph
    before = perplexity(graph, held)
    res = llmasos.distill(teacher, graph, train, steps=10, lr=1e-2, progress=False)
    out = res.student
    assert isinstance(out, Graph) and out is not graph
    name = "model.layers.0.mlp.down_proj.weight"
    w0, w1 = param_array(graph.param_data[name]), param_array(out.param_data[name])
    assert name in res.masks
    np.testing.assert_array_equal(w1[w0 == 0], 0)
    assert not np.array_equal(w1, w0)
    assert perplexity(out, held) < before


def test_checkpoint_resume_matches_uninterrupted_run(setup, tmp_path, capsys):
    teacher, train, _ = setup
    base = _pruned(teacher)
    kw = dict(steps=6, lr=1e-3, batch_size=2, progress=True, log_every=3)
    full = llmasos.distill(teacher, copy.deepcopy(base), train, **kw)
    first = llmasos.distill(teacher, copy.deepcopy(base), train, **{**kw, "steps": 4},
                            checkpoint_dir=tmp_path, checkpoint_every=2)
    assert [p.name for p in tmp_path.iterdir()] == ["distill_step00000004.pt"]
    resumed = llmasos.distill(teacher, copy.deepcopy(base), train, **kw, checkpoint_dir=tmp_path,
                              checkpoint_every=2)
    assert resumed.resumed_from == 4 and len(resumed.losses) == 6
    assert resumed.losses[:4] == first.losses
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    for (n, a), b in zip(full.student.named_parameters(), resumed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert [p.name for p in tmp_path.iterdir()] == ["distill_step00000006.pt"]
    err = capsys.readouterr().err
    assert "[distill] step 3/6  loss " in err and " tok/s" in err and "step 6/6" in err


@pytest.mark.parametrize("kw,msg", [
    (dict(alpha=1.5), "alpha must be in [0, 1]"),
    (dict(temperature=0), "temperature must be > 0, got 0"),
    (dict(steps=0), "steps must be an int >= 1, got 0"),
    (dict(batch_size=2.5), "batch_size must be an int >= 1, got 2.5"),
    (dict(data=np.zeros((4, 1), np.int64)), "data must be token windows [W, S] with W >= 1 and S >= 2 tokens "
                                             "per row (llmasos.eval.token_windows), got shape [4, 1]"),
    (dict(data=np.zeros(8, np.int64)), "got shape [8]"),
    (dict(data=np.zeros((2, 4), np.float32)), "data must be integer token ids, got float32"),
    (dict(student="model"), "student must be an nn.Module or an llmasos Graph, got str"),
])
def test_bad_arguments_fail_before_work(kw, msg):
    class Exploding(torch.nn.Module):
        def forward(self, ids):
            raise AssertionError("no work may start on bad arguments")

    args = dict(teacher=Exploding(), student=torch.nn.Linear(2, 2), data=np.zeros((2, 4), np.int64))
    args.update(kw)
    with pytest.raises(DistillError) as e:
        llmasos.distill(args.pop("teacher"), args.pop("student"), args.pop("data"), **args)
    assert msg in str(e.value)


def test_auto_masks_take_pruned_matrices_only():
    from llmasos.distill import _auto_masks
    w = torch.ones(10, 10)
    sparse, few, vec = w.clone(), w.clone(), torch.zeros(10)
    sparse.view(-1)[:10] = 0   # 10%: pruned
    few.view(-1)[:9] = 0       # 9%: zeros of a dequantized checkpoint, left free
    masks = _auto_masks([("a", sparse), ("b", few), ("c", vec)])
    assert list(masks) == ["a"] and int((~masks["a"]).sum()) == 10
