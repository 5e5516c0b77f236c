"""The target conformance kit (llmasos.testing.conformance) for the built-in CPU target."""
from llmasos.testing.conformance import conformance_tests

conformance_tests(globals(), target="cpu")
