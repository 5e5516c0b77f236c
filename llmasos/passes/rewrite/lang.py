"""The text rule language (``.rw`` files), parsed with lark (``rules.lark``).

    # comments with '#' or '//'
    rule double: add(x, x) => mul(x, 2.0)
    rule mul-one: mul(x, 1.0) => x where shape(x) == shape(root)
    rule reshape2: reshape(reshape(x)){shape=s} => reshape(x){shape=s}
    rule perm2: permute(permute(x){perm=p}){perm=q} => permute(x){perm=compose(p, q)}
    rule bias-gelu: gelu(add(matmul(x, w), b)) => ... where rank(b) == 1 and dtype(x) == f32

    rule add-rms: rms_norm(s@add(x, r), w){eps=e} => fused.add_rms_norm(x, r, w){eps=e} -> (root, s)
    rule second: neg(split(x){axis=a}[1]) => ...

In patterns a bare name is a variable (``_`` matches anything), a number is an inline constant whose every
element equals it (the number rounded to the constant's dtype), ``op(a, b){k=v}`` / ``op(a, b, k=v)`` an op
with attributes, ``op(...)[i]`` result ``i`` of a multi-result op, ``s@op(...)`` also binds the op's value
as ``s``; an attribute value that is a bare name (not a dtype, true/false/none) binds the attribute. In
replacements names refer to what the pattern bound, numbers become scalar constants of their sibling
operand's dtype and ``op(...)[i]`` picks a result. ``-> (root, s)`` makes the replacement one op whose
results replace root and s. Constraints use ``rank(v)``, ``dtype(v)``, ``shape(v)``, ``shape(v)[i]``,
``numel(v)``, ``value(v)`` (an all-equal constant's scalar, else none), ``users(v)``, bound attribute names,
numbers, lists, dtypes, ``+ -``, ``== != < <= > >=``, ``and``/``or``/``not``; ``root`` is the matched value.
Replacement attributes may apply a function from ``ATTR_FUNCTIONS`` (``compose(p, q)``: two permutations as
one; ``value(v)``: an all-equal constant's scalar, declining the rewrite for anything else).

Errors: ``RuleSyntaxError`` (line, column, caret) for malformed text; ``RuleError`` naming the rule and its
file:line:column for unknown ops, unbound names, bad arity/attrs and replacements of the wrong type.
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Optional

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput

from llmasos.ir import DType, OpError, get_op

from .engine import RuleSet
from .pattern import AttrVar, Const, Op, Var, const_scalar
from .rule import ATTR_FUNCTIONS, AttrCall, Rule, RuleError, Template, TConst, TOp, TVar, check_ops


def _caret(text: str, line: int, column: int) -> str:
    lines = text.split("\n")
    src = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
    return f"\n  {src}\n  " + "".join(c if c == "\t" else " " for c in src[:column - 1]) + "^"


class RuleSyntaxError(RuleError):
    """Malformed rule text; ``line``/``column`` are 1-based and the message shows a caret."""

    def __init__(self, msg: str, text: str, line: int, column: int, filename: str = "<rules>"):
        self.msg, self.line, self.column, self.filename = msg, line, column, filename
        super().__init__(f"{filename}:{line}:{column}: {msg}{_caret(text, line, column)}")


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark((Path(__file__).parent / "rules.lark").read_text(), parser="lalr", lexer="contextual",
                propagate_positions=True)


DTYPE_NAMES = {d.value if isinstance(d.value, str) else str(d): d for d in DType}
LITERAL_NAMES = {"true": True, "false": False, "none": None}
FUNCTIONS = ("rank", "dtype", "shape", "numel", "value", "users")


def parse_rules(text: str, filename: str = "<rules>", name: Optional[str] = None) -> RuleSet:
    """Rules from text; each is checked against the op registry and type-probed at load."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        tok = getattr(e, "token", None)
        if tok is not None and getattr(tok, "type", "") == "$END":
            what = "unexpected end of input"
        elif tok is not None:
            what = f"unexpected {str(tok)!r}"
        else:
            what = f"unexpected character {text[e.pos_in_stream]!r}" if e.pos_in_stream is not None \
                and e.pos_in_stream < len(text) else "unexpected input"
        exp = sorted({_TERMINALS.get(n, n) for n in (getattr(e, "expected", None) or
                                                      getattr(e, "allowed", None) or [])})
        hint = f"; expected {' or '.join(exp)}" if exp else ""
        at_end = tok is not None and getattr(tok, "type", "") == "$END"
        line, col = (e.line, e.column) if e.line and e.line > 0 and not at_end else _end(text)
        raise RuleSyntaxError(what + hint, text, line, col, filename) from None
    rules = [_Loader(text, filename).rule(r) for r in tree.children]
    seen: dict = {}
    for r in rules:
        if r.name in seen:
            raise RuleError(f"rule '{r.name}' ({r.source}) is defined twice; first at {seen[r.name]}")
        seen[r.name] = r.source
    return RuleSet(rules, name or Path(filename).stem)


