"""The import structure of llmasos, beyond what ``lint-imports`` checks (pyproject's [tool.importlinter]
contracts: the layers, TVM only in the backends and above, torch-free passes): no import cycles, at the
module level and between the sibling modules of any package; device-string dispatch (``== "cuda"``) only
in target classes; function-local imports only where they defer a heavy one. The graph is grimp's, the one
lint-imports builds, function-local imports included."""
from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Optional

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


# Function-local imports only defer a heavy import -- torch where the module imports without it, TVM (its
# compiler, where a module loads with TVM's runtime alone), transformers, torch-mlir, xgboost, or an llmasos
# module that loads one of these -- and say so in a comment ("deferred: ..." on the import, or in the comment
# lines just above its run of imports). An import the module already makes at its top, directly or through
# the modules imported there, defers nothing. What a module loads is read from the source: its module-level
# imports (not those under `if TYPE_CHECKING:`, nor optional ones in a `try:` that catches ImportError), the
# packages above it, and theirs, transitively. Checked in every module of llmasos and frontends.
HEAVY = {"torch", "transformers", "tvm", "tvm_ffi", "torch_mlir", "safetensors.torch", "xgboost",
         # the optional extras (serve, energy, distributed): absent from a core install, slow to import
         "fastapi", "uvicorn", "prometheus_client", "httpx", "openai", "zeus", "codecarbon", "pynvml",
         "psutil", "matplotlib", "plotly", "ray"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ("llmasos",) + rel.parts if rel.parts[0] == "frontends" else rel.parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


@functools.lru_cache(maxsize=None)
def _path_of(module: str) -> Optional[Path]:
    """The source file of an llmasos module (frontends/ is llmasos.frontends), None if there is none."""
    parts = module.split(".")
    if parts[0] != "llmasos":
        return None
    base, rest = (ROOT / "frontends", parts[2:]) if parts[1:2] == ["frontends"] else (ROOT / "llmasos", parts[1:])
    d = base.joinpath(*rest)
    for p in ([d.with_suffix(".py")] if rest else []) + [d / "__init__.py"]:
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    """Whether ``name`` is a module (not an attribute of one), found on disk without importing anything."""
    if name.split(".")[0] == "llmasos":
        return _path_of(name) is not None
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])] if spec is not None else []
    for i, part in enumerate(rest):
        if any((d / f"{part}.py").is_file() or any(d.glob(f"{part}.*.so")) for d in dirs):
            return i == len(rest) - 1
        dirs = [d / part for d in dirs if (d / part).is_dir()]
        if not dirs:
            return False
    return spec is not None


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The full name of the module a ``from ... import`` statement names (relative names resolved)."""
    parts = package.split(".")
    base = parts[:len(parts) - node.level + 1] if node.level else []
    return ".".join(base + ([node.module] if node.module else []))


def _imported(node, package: str) -> list[str]:
    """The modules an import statement names, in full (``from m import x`` names m.x where x is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    mod = _from_module(node, package)
    subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
    return subs if len(subs) == len(node.names) else [mod, *subs]


def _with_parents(modules) -> set:
    return {".".join(m.split(".")[:i]) for m in modules for i in range(1, len(m.split(".")) + 1)}


def _catches_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    for h in node.handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


def _module_level_imports(tree: ast.Module) -> list:
    """The import statements a module runs when it is imported (class bodies included, functions not)."""
    out = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                out.append(s)
            elif isinstance(s, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(s.test):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                if not _catches_import_error(s):  # a try that catches ImportError: an optional import
                    visit(s.body)
                    visit(s.orelse)
                    for h in s.handlers:
                        visit(h.body)
                visit(s.finalbody)
            elif isinstance(s, (ast.With, ast.For, ast.While, ast.ClassDef)):
                visit(s.body)
                visit(getattr(s, "orelse", []))

    visit(tree.body)
    return out


def _loads(tree: ast.Module, package: str) -> frozenset:
    return frozenset(_with_parents(m for node in _module_level_imports(tree) for m in _imported(node, package)))


@functools.lru_cache(maxsize=None)
def _direct(module: str) -> frozenset:
    path = _path_of(module)
    return _loads(ast.parse(path.read_text()), _package(module, path)) if path is not None else frozenset()


def _closure(module: str, direct=None) -> set:
    """Every module that importing ``module`` loads, as far as its source and its llmasos imports tell."""
    todo = list(_with_parents([module]) - {module}) + list(_direct(module) if direct is None else direct)
    seen = {module}
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_direct(m))
    return seen


def _heavy_external(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HEAVY)


def _local_import_runs(tree: ast.Module) -> list:
    """Runs of consecutive import statements inside functions, each a list of statements."""
    runs = []

    def visit(node, in_function: bool):
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and all(isinstance(s, ast.stmt) for s in value) and in_function:
                run = []
                for s in value + [None]:
                    if isinstance(s, (ast.Import, ast.ImportFrom)):
                        run.append(s)
                    elif run:
                        runs.append(run)
                        run = []
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return runs


def _says_deferred(lines: list, run: list) -> bool:
    first = run[0].lineno - 1
    while first > 0 and lines[first - 1].strip().startswith("#"):
        first -= 1
    return any("deferred" in line for line in lines[first:run[-1].end_lineno])


def deferral_problems(text: str, module: str, package: str) -> list[str]:
    """'line: module: what is wrong' for each function-local import that defers nothing heavy or does not
    say what it defers."""
    tree = ast.parse(text)
    lines = text.splitlines()
    loaded = _closure(module, _loads(tree, package))
    heavy_loaded = {m for m in loaded if _heavy_external(m)}
    problems = []
    for run in _local_import_runs(tree):
        said = _says_deferred(lines, run)
        for node in run:
            for m in _imported(node, package):
                if m in loaded:
                    why = "the module loads it already at its top"
                elif m.split(".")[0] == "llmasos":
                    why = None if {x for x in _closure(m) if _heavy_external(x)} - heavy_loaded else \
                        "nothing heavy to defer"
                else:
                    why = None if _heavy_external(m) else "nothing heavy to defer"
                if why is None and not said:
                    why = "no comment saying what it defers ('# deferred: ...')"
                if why:
                    problems.append(f"{node.lineno}: {m}: {why}")
    return problems


def test_function_local_imports_only_defer_heavy_ones():
    bad = {}
    for p in _sources():
        module = _module_name(p)
        if problems := deferral_problems(p.read_text(), module, _package(module, p)):
            bad[str(p.relative_to(ROOT))] = problems
    assert not bad, f"import these at the top of the module, or say what they defer: {bad}"


def test_the_deferral_check_can_fail():
    src = ("import numpy as np\nfrom . import types\n"
           "def f():\n"
           "    import torch  # deferred: torch\n"
           "    import numpy.linalg\n"
           "    from .types import DType\n"
           "    from ..compress import gptq\n"
           "    x = 1\n"
           "    import tvm\n"
           "    x = 2\n"
           "    # deferred: torch_graph imports torch; a comment says so for its run of imports\n"
           "    from ..backends.torch_graph import GraphModule\n"
           "    from torch import nn\n"
           "    class C:\n"
           "        def g(self):\n"
           "            import transformers  # (not said)\n")
    assert deferral_problems(src, "llmasos.ir.fake", "llmasos.ir") == [
        "5: numpy.linalg: nothing heavy to defer",
        "6: llmasos.ir.types: the module loads it already at its top",
        "7: llmasos.compress.gptq: nothing heavy to defer",
        "9: tvm: no comment saying what it defers ('# deferred: ...')",
        "16: transformers: no comment saying what it defers ('# deferred: ...')"]


def test_imports_are_resolved_to_modules():
    tree = ast.parse("from . import rules\nfrom ..ops import defop\nfrom tvm import relax, te\n"
                     "from tvm.s_tir import meta_schedule as ms\nimport torch.nn\nfrom torch import Tensor, nn\n"
                     "from ...backends.tvm.build import Executable\n")
    assert [_imported(n, "llmasos.ir.opset") for n in tree.body] == [
        ["llmasos.ir.opset.rules"], ["llmasos.ir.ops"], ["tvm.relax", "tvm.te"], ["tvm.s_tir.meta_schedule"],
        ["torch.nn"], ["torch", "torch.nn"], ["llmasos.backends.tvm.build"]]


def test_what_a_module_loads_is_read_from_its_source():
    # the compiler is imported in the package's optional try block: not something importing it guarantees
    assert "tvm.relax" not in _closure("llmasos.backends.tvm.build")
    assert "tvm.relax" in _closure("llmasos.backends.tvm.lower")
    assert "torch" in _closure("llmasos.frontends.fx_import")          # through torch_export
    assert not {m for m in _closure("llmasos") if _heavy_external(m)}  # `import llmasos` loads none


# No module takes another's private names (a leading underscore): shared machinery gets a public name in a
# module of its own or its home module. Tests may import private names; the code may not.
def private_imports(text: str, package: str) -> list[str]:
    """'line: module._name' for each private name of another llmasos module this source imports or reads
    (``from m import _x``, ``m._x`` where m is an imported llmasos module)."""
    tree = ast.parse(text)
    modules, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _from_module(node, package)
            if mod.split(".")[0] != "llmasos":
                continue
            for a in node.names:
                if _is_module(f"{mod}.{a.name}"):
                    modules[a.asname or a.name] = f"{mod}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    found.append((node.lineno, f"{mod}.{a.name}"))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "llmasos":
                    modules[a.asname or "llmasos"] = a.name if a.asname else "llmasos"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append((node.lineno, f"{modules[node.value.id]}.{node.attr}"))
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_no_module_uses_another_modules_private_names():
    bad = {}
    for p in _sources():
        module = _module_name(p)
        if found := private_imports(p.read_text(), _package(module, p)):
            bad[str(p.relative_to(ROOT))] = found
    assert not bad, f"private names of other modules (give them a public name, or a module of their own): {bad}"


def test_the_private_name_check_can_fail():
    src = ("from .ops import _normalize_attr, defop\nfrom . import types as T\nimport llmasos.ir.graph\n"
           "from __future__ import annotations\nfrom numpy import _NoValue\n"
           "def f():\n    from ..passes.base import _fits\n    return T._helper(llmasos._x, T.dim_str)\n")
    assert private_imports(src, "llmasos.ir") == ["1: llmasos.ir.ops._normalize_attr", "7: llmasos.passes.base._fits",
                                                  "8: llmasos._x", "8: llmasos.ir.types._helper"]
