"""The target conformance kit for the example plugin (examples/target-plugin: TVM's C code generator built by
the system C compiler), registered through the ``llmasos.targets`` entry point of its own distribution."""
import pytest

pytest.importorskip("llmasos_target_c", reason="the example target plugin is not installed: "
                                               "pip install ./examples/target-plugin")

from llmasos.backends.tvm import resolve_target, target_source  # noqa: E402
from llmasos.testing.conformance import conformance_tests  # noqa: E402

conformance_tests(globals(), target="c")


def test_the_plugin_comes_from_its_entry_point():
    assert target_source("c") == ("entry point 'c = llmasos_target_c:CTarget' of distribution llmasos-target-c")
    assert type(resolve_target({"kind": "c"})).__name__ == "CTarget"


def test_the_plugins_overrides_are_what_the_build_used():
    """Its rms_norm / silu lowerings and its FlatElementwise rule, seen in the generated C."""
    import numpy as np

    from llmasos.backends.tvm import build
    from llmasos.ir import DType, Graph, TensorType, sym
    from llmasos.ir.interpreter import run

    g = Graph("g")
    g.add_symbol("n", 1, 64)
    x = g.add_input("x", TensorType((sym("n"), 32), DType.f32))
    w = g.add_param("w", np.linspace(0.5, 1.5, 32, dtype=np.float32))
    g.set_outputs([g.add_node("silu", [g.add_node("tanh", [x])]), g.add_node("rms_norm", [x, w], {"eps": 1e-6})])
    exe = build(g, "c")
    src = exe.source()
    assert "c_rms_norm" in src and "c_silu" in src            # the plugin's lowerings named these kernels
    assert "_fused_1 < (int64_t)64" in src                    # FlatElementwise: one flat loop, 64-element pieces
    xs = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    for o, r in zip(exe(xs), run(g, [xs])):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)


RUNTIME_ONLY = r"""
import json, sys
import numpy as np
import tvm
assert getattr(tvm.base, "_RUNTIME_ONLY", False), "the compiler library was loaded"
import llmasos
cm = llmasos.load(sys.argv[1])
assert type(cm.executable.spec).__name__ == "CTarget"
ids = np.array(json.loads(sys.argv[2]), dtype=np.int64)
print(json.dumps(cm.executable(ids)[0].tolist()))
"""


def test_a_saved_c_library_runs_with_tvm_runtime_alone(tmp_path):
    """Deployment as a vendor would have it: the library gcc built, loaded without TVM's compiler."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    import torch

    import llmasos
    from llmasos.zoo import from_preset
    m = from_preset("gpt2-tiny", n_layer=1)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    cm = llmasos.compile(m, target="c", example_inputs=(ids,), max_batch=2, max_seq=16)
    cm.save(tmp_path / "gpt2-c.llmasos")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(tmp_path / "gpt2-c.llmasos"), json.dumps(ids.tolist())],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_array_equal(got, cm.executable(ids.numpy())[0])
