"""An installed distribution faked for plugin tests: a module plus a dist-info whose entry_points.txt
declares it in an entry-point group, on sys.path for one test."""
from __future__ import annotations

import sys
import textwrap


def install_fake_dist(tmp_path, monkeypatch, group: str, dist: str, module: str, code: str,
                      entry_points: dict) -> None:
    """A real installed distribution (dist-info with entry_points.txt naming ``group``) on sys.path."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{eps}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
