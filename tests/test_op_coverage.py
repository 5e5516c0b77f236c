"""``llmasos ops``: which layers know each registered op (llmasos/op_coverage.py)."""
from __future__ import annotations

import json

import pytest

from llmasos.backends.torch_graph import TORCH_IMPLS, register_torch_impl
from llmasos.backends.tvm import known_targets
from llmasos.cli import main
from llmasos.frontends import register_converter, unregister_converter
from llmasos.ir import OpDef, all_ops, defop, register_op
from llmasos.ir.ops import OPS
from llmasos.op_coverage import format_table, op_coverage


@pytest.fixture(scope="module")
def rows():
    return {r.op: r for r in op_coverage()}


def test_every_registered_op_has_a_row(rows):
    assert sorted(rows) == sorted(all_ops())
    assert all(set(r.lowering) == set(known_targets()) for r in rows.values())


def test_what_the_built_in_ops_have(rows):
    add = rows["add"]
    assert {"aten.add.Tensor", "aten.add.Scalar"} <= set(add.aten) and add.frontend == "ok"
    assert add.reference and add.torch and all(add.lowering.values()) and add.missing == []
    # a converter factory's closure names the op: _binary("mul") for aten.mul.Tensor
    assert "aten.mul.Tensor" in rows["mul"].aten and "aten.add.Tensor" in rows["mul"].aten  # alpha != 1
    assert rows["kv.append"].aten == ("llmasos.kv_append.default",)
    assert "aten._to_copy.default" in rows["cast"].aten  # through ctx.cast
    for op in ("fused.linear_act", "fused.add_rms_norm", "quant.linear"):  # produced by passes only
        assert rows[op].frontend == "n/a" and rows[op].aten == () and "frontend" not in rows[op].missing
    # nothing converts to quant.dequant and no pass makes it: only IR text has it
    assert rows["quant.dequant"].frontend == "missing" and rows["quant.dequant"].missing == ["frontend"]


def test_a_new_op_is_missing_everywhere_until_each_layer_gets_an_entry():
    name = "test.cover_me"
    defop(name, ("x",), lambda x: x, None)  # no reference semantics either
    try:
        row = next(r for r in op_coverage(["cpu"]) if r.op == name)
        assert row.missing == ["frontend", "reference", "lowering:cpu", "torch"]
        assert row.frontend == "missing" and row.lowering == {"cpu": False}
        register_op(OpDef(name, ("x",), lambda x: x, lambda x: x), replace=True)

        register_converter("aten.hardshrink.default", lambda ctx, x, lambd=0.5: ctx.emit(name, [x]))
        register_torch_impl(name, lambda x: x)
        row = next(r for r in op_coverage(["cpu"]) if r.op == name)
        assert row.aten == ("aten.hardshrink.default",) and row.missing == ["lowering:cpu"]
    finally:
        OPS.pop(name)
        TORCH_IMPLS.pop(name, None)
        unregister_converter("aten.hardshrink.default")


def test_unknown_targets_are_refused():
    with pytest.raises(ValueError, match=r"unknown target\(s\) nope; registered: .*cpu, "):
        op_coverage(["nope"])


def test_the_table_groups_targets_with_the_same_answers(rows):
    text = format_table(list(rows.values()))
    lines = text.splitlines()
    assert lines[0].split() == ["op", "frontend", "(ATen", "ops)", "reference",
                                "lowering:" + ",".join(known_targets()), "torch", "cost"]
    assert len(lines) == len(rows) + 2
    assert any(line.split()[:2] == ["quant.dequant", "MISSING"] for line in lines)
    assert lines[-1] == f"{len(rows)} ops, {sum(1 for r in rows.values() if r.missing)} missing an entry somewhere"
    linear = next(line for line in lines if line.split()[0] == "linear")
    assert linear.split()[-1] == ("own" if rows["linear"].cost else "default")
    only = format_table(list(rows.values()), missing_only=True).splitlines()
    assert [line.split()[0] for line in only[1:-1]] == sorted(r.op for r in rows.values() if r.missing)


def test_the_cli(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("op ") and "fused.linear_act" in out
    assert main(["ops", "--missing", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc and all(d["missing"] for d in doc)
    assert {"op", "frontend", "aten", "reference", "lowering", "torch", "cost", "missing"} == set(doc[0])
    assert main(["ops", "--target", "nope"]) == 2
    assert "unknown target(s) nope" in capsys.readouterr().err

