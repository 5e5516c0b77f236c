"""Converters from ATen ops to LLMasOS IR, one small module per family; importing registers them all."""
from .registry import CONVERTERS, register_converter, unregister_converter
from .context import ConvertContext
from . import checks, creation, elementwise, kv, nn, reduce, shape  # noqa: F401  (register the built-ins)

__all__ = ["CONVERTERS", "register_converter", "unregister_converter", "ConvertContext"]
