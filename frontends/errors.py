"""Errors raised while importing a torch program into LLMasOS IR."""
from __future__ import annotations

from typing import Optional


class FrontendError(Exception):
    """A torch program that cannot be imported; the message names the torch node and its source."""


class UnsupportedOpError(FrontendError):
    """An op with no converter. Carries the op name, where it came from, and how to add a converter."""

    def __init__(self, op: str, *, node_name: str = "", loc: Optional[str] = None,
                 module_path: Optional[str] = None, reason: str = ""):
        self.op = op
        self.node_name = node_name
        self.loc = loc
        self.module_path = module_path
        where = f" at {loc}" if loc else ""
        module = f" in module '{module_path}'" if module_path else ""
        node = f" (torch node %{node_name})" if node_name else ""
        why = f": {reason}" if reason else ""
        super().__init__(
            f"unsupported op {op}{node}{where}{module}{why}. LLMasOS has no converter for it; to fix, "
            f"register a converter with llmasos.frontends.register_converter('{op}')(fn), where "
            f"fn(ctx, *args, **kwargs) builds IR nodes with ctx.emit(...) and returns the result Value "
            f"(see help(llmasos.frontends.register_converter))")
