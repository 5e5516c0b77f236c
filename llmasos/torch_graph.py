"""Moved to ``llmasos.backends.torch_graph`` (it is an executor of the IR, beside the TVM backend); this
re-export keeps code written against the old path working. New code imports the backends module."""
from .backends.torch_graph import GraphModule, TORCH_IMPLS, register_torch_impl, unsupported_ops  # noqa: F401

__all__ = ["GraphModule", "TORCH_IMPLS", "register_torch_impl", "unsupported_ops"]
