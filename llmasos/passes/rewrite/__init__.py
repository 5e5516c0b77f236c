"""The rewrite engine: one Rule type from text (``.rw``), Python combinators or traced functions.

    from llmasos.passes.rewrite import apply_rules, parse_rules
    rules = parse_rules("rule double: add(x, x) => mul(x, 2.0)")
    g2 = apply_rules(g, rules)          # a rewritten clone; g is untouched
"""
from .engine import RewriteResult, RuleSet, apply_rules, first_match, rewrite
from .explain import explain
from .lang import RuleSyntaxError, load_rules, parse_rules
from .pattern import Alt, AttrVar, Choice, Const, Failure, Op, Pattern, Var, attr, bind, const, match, one_of, op, var
from .rule import ATTR_FUNCTIONS, Builder, Decline, Pick, RewriteError, Rule, RuleError, Template
from .traced import ops, trace, traced_rule

__all__ = ["ATTR_FUNCTIONS", "Alt", "AttrVar", "Builder", "Choice", "Const", "Decline", "Failure", "Op", "Pattern", "Pick",
           "RewriteError", "RewriteResult",
           "Rule", "RuleError", "RuleSet", "RuleSyntaxError", "Template", "Var", "apply_rules", "attr", "bind", "const",
           "explain", "first_match", "load_rules", "match", "one_of", "op", "ops", "parse_rules", "rewrite", "trace",
           "traced_rule", "var"]
