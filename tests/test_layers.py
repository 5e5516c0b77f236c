"""The import structure of llmasos, beyond what ``lint-imports`` checks (pyproject's [tool.importlinter]
contracts: the layers, TVM only in the backends and above, torch-free passes): no import cycles, at the
module level and between the sibling modules of any package; device-string dispatch (``== "cuda"``) only
in target classes; function-local imports only where they defer a heavy one. The graph is grimp's, the one
lint-imports builds, function-local imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]

# Import cycles tolerated (none): each entry would be one strongly connected set of modules (module to
# module, or between the siblings of one package). A cycle not listed here fails, and so does a listed one
# that is gone.
ALLOWED_CYCLES: set = set()

# Device names whose string comparisons are device dispatch.
DEVICES = {"cuda", "cpu", "llvm", "gpu", "rocm", "metal", "vulkan", "opencl", "webgpu"}

# Files allowed a device-string comparison outside a target class, each with its reason. A file not listed
# here fails, and so does a listed one that has none left.
ALLOWED_DISPATCH = {
    # the CPU schedule rules' DLight is_target_available(): the TVM target kind a rule was written for
    "llmasos/backends/tvm/cpu_schedule.py",
}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("llmasos", cache_dir=None, exclude_type_checking_imports=True)


def _imports(graph, module: str) -> set[str]:
    return {m for m in graph.find_modules_directly_imported_by(module) if m.split(".")[0] == "llmasos"}


def _where(graph, cycle: frozenset) -> str:
    lines = []
    for a in sorted(cycle):
        for b in sorted(cycle - {a}):
            for d in graph.get_import_details(importer=a, imported=b):
                lines.append(f"  {a}:{d['line_number']}: {d['line_contents']}")
    return "\n".join(lines)


def _module_cycles(graph) -> set[frozenset]:
    g = nx.DiGraph()
    for m in graph.modules:
        g.add_edges_from((m, i) for i in _imports(graph, m))
    return {frozenset(c) for c in nx.strongly_connected_components(g) if len(c) > 1}


def _sibling_cycles(graph) -> set[frozenset]:
    """Cycles between the children of one package, each child standing for its whole subtree."""
    out = set()
    for pkg in sorted(graph.modules):
        children = graph.find_children(pkg)
        if len(children) < 2:
            continue
        child_of = lambda m: pkg + "." + m[len(pkg) + 1:].split(".")[0]  # noqa: E731
        g = nx.DiGraph()
        for m in graph.find_descendants(pkg):
            g.add_edges_from((child_of(m), child_of(i)) for i in _imports(graph, m)
                             if i.startswith(pkg + ".") and child_of(i) != child_of(m))
        out |= {frozenset(c) for c in nx.strongly_connected_components(g) if len(c) > 1}
    return out


def test_grimp_sees_the_frontends(graph):
    # frontends/ is mapped into llmasos by pyproject; grimp walks llmasos/ on disk and finds it through the
    # llmasos/frontends symlink -- without it lint-imports would silently check nothing about the frontends
    assert "llmasos.frontends.kv_ops" in _imports(graph, "llmasos.frontends.aten.kv")
    assert "llmasos.frontends.kv_ops" in _imports(graph, "llmasos.backends.torch_graph")


def test_no_import_cycles(graph):
    found = _module_cycles(graph) | _sibling_cycles(graph)
    new = found - ALLOWED_CYCLES
    assert not new, "import cycles:\n" + "\n".join(f"{sorted(c)}\n{_where(graph, c)}" for c in sorted(new, key=sorted))
    gone = ALLOWED_CYCLES - found
    assert not gone, f"these cycles are gone: delete them from ALLOWED_CYCLES: {[sorted(c) for c in gone]}"


def test_the_cycle_check_can_fail():
    g = grimp.ImportGraph()
    for a, b in [("llmasos.a", "llmasos.b"), ("llmasos.b", "llmasos.a"),
                 ("llmasos.p.x", "llmasos.q.y"), ("llmasos.q.z", "llmasos.p.w")]:
        g.add_import(importer=a, imported=b)
    for m in ("llmasos", "llmasos.p", "llmasos.q"):
        g.add_module(m)
    assert _module_cycles(g) == {frozenset({"llmasos.a", "llmasos.b"})}
    assert _sibling_cycles(g) == {frozenset({"llmasos.a", "llmasos.b"}), frozenset({"llmasos.p", "llmasos.q"})}


def _is_device_dispatch(node: ast.Compare) -> bool:
    def device_str(e) -> bool:
        if isinstance(e, ast.Constant):
            return isinstance(e.value, str) and e.value in DEVICES
        return isinstance(e, (ast.Tuple, ast.List, ast.Set)) and any(device_str(x) for x in e.elts)

    def device_attr(e) -> bool:  # `device == ...`, `spec.device != ...`
        return (isinstance(e, ast.Name) and e.id == "device") or (isinstance(e, ast.Attribute) and e.attr == "device")

    if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
        return False
    operands = [node.left, *node.comparators]
    return any(device_str(e) or device_attr(e) for e in operands)


def device_dispatch(path: Path) -> list[int]:
    """Lines comparing device strings outside a target class (a class named *Target*, or a targets module)."""
    if path.stem == "targets" or path.parent.name == "targets":
        return []
    found = []

    def visit(node, in_target_class: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_target_class or (isinstance(child, ast.ClassDef) and "Target" in child.name)
            if isinstance(child, ast.Compare) and not inside and _is_device_dispatch(child):
                found.append(child.lineno)
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def _sources():
    for d in ("llmasos", "frontends"):
        yield from sorted((ROOT / d).rglob("*.py"))


def test_device_string_dispatch_only_in_target_classes():
    found = {str(p.relative_to(ROOT)): lines for p in _sources() if (lines := device_dispatch(p))}
    new = {f: lines for f, lines in found.items() if f not in ALLOWED_DISPATCH}
    assert not new, f"device-string dispatch belongs in a target class (llmasos/backends/tvm/targets.py): {new}"
    gone = ALLOWED_DISPATCH - set(found)
    assert not gone, f"no device-string dispatch left in {sorted(gone)}: delete them from ALLOWED_DISPATCH"


def test_the_dispatch_check_can_fail(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('def f(spec, t):\n    if spec.device == x:\n        pass\n'
                   '    return t.device.type in ("cuda", "rocm")\n'
                   'class CudaTarget:\n    def g(self):\n        return self.kind == "cuda"\n'
                   'def h(name):\n    return name == "cpu_count"\n')
    assert device_dispatch(src) == [2, 4]
    assert device_dispatch(src.rename(tmp_path / "targets.py")) == []  # a targets module may dispatch anywhere


# Function-local imports only defer a heavy import (torch where the module imports without it, TVM,
# transformers, torch-mlir) -- checked in the files audited for it; the lead adds the others' files here as
# they are audited on their branches.
HEAVY = {"torch", "transformers", "tvm", "tvm_ffi", "torch_mlir"}
HEAVY_LLMASOS = {"llmasos.backends.torch_graph", "llmasos.llm.model", "llmasos.op_coverage"}  # import torch/TVM
AUDITED = ["llmasos/ir", "llmasos/compress", "frontends", "llmasos/backends/torch_graph.py", "llmasos/eval.py",
           "llmasos/distill.py", "llmasos/opt.py", "llmasos/zoo.py", "llmasos/cli.py", "llmasos/op_coverage.py",
           "llmasos/__main__.py", "llmasos/torch_graph.py"]
NOT_AUDITED = {"llmasos/ir/graph.py"}  # its owner's branch


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ("llmasos",) + rel.parts if rel.parts[0] == "frontends" else rel.parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def local_imports(path: Path) -> list:
    """(line, imported module) of the imports inside functions of ``path``."""
    name = _module_name(path)
    return _local_imports(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def _local_imports(text: str, package: str) -> list:
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                parts = package.split(".")
                base = parts[:len(parts) - child.level + 1] if child.level else []
                found.append((child.lineno, ".".join(base + ([child.module] if child.module else []))))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(text), False)
    return found


def _heavy(module: str) -> bool:
    return module.split(".")[0] in HEAVY or any(module == h or module.startswith(h + ".") for h in HEAVY_LLMASOS)


def test_function_local_imports_only_defer_heavy_ones():
    files = sorted({p for a in AUDITED for p in ([ROOT / a] if a.endswith(".py") else (ROOT / a).rglob("*.py"))})
    light = {}
    for p in files:
        rel = str(p.relative_to(ROOT))
        bad = [f"{line}: {mod}" for line, mod in local_imports(p)
               if rel not in NOT_AUDITED and not _heavy(mod)]
        if bad:
            light[rel] = bad
    assert not light, f"import these at the top of the module (nothing heavy to defer): {light}"


def test_local_imports_are_found_with_relative_names_resolved():
    src = ("import os\ndef f():\n    import torch.nn\n    from ..ops import defop\n    from . import rules\n"
           "    class C:\n        def g(self):\n            from ...backends.torch_graph import GraphModule\n")
    assert _local_imports(src, "llmasos.ir.opset") == [(3, "torch.nn"), (4, "llmasos.ir.ops"), (5, "llmasos.ir.opset"),
                                                       (8, "llmasos.backends.torch_graph")]
