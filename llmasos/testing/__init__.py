"""Test helpers that ship with LLMasOS, for its own tests and for authors of plugins.

* ``llmasos.testing.conformance`` -- the conformance kit a target plugin runs from pytest:
  ``conformance_tests(globals(), target="c")``.
* ``llmasos.testing.allops`` -- one graph with a case of every registered op, and its check against the
  reference interpreter.

These modules need pytest and Hypothesis (LLMasOS's ``dev`` extra); ``import llmasos`` never imports them.
"""