def load_rules(path) -> RuleSet:
    path = Path(path)
    return parse_rules(path.read_text(), str(path), path.stem)


_TERMINALS = {"IDENT": "a name", "SIGNED_NUMBER": "a number", "SIGNED_INT": "an integer", "STRING": "a string",
              "RULE": "'rule'", "RULE_NAME": "a rule name", "CMPOP": "a comparison",
              "ADDOP": "'+' or '-'", "AND": "'and'", "OR": "'or'",
              "NOT": "'not'", "WHERE": "'where'", "ASSIGN": "'='", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
              "RSQB": "']'", "AT": "'@'", "RESULTS": "'->'", "INT": "an integer",
              "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "COLON": "':'",
              "__ANON_0": "'=>'", "$END": "end of input"}


def _end(text: str) -> tuple:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


class _Loader:
    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.rule_name = "?"
        self.attr_names: set = set()

    def err(self, msg: str, tok) -> RuleError:
        line, col = _pos(tok)
        return RuleError(f"rule '{self.rule_name}' ({self.filename}:{line}:{col}): {msg}"
                         f"{_caret(self.text, line, col)}")

    def rule(self, t: Tree) -> Rule:
        name_tok, pat_t, rep_t, *rest = t.children
        self.rule_name = str(name_tok)
        source = f"{self.filename}:{name_tok.line}:{name_tok.column}"
        pattern = self.pattern(pat_t)
        if not isinstance(pattern, Op):
            raise self.err(f"the pattern root must be an op, got `{pattern}`", pat_t)
        bound = pattern.var_names()
        self.attr_names = _attr_names(pattern)
        results_t = next((r for r in rest if isinstance(r, Tree) and r.data == "results"), None)
        cond_t = next((r for r in rest if r is not None and r is not results_t), None)
        results = None
        if results_t is not None:
            results = tuple(str(n) for n in results_t.children[1:])
            for tok in results_t.children[1:]:
                if str(tok) != "root" and str(tok) not in bound:
                    raise self.err(f"result list names {str(tok)!r}, which the pattern does not bind"
                                   f"{_hint(str(tok), bound)}", tok)
            rep = self.replacement(rep_t, bound)
            if not isinstance(rep, TOp) or rep.result is not None:
                raise self.err(f"with a result list the replacement must be one op call giving all "
                               f"{len(results)} results, got `{rep}`", rep_t)
        tmpl = Template(self.replacement(rep_t, bound), multi=results is not None)
        constraint = _Cond(self.cond(cond_t, bound), _src(self.text, cond_t)) if cond_t is not None else None
        try:
            check_ops(self.rule_name, tmpl)
        except RuleError as e:
            raise self.err(str(e).split(": ", 1)[1], rep_t) from None
        rule = Rule(self.rule_name, pattern, tmpl, constraint, source, results)
        return rule

    # -- patterns --------------------------------------------------------------------------------
    def pattern(self, t):
        if t.data == "name":
            return Var(str(t.children[0]))
        if t.data == "literal":
            return Const(_num(t.children[0]))
        if t.data == "bind":
            name_tok, call = t.children
            if str(name_tok) in ("_", "root"):
                raise self.err(f"cannot bind {str(name_tok)!r} with @; pick another name", name_tok)
            inner = self.pattern(call)
            return Op(inner.op, inner.args, inner.attrs, inner.commutative, str(name_tok), inner.result)
        op_tok, args, attrs, index = self.call_parts(t)
        try:
            d = get_op(str(op_tok))
        except OpError as e:
            raise self.err(str(e), op_tok) from None
        self.check_attr_names(d, attrs, op_tok)
        problem = d.arity_error(len(args))
        if problem:
            raise self.err(f"pattern op {d.name} {problem}", op_tok)
        return Op(str(op_tok), tuple(self.pattern(a) for a in args),
                  {k: self.attr_value(v, bind=True) for k, v in attrs.items()}, result=index)

    def call_parts(self, t: Tree):
        op_tok, *items = t.children
        args, attrs, index = [], {}, None
        for it in items:
            if it is None:
                continue
            if isinstance(it, Tree) and it.data == "index":
                index = int(it.children[0])
            elif isinstance(it, Tree) and it.data == "kwattr":
                attrs[str(it.children[0])] = it.children[-1]
            elif isinstance(it, Tree) and it.data == "attrs":
                for a in it.children:
                    if a is not None:
                        attrs[str(a.children[0])] = a.children[-1]
            else:
                if attrs:
                    raise self.err("operands must come before keyword attributes", it)
                args.append(it)
        return op_tok, args, attrs, index

    def check_attr_names(self, d, attrs: dict, tok) -> None:
        unknown = sorted(set(attrs) - set(d.attrs))
        if unknown:
            raise self.err(f"op {d.name} has no attribute(s) {unknown}; it takes {sorted(d.attrs) or 'none'}", tok)

    def attr_value(self, t, bind: bool, bound: frozenset = frozenset()):
        if t.data == "a_num":
            return _num(t.children[0])
        if t.data == "a_str":
            return _string(t.children[0])
        if t.data == "a_list":
            return [self.attr_value(c, bind, bound) for c in t.children if c is not None]
        if t.data == "a_call":
            fn, *args = t.children
            if bind:
                raise self.err("attribute functions are for replacements; a pattern binds a name", fn)
            if str(fn) not in ATTR_FUNCTIONS:
                raise self.err(f"unknown attribute function {str(fn)!r}; known: {', '.join(ATTR_FUNCTIONS)}", fn)
            return AttrCall(str(fn), tuple(self.attr_value(a, bind, bound) for a in args if a is not None))
        name = str(t.children[0])
        if name in LITERAL_NAMES:
            return LITERAL_NAMES[name]
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        if not bind and name not in bound:
            raise self.err(f"attribute value {name!r} is not bound by the pattern"
                           f"{_hint(name, bound)}", t.children[0])
        return AttrVar(name)

    # -- replacements ----------------------------------------------------------------------------
    def replacement(self, t, bound: set):
        if t.data == "name":
            tok = t.children[0]
            if str(tok) not in bound:
                raise self.err(f"{str(tok)!r} is not bound by the pattern{_hint(str(tok), bound)}", tok)
            return TVar(str(tok), _pos(tok))
        if t.data == "literal":
            return TConst(_num(t.children[0]), _pos(t))
        if t.data == "bind":
            raise self.err("'@' binds values in patterns; a replacement refers to them by name", t.children[0])
        op_tok, args, attrs, index = self.call_parts(t)
        try:
            get_op(str(op_tok))
        except OpError as e:
            raise self.err(str(e), op_tok) from None
        return TOp(str(op_tok), tuple(self.replacement(a, bound) for a in args),
                   {k: self.attr_value(v, bind=False, bound=frozenset(bound)) for k, v in attrs.items()},
                   _pos(op_tok), index)

    # -- constraints -----------------------------------------------------------------------------
    def cond(self, t, bound: set):
        k = t.data
        if k in ("or_", "and_"):
            return (k, self.cond(t.children[0], bound), self.cond(t.children[1], bound))
        if k == "not_":
            return ("not", self.cond(t.children[0], bound))
        if k == "arith":
            return ("arith", str(t.children[1]), self.cond(t.children[0], bound), self.cond(t.children[2], bound))
        if k == "compare":
            return ("cmp", str(t.children[1]), self.cond(t.children[0], bound), self.cond(t.children[2], bound))
        if k == "fn":
            fn, arg, *idx = t.children
            if str(fn) not in FUNCTIONS:
                raise self.err(f"unknown function {str(fn)!r} in constraint; known: {', '.join(FUNCTIONS)}", fn)
            if str(arg) not in bound and str(arg) != "root":
                raise self.err(f"{str(arg)!r} is not bound by the pattern{_hint(str(arg), bound)}", arg)
            index = int(idx[0]) if idx and idx[0] is not None else None
            if index is not None and str(fn) != "shape":
                raise self.err("only shape(...) can be indexed", fn)
            return ("fn", str(fn), str(arg), index)
        if k == "c_num":
            return ("lit", _num(t.children[0]))
        if k == "c_str":
            return ("lit", _string(t.children[0]))
        if k == "c_list":
            return ("list", tuple(self.cond(c, bound) for c in t.children if c is not None))
        name = str(t.children[0])
        if name in DTYPE_NAMES:
            return ("lit", DTYPE_NAMES[name])
        if name in LITERAL_NAMES:
            return ("lit", LITERAL_NAMES[name])
        if name in self.attr_names:
            return ("attr", name)
        attrs = sorted(self.attr_names)
        raise self.err(f"unknown name {name!r} in constraint (use rank(v), dtype(v), shape(v)[i], "
                       f"numel(v), value(v), users(v), numbers, lists, dtypes or a bound attribute: "
                       f"{', '.join(attrs) if attrs else 'this pattern binds none'})", t.children[0])


