"""Every tests/ir/**/*.llir file, run through ``llmasos opt`` in process and matched by tests/ir/filecheck.py
(the format is documented there)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.ir.filecheck import FileCheckError, run_test_file

HERE = Path(__file__).parent
FILES = sorted(HERE.glob("**/*.llir"))


def test_files_exist():
    # the glob finding nothing would otherwise pass silently with zero parametrized cases
    assert len(FILES) >= 20, FILES


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(HERE)) for f in FILES])
def test_llir_file(path: Path):
    try:
        run_test_file(path)
        return
    except FileCheckError as e:
        msg = str(e)
    pytest.fail(msg, pytrace=False)  # outside the except: no "during handling" echo of the same message
