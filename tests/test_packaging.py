"""pyproject lists its packages by hand (frontends/ is mapped into llmasos): every package directory must be
in that list, or a wheel (a non-editable install) silently lacks it -- llmasos.llm once was."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(llmasos(?:\.[a-z_]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = set()
    for init in ROOT.glob("llmasos/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in ROOT.glob("frontends/**/__init__.py"):
        found.add(".".join(("llmasos",) + init.parent.relative_to(ROOT).parts))
    assert found - listed == set(), f"package directories missing from pyproject's packages: {found - listed}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {listed - found}"