class _Cond:
    """A compiled ``where`` clause: callable on bindings; ``describe`` shows each function's value."""

    def __init__(self, tree, text: str):
        self.tree, self.text = tree, text

    def __call__(self, m: dict) -> bool:
        return bool(self._eval(self.tree, m))

    def __str__(self):
        return self.text

    def describe(self, m: dict) -> str:
        parts: list = []
        self._leaves(self.tree, m, parts)
        return ", ".join(dict.fromkeys(parts))

    def _leaves(self, t, m, out):
        if t[0] == "fn":
            out.append(f"{_fn_str(t)} = {_show(self._safe(t, m))}")
        elif t[0] == "attr":
            out.append(f"{t[1]} = {_show(self._safe(t, m))}")
        elif t[0] == "list":
            for c in t[1]:
                self._leaves(c, m, out)
        elif t[0] != "lit":
            for c in t[1:]:
                if isinstance(c, tuple):
                    self._leaves(c, m, out)

    def _safe(self, t, m):
        try:
            return self._eval(t, m)
        except Exception as e:
            return f"<error: {e}>"

    def _eval(self, t, m: dict) -> Any:
        k = t[0]
        if k == "or_":
            return self._eval(t[1], m) or self._eval(t[2], m)
        if k == "and_":
            return self._eval(t[1], m) and self._eval(t[2], m)
        if k == "not":
            return not self._eval(t[1], m)
        if k == "lit":
            return t[1]
        if k == "attr":
            return m[t[1]]
        if k == "list":
            return [self._eval(c, m) for c in t[1]]
        if k == "arith":
            a, b = self._eval(t[2], m), self._eval(t[3], m)
            try:
                return a + b if t[1] == "+" else a - b
            except TypeError:  # none (value() of a non-constant) in arithmetic: the comparison is false
                return None
        if k == "fn":
            v = m[t[2]] if t[2] in m else m["$root"]
            if t[1] == "rank":
                return v.type.rank
            if t[1] == "dtype":
                return v.type.dtype
            if t[1] == "value":
                return const_scalar(v)
            if t[1] == "numel":
                n = 1
                for d in v.type.shape:
                    n = n * d
                return n
            if t[1] == "users":
                return count_users(m.get("$graph"), v)
            shape = tuple(v.type.shape)
            if t[3] is None:
                return shape
            # out of range reads as None, which compares false, so the rule just does not apply
            return shape[t[3]] if -len(shape) <= t[3] < len(shape) else None
        a, b = self._eval(t[2], m), self._eval(t[3], m)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # shapes are tuples, attrs lists
            a, b = tuple(a), tuple(b)
        try:
            return bool({"==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b,
                         "<=": lambda: a <= b, ">": lambda: a > b, ">=": lambda: a >= b}[t[1]]())
        except TypeError:  # a symbolic dim compared with an undecidable order
            return False


