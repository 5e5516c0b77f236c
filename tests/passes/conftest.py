import pytest

from llmasos.passes import base


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the pass registry: passes registered by a test vanish after it."""
    base._ensure_loaded()
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_SOURCES", dict(base._SOURCES))
    return base
