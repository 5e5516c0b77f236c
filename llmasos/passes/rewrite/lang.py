"""The text rule language (``.rw`` files), parsed with lark (``rules.lark``).

    # comments with '#' or '//'
    rule double: add(x, x) => mul(x, 2.0)
    rule mul-one: mul(x, 1.0) => x where shape(x) == shape(root)
    rule reshape2: reshape(reshape(x)){shape=s} => reshape(x){shape=s}
    rule perm2: permute(permute(x){perm=p}){perm=q} => permute(x){perm=compose(p, q)}
    rule bias-gelu: gelu(add(matmul(x, w), b)) => ... where rank(b) == 1 and dtype(x) == f32

    rule add-rms: rms_norm(s@add(x, r), w){eps=e} => fused.add_rms_norm(x, r, w){eps=e} -> (root, s)
    rule second: neg(split(x){axis=a}[1]) => ...

    # alternation: of whole patterns (|), of ops ((silu|relu)) and of attribute values (("none"|"tanh"));
    # NAME:(...) names the alternative that matched, for the replacement: f(...) is that op, {act=f} that
    # value, g:(a|b) maps it by position (the i-th alternative of the pattern's g gives the i-th here)
    rule bias: add(y@g:(linear|matmul)(x, w), b) | add(b, y@g:(linear|matmul)(x, w)) => g:(fused.linear_act|fused.matmul_act)(x, w, b)
    rule act: f:(silu|relu)(y@linear(x, w)) => fused.linear_act(x, w){act=f}
    rule gelu: gelu(y@linear(x, w)){approximate=a:("none"|"tanh")} => fused.linear_act(x, w){act=a:("gelu"|"gelu_tanh")}

In patterns a bare name is a variable (``_`` matches anything), a number is an inline constant whose every
element equals it (the number rounded to the constant's dtype), ``op(a, b){k=v}`` / ``op(a, b, k=v)`` an op
with attributes, ``op(...)[i]`` result ``i`` of a multi-result op, ``s@op(...)`` also binds the op's value
as ``s``; an attribute value that is a bare name (not a dtype, true/false/none) binds the attribute. In
replacements names refer to what the pattern bound, numbers become scalar constants of their sibling
operand's dtype and ``op(...)[i]`` picks a result. ``-> (root, s)`` makes the replacement one op whose
results replace root and s. Constraints use ``rank(v)``, ``dtype(v)``, ``shape(v)``, ``shape(v)[i]``,
``numel(v)``, ``value(v)`` (an all-equal constant's scalar, else none), ``users(v)``, bound attribute names,
numbers, lists, dtypes, ``+ -``, ``== != < <= > >=``, ``and``/``or``/``not``; ``root`` is the matched value.
An alternation name is usable in constraints like a bound attribute (``where g == "linear"``).
Replacement attributes may apply a function from ``ATTR_FUNCTIONS`` (``compose(p, q)``: two permutations as
one; ``value(v)``: an all-equal constant's scalar, declining the rewrite for anything else).

Errors: ``RuleSyntaxError`` (line, column, caret) for malformed text; ``RuleError`` naming the rule and its
file:line:column for unknown ops, unbound names, bad arity/attrs and replacements of the wrong type.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from pathlib import Path
from typing import Any, Optional

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput

from llmasos.ir import DType, OpError, get_op

from .engine import RuleSet
from .pattern import Alt, AttrVar, Choice, Const, Op, Var, const_scalar
from .rule import ATTR_FUNCTIONS, AttrCall, Pick, Rule, RuleError, Template, TConst, TOp, TVar, check_ops


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
              "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "COLON": "':'", "VBAR": "'|'",
              "__ANON_0": "'=>'", "$END": "end of input"}


def _end(text: str) -> tuple:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


class _Loader:
    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.rule_name = "?"
        self.attr_names: set = set()
        self.choices: dict = {}  # name -> (Choice, "op" | "attr") named in the current rule's pattern

    def err(self, msg: str, tok) -> RuleError:
        line, col = _pos(tok)
        return RuleError(f"rule '{self.rule_name}' ({self.filename}:{line}:{col}): {msg}"
                         f"{_caret(self.text, line, col)}")

    def rule(self, t: Tree) -> Rule:
        name_tok, pat_t, rep_t, *rest = t.children
        self.rule_name = str(name_tok)
        self.choices = {}
        source = f"{self.filename}:{name_tok.line}:{name_tok.column}"
        alternatives = []
        for p_t in pat_t.children:
            p = self.pattern(p_t)
            if not isinstance(p, Op):
                raise self.err(f"the pattern root must be an op, got `{p}`", p_t)
            alternatives.append(p)
        pattern = alternatives[0] if len(alternatives) == 1 else Alt(tuple(alternatives))
        clash = sorted(set(self.choices) & _value_names(pattern))
        if clash:
            raise self.err(f"{clash[0]!r} names an alternation and is bound as a value or attribute too; "
                           f"use another name", pat_t)
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
            return dataclasses.replace(inner, name=str(name_tok))
        op_t, args, attrs, index = self.call_parts(t)
        op_tok = _op_token(op_t)
        if op_t.data == "op_name":
            ops = [self.known_op(op_tok)]
            op = ops[0].name
        else:
            op = self.choice(op_t, [self.known_op(tok) for tok in op_t.children[1:]], "op")
            ops = [get_op(o) for o in op.options]
        for d in ops:
            self.check_attr_names(d, attrs, op_tok)
            problem = d.arity_error(len(args))
            if problem:
                raise self.err(f"pattern op {d.name} {problem}", op_tok)
        values = {k: self.attr_value(v, bind=True) for k, v in attrs.items()}
        for k, v in values.items():
            for d in ops if isinstance(v, Choice) else ():
                for i, o in enumerate(v.options):  # one the attribute can never take would silently never match
                    problem = d.attrs[k].check(o)
                    if problem:
                        raise self.err(f"attribute {k} of {d.name}: alternative {_shown_literal(o)} {problem}",
                                       attrs[k].children[1 + i])
        return Op(op, tuple(self.pattern(a) for a in args), values, result=index)

    def known_op(self, tok):
        try:
            return get_op(str(tok))
        except OpError as e:
            raise self.err(str(e), tok) from None

    def choice(self, t: Tree, options: list, kind: str) -> Choice:
        """A pattern alternation ``[name:](a|b|...)`` over ``options`` (op names or attribute values)."""
        name_tok, *opt_ts = t.children
        values = [d.name for d in options] if kind == "op" else options
        for i, v in enumerate(values):
            if any(_same_literal(v, w) for w in values[:i]):
                raise self.err(f"the alternation lists {v if kind == 'op' else _shown_literal(v)} twice", opt_ts[i])
        c = Choice(tuple(values), str(name_tok) if name_tok is not None else None)
        if c.name is not None:
            if c.name in ("_", "root"):
                raise self.err(f"cannot name an alternation {c.name!r}; pick another name", name_tok)
            if kind == "op" and _is_op(c.name):
                raise self.err(f"cannot name an op alternation {c.name!r}: that is an op, and a replacement "
                               f"{c.name}(...) would be ambiguous", name_tok)
            seen = self.choices.get(c.name)
            if seen is not None and (seen[1] != kind or len(seen[0].options) != len(values) or not all(
                    _same_literal(a, b) for a, b in zip(seen[0].options, values))):
                raise self.err(f"{c.name} names two different alternations ({seen[0].text(seen[1] == 'op')} and "
                               f"{c.text(kind == 'op')}); one name, one alternation", name_tok)
            self.choices[c.name] = (c, kind)
        return c

    def pick(self, t: Tree, values: list, kind: str, bound) -> Pick:
        """A replacement ``name:(a|b|...)``: the alternative at the position of the one ``name`` matched."""
        name_tok, *opt_ts = t.children
        shown = "(" + "|".join(str(v) if kind == "op" else _shown_literal(v) for v in values) + ")"
        if name_tok is None:
            raise self.err(f"a replacement cannot choose on its own: write NAME:{shown}, NAME an alternation "
                           f"of the pattern, to take the alternative at the position of the one NAME matched",
                           opt_ts[0])
        source = self.choices.get(str(name_tok))
        if source is not None and str(name_tok) not in bound:
            raise self.err(f"{str(name_tok)!r} is not bound by the pattern (not by every alternative)", name_tok)
        if source is None:
            raise self.err(f"{str(name_tok)}:{shown} picks by the alternative {str(name_tok)!r} matched, but the "
                           f"pattern names no alternation {str(name_tok)!r}"
                           f"{_hint(str(name_tok), self.choices) if self.choices else ' (it names none)'}", name_tok)
        if len(source[0].options) != len(values):
            raise self.err(f"{str(name_tok)}:{shown} has {len(values)} alternatives but the pattern's "
                           f"{source[0].text(source[1] == 'op')} has {len(source[0].options)}; they pair up by "
                           f"position", name_tok)
        return Pick(str(name_tok), source[0].options, tuple(values), ops=kind == "op")

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

    def attr_value(self, t, bind: bool, bound: frozenset = frozenset(), whole: bool = True):
        if t.data == "a_num":
            return _num(t.children[0])
        if t.data == "a_str":
            return _string(t.children[0])
        if t.data == "a_list":
            return [self.attr_value(c, bind, bound, False) for c in t.children if c is not None]
        if t.data == "a_call":
            fn, *args = t.children
            if bind:
                raise self.err("attribute functions are for replacements; a pattern binds a name", fn)
            if str(fn) not in ATTR_FUNCTIONS:
                raise self.err(f"unknown attribute function {str(fn)!r}; known: {', '.join(ATTR_FUNCTIONS)}", fn)
            return AttrCall(str(fn), tuple(self.attr_value(a, bind, bound, False) for a in args if a is not None))
        if t.data == "a_choice":
            if not whole:
                raise self.err("an alternation is a whole attribute value, not part of a list or call", t)
            values = [self.literal(c) for c in t.children[1:]]
            return self.choice(t, values, "attr") if bind else self.pick(t, values, "attr", bound)
        name = str(t.children[0])
        if name in LITERAL_NAMES:
            return LITERAL_NAMES[name]
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        if not bind and name not in bound:
            raise self.err(f"attribute value {name!r} is not bound by the pattern"
                           f"{_hint(name, bound)}", t.children[0])
        return AttrVar(name)

    def literal(self, t):
        """An alternative of an attribute alternation: a number, a string, a dtype, true/false/none."""
        if t.data in ("a_num", "a_str"):
            return self.attr_value(t, bind=True)
        tok = t.children[0] if t.children and t.children[0] is not None else t
        if t.data == "a_name" and str(tok) in LITERAL_NAMES:
            return LITERAL_NAMES[str(tok)]
        if t.data == "a_name" and str(tok) in DTYPE_NAMES:
            return DTYPE_NAMES[str(tok)]
        raise self.err(f"alternatives are literals (numbers, strings, dtypes, true/false/none), got `"
                       f"{_src(self.text, t) if isinstance(t, Tree) else tok}`", tok)

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
        op_t, args, attrs, index = self.call_parts(t)
        op_tok = _op_token(op_t)
        if op_t.data == "op_choice":
            op = self.pick(op_t, [self.known_op(tok).name for tok in op_t.children[1:]], "op", bound)
        elif str(op_tok) in self.choices:  # f(...): the op the pattern's alternation f matched
            c, kind = self.choices[str(op_tok)]
            if str(op_tok) not in bound:
                raise self.err(f"{str(op_tok)!r} is not bound by the pattern (not by every alternative)", op_tok)
            if kind != "op":
                raise self.err(f"{str(op_tok)}(...): {str(op_tok)} names an alternation of attribute values "
                               f"{c.text()}, not of ops; map it to ops with {str(op_tok)}:(op1|op2|...)(...)",
                               op_tok)
            op = Pick(str(op_tok), c.options, None, ops=True)
        else:
            op = self.known_op(op_tok).name
        return TOp(op, tuple(self.replacement(a, bound) for a in args),
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
    """Names the pattern binds to attribute values or alternatives (usable bare in constraints); with
    alternatives, those every one binds."""
    if isinstance(p, Alt):
        return set.intersection(*(_attr_names(o) for o in p.options))
    if isinstance(p, Op):
        out = {a.name for a in p.attrs.values() if isinstance(a, (AttrVar, Choice)) and a.name}
        if isinstance(p.op, Choice) and p.op.name:
            out.add(p.op.name)
        for a in p.args:
            out |= _attr_names(a)
        return out
    return set()


def _value_names(p) -> set:
    """Names bound to values (variables, @) or to attributes (not alternations)."""
    if isinstance(p, Alt):
        return set().union(*(_value_names(o) for o in p.options))
    if isinstance(p, Var):
        return p.var_names()
    if isinstance(p, Const):
        return {p.name} if p.name else set()
    if isinstance(p, Op):
        out = {a.name for a in p.attrs.values() if isinstance(a, AttrVar)} | ({p.name} if p.name else set())
        for a in p.args:
            out |= _value_names(a)
        return out
    return set()


def _op_token(op_t: Tree):
    """The token an op position's errors point at: the op name, or the alternation's name (else first op)."""
    return next(c for c in op_t.children if c is not None)


def _is_op(name: str) -> bool:
    try:
        get_op(name)
        return True
    except OpError:
        return False


def _same_literal(a, b) -> bool:
    return type(a) is type(b) and a == b


def _shown_literal(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


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
    return json.loads(str(tok))


def _hint(name: str, bound) -> str:
    close = difflib.get_close_matches(name, sorted(bound), n=2)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        (f" (it binds {', '.join(sorted(bound))})" if bound else "")