def count_users(g, v) -> int:
    """Uses of ``v``: node operands referring to it plus graph outputs."""
    if g is None:
        raise RuleError("users(v) needs the graph (bindings have no '$graph'; use first_match(rule, v, graph))")
    return sum(1 for u in v.uses if u.node.graph is g) + sum(1 for o in g.outputs if o is v)


def _attr_names(p) -> set:
    """Names the pattern binds to attribute values (usable bare in constraints)."""
    if isinstance(p, Op):
        out = {a.name for a in p.attrs.values() if isinstance(a, AttrVar)}
        for a in p.args:
            out |= _attr_names(a)
        return out
    return set()


def _fn_str(t) -> str:
    return f"{t[1]}({t[2]})" + (f"[{t[3]}]" if t[3] is not None else "")


def _show(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(str(d) for d in v) + "]"
    return str(v)


def _src(text: str, t: Tree) -> str:
    return text[t.meta.start_pos:t.meta.end_pos] if hasattr(t, "meta") and not t.meta.empty else "<where>"


def _pos(t) -> tuple:
    if isinstance(t, Token):
        return t.line, t.column
    if isinstance(t, Tree) and not t.meta.empty:
        return t.meta.line, t.meta.column
    return 0, 0


def _num(tok):
    while isinstance(tok, Tree):
        tok = tok.children[0]
    s = str(tok)
    return float(s) if any(c in s for c in ".eE") else int(s)


def _string(tok) -> str:
    import json
    return json.loads(str(tok))


def _hint(name: str, bound) -> str:
    close = difflib.get_close_matches(name, sorted(bound), n=2)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        (f" (it binds {', '.join(sorted(bound))})" if bound else "")
