"""The target conformance kit for the built-in CUDA target (needs a GPU: the `gpu` marker)."""
import pytest

from llmasos.testing.conformance import conformance_tests

pytestmark = pytest.mark.gpu

conformance_tests(globals(), target="cuda")
