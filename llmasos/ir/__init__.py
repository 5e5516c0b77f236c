"""LLMasOS IR: types, the declarative op registry, graphs, text format, verifier, reference interpreter."""
from .types import DType, TensorType, Dim, sym, as_dim, dim_str
from .ops import Attr, OpDef, OpError, defop, get_op, all_ops, register_op
from .graph import Graph, Node, Value, graph_equal, graph_diff
from .printer import print_graph
from .parser import parse, parse_type, parse_dim, ParseError

__all__ = ["DType", "TensorType", "Dim", "sym", "as_dim", "dim_str", "Attr", "OpDef", "OpError", "defop",
           "get_op", "all_ops", "register_op", "Graph", "Node", "Value", "graph_equal", "graph_diff",
           "print_graph", "parse", "parse_type", "parse_dim", "ParseError"]
