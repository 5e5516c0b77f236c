"""What a target plugin's own test suite needs: LLMasOS's conformance kit for the target it registers."""
from llmasos.testing.conformance import conformance_tests

conformance_tests(globals(), target="c")
