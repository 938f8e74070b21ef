"""Rules stage: events + rules -> deliveries, rendered by templates.py. Pure apart from the memory
that throttles and digest windows need; the clock is passed in (`now`), so tests control time.
A rule is compiled once (`compiled.py`: the loader reports its problems, the router runs it);
`router.py` routes, explains and finds cancels in one evaluation; `memory.py` is what it remembers.
"""

from bridge.conditions import Condition, Matcher, Path, as_text, parse_matcher, parse_path
from bridge.rules.compiled import CompiledRule, RuleIssue, compile_rule
from bridge.rules.router import Match, Router

__all__ = [
    "CompiledRule",
    "Condition",
    "Match",
    "Matcher",
    "Path",
    "Router",
    "RuleIssue",
    "as_text",
    "compile_rule",
    "parse_matcher",
    "parse_path",
]
