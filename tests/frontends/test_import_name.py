"""frontends/ sits at the repository root but has one import name, llmasos.frontends: imported as top-level
``frontends`` it would be a second copy with a second converter registry (and would register the torch
custom ops twice), so that name is refused."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_top_level_name_is_refused_with_the_right_name():
    # the repository root is on sys.path here (cwd), which is how a stray `import frontends` used to work
    r = subprocess.run([sys.executable, "-c", "import frontends.aten"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert ("ImportError: the frontends package is llmasos.frontends; import it under that name, not as "
            "'frontends' (a second copy would have its own converter registry)") in r.stderr


def test_nothing_imports_the_top_level_name():
    pattern = re.compile(r"^\s*(from\s+frontends[\s.]|import\s+frontends\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for d in ("llmasos", "frontends", "tests", "bench")
                 for p in (ROOT / d).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
