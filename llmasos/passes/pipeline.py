"""Pipeline strings: ``"dce,cse"``, ``"quantize{bits=4,group=128},fuse"``.

    pipeline := [item (',' item)*]
    item     := NAME ['{' [option (',' option)*] '}']
    option   := KEY '=' value
    value    := int | float | true | false | "quoted string" | bare-word

A hand-written scanner rather than a grammar: every error points at one character, and the option
values are checked against the pass's dataclass fields right where they are read.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Union

from .base import Pass, UnknownPassError, fits_kind, kind_name, unwrap_optional, get_pass, option_types

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.\-])")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


class PipelineError(ValueError):
    """A bad pipeline string; ``column`` is 1-based and the message carries a caret line under it."""

    def __init__(self, msg: str, text: str, column: int):
        self.msg, self.text, self.column = msg, text, column
        caret = " " * (column - 1) + "^"
        super().__init__(f"pipeline: column {column}: {msg}\n  {text}\n  {caret}")


PipelineSpec = Union[str, Pass, type, Iterable[Union[str, Pass, type]]]


def parse_pipeline(spec: PipelineSpec) -> list[Pass]:
    """Pass instances from a pipeline string, or from a list of Pass instances, classes and strings."""
    if isinstance(spec, str):
        return _Scanner(spec).pipeline()
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, type) and issubclass(spec, Pass):
        return [spec()]
    out: list[Pass] = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            out.extend(_Scanner(item).pipeline())
        elif isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, type) and issubclass(item, Pass):
            out.append(item())
        else:
            raise TypeError(f"pipeline item {i} is {item!r}: expected a Pass, a Pass class or a pipeline string")
    return out


def format_pipeline(passes: Iterable[Pass]) -> str:
    """The string ``parse_pipeline`` reads back into equal passes."""
    return ",".join(str(p) for p in passes)


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, msg: str, at: int | None = None) -> PipelineError:
        return PipelineError(msg, self.text, (self.i if at is None else at) + 1)

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def found(self) -> str:
        c = self.peek()
        return f"'{c}'" if c else "the end of the pipeline"

    def expect(self, c: str, what: str) -> None:
        self.skip_ws()
        if self.peek() != c:
            raise self.error(f"expected {what}, found {self.found()}")
        self.i += 1

    def pipeline(self) -> list[Pass]:
        self.skip_ws()
        if self.i == len(self.text):
            return []
        out = [self.item()]
        while True:
            self.skip_ws()
            if self.i == len(self.text):
                return out
            self.expect(",", "',' between passes")
            out.append(self.item())

    def item(self) -> Pass:
        self.skip_ws()
        m = _NAME.match(self.text, self.i)
        if not m:
            raise self.error(f"expected a pass name, found {self.found()}")
        name_at, name = self.i, m.group()
        self.i = m.end()
        try:
            cls = get_pass(name)
        except UnknownPassError as e:
            raise self.error(str(e), name_at) from None
        kinds = option_types(cls)
        opts: dict[str, Any] = {}
        self.skip_ws()
        if self.peek() == "{":
            self.i += 1
            self.skip_ws()
            if self.peek() == "}":
                self.i += 1
            else:
                while True:
                    self.option(name, kinds, opts)
                    self.skip_ws()
                    if self.peek() == "}":
                        self.i += 1
                        break
                    self.expect(",", f"',' or '}}' in the options of '{name}'")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in opts
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise self.error(f"pass '{name}' needs option(s) {', '.join(missing)}", name_at)
        try:
            return cls(**opts)
        except (TypeError, ValueError) as e:
            raise self.error(f"pass '{name}': {e}", name_at) from None

    def option(self, pass_name: str, kinds: dict, opts: dict) -> None:
        self.skip_ws()
        key_at = self.i
        m = _NAME.match(self.text, self.i)
        if not m:
            raise self.error(f"expected an option name, found {self.found()}")
        key = m.group()
        if key not in kinds:
            known = ", ".join(kinds) if kinds else "none"
            raise self.error(f"pass '{pass_name}' has no option '{key}' (its options: {known})", key_at)
        if key in opts:
            raise self.error(f"option '{key}' of pass '{pass_name}' is given twice", key_at)
        self.i = m.end()
        self.expect("=", f"'=' after option '{key}'")
        self.skip_ws()
        value_at = self.i
        value, word = self.value()
        kind = kinds[key]
        base, _ = unwrap_optional(kind)
        if base is str and word is not None and word != "none":
            value = word  # a str option reads bare words literally: mode=inf is the string 'inf'
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not fits_kind(value, kind):
            raise self.error(f"option '{key}' of pass '{pass_name}' takes {kind_name(kind)}, "
                             f"got {self.text[value_at:self.i]}", value_at)
        opts[key] = value

    def value(self) -> tuple[Any, Any]:
        """(value, the bare word it was written as, or None)."""
        t = self.text
        if self.peek() == '"':
            m = _STRING.match(t, self.i)
            if not m:
                raise self.error("unterminated string")
            self.i = m.end()
            return re.sub(r"\\(.)", r"\1", m.group(1)), None
        m = _NUMBER.match(t, self.i)
        if m:
            self.i = m.end()
            s = m.group()
            return (float(s) if any(c in s for c in ".eE") else int(s)), None
        m = _WORD.match(t, self.i)
        if m:
            self.i = m.end()
            w = m.group()
            return {"true": True, "false": False, "none": None, "inf": float("inf"),
                    "nan": float("nan")}.get(w, w), w
        raise self.error(f"expected a value (number, true/false, word or \"string\"), found {self.found()}")
