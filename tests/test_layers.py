"""Task names come from one table (``kmsg_worker.dispatch.TASK_NAMES``); what import-linter cannot see.

``make lint`` checks the import layers and cycles; these tests check the names the code publishes
and registers by string, which no import graph shows.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from kmsg_worker.dispatch import TASK_NAMES
from tests.conftest import ROOT

#: Files that still spell a task name themselves (the delivery engine's tasks, being restructured on
#: another branch): each is to register its task with ``TASK_NAMES[...]`` and leave this list.
NOT_YET_FROM_THE_TABLE: set[str] = set()


def test_the_app_registers_exactly_the_tasks_of_the_table(tmp_path: Path) -> None:
    # A separate interpreter: loading the app connects its signal handlers process-wide.
    code = (
        "import json\n"
        "from config.celery import app\n"
        "app.loader.import_default_modules()\n"
        "print(json.dumps({\n"
        "    'registered': sorted(n for n in app.tasks if n.startswith('kmsg.')),\n"
        "    'routed': sorted(app.conf.task_routes),\n"
        "    'scheduled': sorted(e['task'] for e in app.conf.beat_schedule.values()),\n"
        "}))\n"
    )
    env = {**os.environ, "KMSG_VAR_DIR": str(tmp_path), "KMSG_SCHEDULE_INTERVAL_SECONDS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    table = set(TASK_NAMES.values())
    assert set(seen["registered"]) == table
    assert set(seen["routed"]) <= table and set(seen["scheduled"]) <= table
    # The sweep, the status poll, the scheduled-send dispatch, the AlimTalk template sync, the webhooks.
    assert len(seen["scheduled"]) == 5


def test_no_module_spells_a_task_name_outside_the_table() -> None:
    names = set(TASK_NAMES.values())
    table = ROOT / "kmsg_worker" / "dispatch.py"
    found: dict[str, list[str]] = {}
    for package in ("kmsg_worker", "tasks", "config"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == table:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.setdefault(str(path.relative_to(ROOT)), []).append(f"{node.value} (l.{node.lineno})")
    assert set(found) <= NOT_YET_FROM_THE_TABLE, {k: v for k, v in found.items() if k not in NOT_YET_FROM_THE_TABLE}
    # The allow-list shrinks as files move to the table; an entry that no longer spells a name goes.
    moved = NOT_YET_FROM_THE_TABLE - set(found)
    assert not moved, f"remove from NOT_YET_FROM_THE_TABLE: {moved}"
