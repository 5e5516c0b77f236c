"""Passes: the registry, pipeline strings and the pass manager.

    from llmasos.passes import PassManager
    g2 = PassManager("dce,cse", verify_each=True, numeric_check=inputs).run(g)
"""
from .base import (NO_CONTEXT, Pass, PassContext, PassError, PassNotApplicable, PassRegistryError, UnknownPassError,
                   all_passes, get_pass, pass_source, register_pass)
from .pipeline import PipelineError, format_pipeline, parse_pipeline
from .manager import NumericDriftError, NumericTieWarning, PassManager, PassRecord, PassVerificationError


def run_pipeline(graph, passes, **instruments):
    """``PassManager(passes, **instruments).run(graph)``."""
    return PassManager(passes, **instruments).run(graph)


__all__ = ["NO_CONTEXT", "Pass", "PassContext", "PassError", "PassNotApplicable", "PassRegistryError", "UnknownPassError", "all_passes", "get_pass", "pass_source",
           "register_pass", "PipelineError", "format_pipeline", "parse_pipeline", "NumericDriftError", "NumericTieWarning",
           "PassManager", "PassRecord", "PassVerificationError", "run_pipeline"]
