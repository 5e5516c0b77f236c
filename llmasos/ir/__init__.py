"""LLMasOS IR: types, the declarative op registry, graphs, text format, verifier, reference interpreter."""
from .types import DType, TensorType, Dim, sym, as_dim, dim_str
from .ops import Attr, OpDef, OpError, defop, get_op, all_ops, register_op
# the built-in ops register themselves into the registry above; first, so that every later module (and
# every importer of any llmasos.ir module: Python runs this file first) sees the full op set
from . import opset  # noqa: E402,F401
from .graph import Graph, Node, Value, graph_equal, graph_diff
from .printer import print_graph
from .parser import parse, parse_type, parse_dim, ParseError

__all__ = ["DType", "TensorType", "Dim", "sym", "as_dim", "dim_str", "Attr", "OpDef", "OpError", "defop",
           "get_op", "all_ops", "register_op", "Graph", "Node", "Value", "graph_equal", "graph_diff",
           "print_graph", "parse", "parse_type", "parse_dim", "ParseError"]
