"""The explicit pass context: PassManager hands every pass ``run(graph, ctx)`` with the run's calibration
data and target hint; passes written as ``run(graph)`` still run; no ambient state leaks between runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from llmasos.ir import DType, Graph, TensorType
from llmasos.passes import NO_CONTEXT, Pass, PassContext, PassError, PassManager, get_pass, register_pass
from llmasos.passes import calibration as calibration_module
from llmasos.passes.calibration import Calibration


def graph() -> Graph:
    g = Graph("ctx")
    x = g.add_input("x", TensorType((2, 4), DType.f32))
    y = g.add_node("linear", [x, g.add_param("fc.weight", np.eye(4, dtype=np.float32))])
    g.set_outputs([y])
    return g


BATCHES = [np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32)]


@pytest.fixture
def probes(registry):
    seen: list = []

    @register_pass("see-context")
    @dataclass(frozen=True)
    class SeeContext(Pass):
        def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
            seen.append(ctx)
            return graph

    @register_pass("old-style")
    @dataclass(frozen=True)
    class OldStyle(Pass):
        """A plugin written before passes took a context."""

        def run(self, graph):
            seen.append("old-style")
            return graph

    @register_pass("needs-data")
    @dataclass(frozen=True)
    class NeedsData(Pass):
        exact: ClassVar[bool] = True

        def run(self, graph, ctx=NO_CONTEXT):
            seen.append(ctx.require_calibration(self).tokens)
            return graph

    return seen


def test_every_pass_gets_the_run_s_context(probes):
    g = graph()
    pm = PassManager("see-context,old-style,see-context", calibration=BATCHES, target="cuda")
    assert pm.run(g) is g
    first, old, again = probes
    assert first is again is pm.context and old == "old-style"
    assert first.target == "cuda" and isinstance(first.calibration, Calibration)  # a list of batches is wrapped
    assert first.calibration.tokens == 16 and pm.calibration is first.calibration


def test_a_context_object_can_be_given_whole(probes):
    ctx = PassContext(calibration=Calibration(BATCHES, progress=False), target="cpu")
    PassManager(["see-context", "needs-data"], context=ctx).run(graph())
    assert probes == [ctx, 16]
    with pytest.raises(TypeError, match="calibration=/target= or context=, not both"):
        PassManager("dce", calibration=BATCHES, context=ctx)


def test_runs_do_not_share_ambient_state(probes):
    """A manager with calibration data and one without, interleaved: each pass sees only its own run's."""
    with_data = PassManager("needs-data", calibration=BATCHES)
    without = PassManager("needs-data")
    with_data.run(graph())
    with pytest.raises(PassError, match=r"pass 'needs-data': needs calibration data: PassManager\(\.\.\., "
                                        r"calibration=Calibration\(batches\)\)"):
        without.run(graph())
    with_data.run(graph())
    assert probes == [16, 16]
    assert not hasattr(calibration_module, "current_calibration")  # no context variable to read


def test_passes_called_directly_take_the_context_too():
    gptq = get_pass("quantize")(method="gptq")
    with pytest.raises(PassError, match=r"pass 'quantize\{method=gptq\}': needs calibration data"):
        gptq.run(graph())  # no context: an empty one
    out = gptq(graph(), PassContext(calibration=BATCHES))  # __call__ = apply
    assert [n.op for n in out.nodes] == ["quant.linear"]
    assert get_pass("dce")().apply(graph()).nodes[0].op == "linear"


def test_fuse_hands_its_context_to_its_parts(monkeypatch):
    from llmasos.passes import fuse

    seen = []
    real = fuse.FuseElementwise.run

    def spy(self, graph, ctx=NO_CONTEXT):
        seen.append(ctx.target)
        return real(self, graph, ctx)
    monkeypatch.setattr(fuse.FuseElementwise, "run", spy)
    PassManager("fuse", target="cuda").run(graph())
    assert seen == ["cuda"]
