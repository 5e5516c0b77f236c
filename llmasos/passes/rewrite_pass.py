"""Passes that run rewrite rules: ``rewrite`` (any ``.rw`` file) and ``canonicalize`` (the shipped exact rules).

    llmasos opt -p 'canonicalize,dce' model.llir
    llmasos opt -p 'rewrite{rules="my_rules.rw",max_rewrites=100}' model.llir   # or rules=canonicalize

``rules`` is a path to a ``.rw`` file or the name of a rule set shipped in ``llmasos/passes/rules/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, PassError, register_pass
from .rewrite import RewriteError, RuleError, RuleSet, load_rules, rewrite

RULES_DIR = Path(__file__).parent / "rules"
# Parsed rule files by (path, mtime): a pipeline run per test case must not re-run lark every time.
_CACHE: dict[tuple, RuleSet] = {}


def shipped_rule_sets() -> list[str]:
    return sorted(p.stem for p in RULES_DIR.glob("*.rw"))


def resolve_rules(pass_name: str, rules: str) -> Path:
    """A shipped rule-set name (no '/' and no '.rw') or a path; PassError names the path it tried."""
    if "/" not in rules and "\\" not in rules and not rules.endswith(".rw"):
        path = RULES_DIR / f"{rules}.rw"
        if not path.is_file():
            raise PassError(pass_name, f"no shipped rule set '{rules}' ({path} does not exist); "
                                       f"shipped: {', '.join(shipped_rule_sets()) or '(none)'}")
        return path
    path = Path(rules)
    if not path.is_file():
        raise PassError(pass_name, f"rule file {path} does not exist")
    return path


def load_rule_set(pass_name: str, rules: str) -> RuleSet:
    path = resolve_rules(pass_name, rules)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _CACHE:
        try:
            _CACHE[key] = load_rules(path)
        except RuleError as e:  # RuleSyntaxError included: its text carries file:line:column and a caret
            raise PassError(pass_name, str(e)) from e
    return _CACHE[key]


def apply_rule_set(pass_name: str, graph: Graph, rules: str, max_rewrites: int) -> Graph:
    rule_set = load_rule_set(pass_name, rules)
    try:
        res = rewrite(graph, rule_set, max_rewrites=max_rewrites)
    except RewriteError as e:
        raise PassError(pass_name, str(e)) from e
    return graph if not res.stats else res.graph  # unchanged: hand back the input, as passes do


@register_pass("rewrite")
@dataclass(frozen=True)
class Rewrite(Pass):
    """User rules can be anything (reassociation, approximations), so this pass is held to a tolerance."""

    rules: str = "canonicalize"
    max_rewrites: int = 10_000

    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-5
    atol: ClassVar[float] = 1e-6

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        return apply_rule_set(self.pass_name, graph, self.rules, self.max_rewrites)


@dataclass(frozen=True)
class ShippedRules(Pass):
    """Base of a pass that runs one rule set shipped in rules/ (named by ``rules``) to a fixed point."""

    max_rewrites: int = 10_000

    rules: ClassVar[str] = ""

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        return apply_rule_set(self.pass_name, graph, self.rules, self.max_rewrites)


@register_pass("canonicalize")
@dataclass(frozen=True)
class Canonicalize(ShippedRules):
    """The shipped rules/canonicalize.rw: every rule in it is bit-exact (see the file for what is left out)."""

    rules: ClassVar[str] = "canonicalize"
    exact: ClassVar[bool] = True
