"""docs/EVENTS.md lists every event the code logs and every event the metrics understand."""

from __future__ import annotations

import ast
import re

from kmsg_worker.observability.events import HANDLERS
from tests.conftest import ROOT

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def _event_names(node: ast.expr) -> list[str]:
    # A constant, or a conditional between constants ("circuit.opened" if ... else "circuit.closed").
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _event_names(node.body) + _event_names(node.orelse)
    return []


def logged_events() -> dict[str, str]:
    """Event name -> where it is logged, for every ``log.<level>("...")`` call in the packages."""
    found: dict[str, str] = {}
    for package in ("kmsg_worker", "tasks", "config"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "testing" in path.parts:
                continue  # the fake provider servers are test fixtures, not the product
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                    continue
                target = node.func.value
                if node.func.attr in LEVELS and isinstance(target, ast.Name) and "log" in target.id:
                    for name in _event_names(node.args[0]):
                        found.setdefault(name, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def documented() -> set[str]:
    return set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", (ROOT / "docs" / "EVENTS.md").read_text(encoding="utf-8")))


def test_every_logged_event_is_documented() -> None:
    events = logged_events()
    assert len(events) > 20, "the scan should find the pipeline's events"
    missing = {name: where for name, where in events.items() if name not in documented()}
    assert not missing, f"add these events to docs/EVENTS.md: {missing}"


def test_every_metric_event_is_documented() -> None:
    missing = sorted(set(HANDLERS) - documented())
    assert not missing, f"events mapped to metrics but not in docs/EVENTS.md: {missing}"


def test_event_names_are_dotted_snake_case() -> None:
    bad = [name for name in logged_events() if not re.fullmatch(r"[a-z]+(\.[a-z_]+)+", name)]
    assert not bad, bad
