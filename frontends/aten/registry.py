"""The table of ATen converters, keyed by op overload name ("aten.add.Tensor")."""
from __future__ import annotations

from typing import Callable, Optional

import torch

CONVERTERS: dict[str, Callable] = {}


def op_key(target) -> str:
    """The registry key of a torch op overload, or of its name written as a string."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = ", ".join(f"{target._qualified_op_name.replace('::', '.')}.{o}" for o in target.overloads())
        raise TypeError(f"register a converter for one overload, not the packet {target}; "
                        f"its overloads are: {overloads}")
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, str):
        resolve_op(target)
        return target
    raise TypeError(f"a converter target is a torch op overload such as torch.ops.aten.add.Tensor or its name "
                    f"'aten.add.Tensor', got {target!r}")


def resolve_op(name: str):
    """The OpOverload named ``ns.op.overload``; a typo is an error at registration, not a silent miss."""
    parts = name.split(".")
    if len(parts) != 3:
        raise ValueError(f"op name {name!r} must be 'namespace.op.overload', e.g. 'aten.add.Tensor' "
                         f"(use 'default' for the unnamed overload)")
    ns, op, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise ValueError(f"no torch op overload named {name!r}") from None


def register_converter(target, fn: Optional[Callable] = None, *, replace: bool = False):
    """Register ``fn`` as the converter of one torch op overload; usable as a decorator.

    ``target`` is the overload (``torch.ops.aten.sign.default``) or its name (``"aten.sign.default"``).
    Registering an op that already has a converter is an error unless ``replace=True``.

    A converter is called as ``fn(ctx, *args, **kwargs)`` with the torch node's arguments, where tensors
    are already IR Values, SymInts are IR dims (ints or sympy expressions over batch/seq) and lists are
    converted element by element. It returns the result Value (a tuple of Values for multi-result ops).
    ``ctx`` knows the torch node (``ctx.node``), its result type (``ctx.out_type()``, ``ctx.out_dtype``)
    and builds IR with ``ctx.emit(op, inputs, **attrs)``, ``ctx.const(value, dtype)`` and
    ``ctx.cast(value, dtype)``; every node it emits carries the source location of the torch node.

    Example -- torch.sign as (x > 0) - (x < 0)::

        from llmasos.frontends import register_converter

        @register_converter("aten.sign.default")
        def sign(ctx, x):
            zero = ctx.const(0, x.type.dtype)
            pos = ctx.cast(ctx.emit("gt", [x, zero]), x.type.dtype)
            neg = ctx.cast(ctx.emit("lt", [x, zero]), x.type.dtype)
            return ctx.emit("sub", [pos, neg])
    """
    key = op_key(target)

    def deco(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"the converter of {key} must be callable, got {f!r}")
        if key in CONVERTERS and not replace:
            old = CONVERTERS[key]
            raise ValueError(f"{key} already has a converter ({getattr(old, '__module__', '?')}."
                             f"{getattr(old, '__qualname__', old)}); pass replace=True to override it")
        CONVERTERS[key] = f
        return f

    return deco if fn is None else deco(fn)


def unregister_converter(target) -> Optional[Callable]:
    """Remove and return the converter of ``target`` (None if it had none)."""
    return CONVERTERS.pop(op_key(target), None)


def converter(*targets: str):
    """Internal decorator: one built-in converter for several overloads."""
    def deco(f: Callable) -> Callable:
        for t in targets:
            register_converter(t, f)
        return f
    return deco
