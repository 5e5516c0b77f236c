"""Runtime checks torch.export leaves in the graph: they produce nothing, so they convert to nothing.
(The symbol bounds they guard are kept in Graph.symbols.)"""
from __future__ import annotations

from .registry import converter


@converter("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten._assert_async.msg",
           "aten.sym_constrain_range.default", "aten.sym_constrain_range_for_size.default")
def drop(ctx, *args, **kwargs):
    return None
