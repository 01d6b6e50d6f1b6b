"""The README's first command: ``kmsg demo`` on the embedded default (no server), from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]


def test_demo_runs_to_final_states_from_another_folder(tmp_path: Path) -> None:
    # Not the project root: the worker and beat it starts must still share this folder's var/.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    out = subprocess.run(
        [sys.executable, "-m", "kmsg_worker.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "all messages final: yes" in out.stdout
    assert "fallback child" in out.stdout  # the AlimTalk -> SMS failover happened
    assert (tmp_path / "var" / "kmsg.sqlite").exists()
