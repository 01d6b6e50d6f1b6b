"""The garbage-collector tuning used by workers and bulk intake."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.gctune import raised_threshold, release_memory, tune_worker
from kmsg_worker.settings import Settings


@pytest.fixture
def set_first_threshold() -> Iterator[Callable[[int], None]]:
    """Set the collector's first threshold for a test; the process's own thresholds come back after."""
    before = gc.get_threshold()
    yield lambda first: gc.set_threshold(first, before[1], before[2])
    gc.set_threshold(*before)


def test_raised_threshold_is_restored_and_never_lowers(set_first_threshold: Callable[[int], None]) -> None:
    set_first_threshold(700)
    with raised_threshold(50_000):
        assert gc.get_threshold()[0] == 50_000
    assert gc.get_threshold()[0] == 700
    set_first_threshold(90_000)
    with raised_threshold(50_000):
        assert gc.get_threshold()[0] == 90_000  # a caller's higher setting is kept
    assert gc.get_threshold()[0] == 90_000


def test_tune_worker_zero_leaves_the_defaults() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    tune_worker(0)
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen


def test_release_memory_collects_cycles_the_raised_threshold_would_keep() -> None:
    import weakref

    class Node:
        def __init__(self) -> None:
            self.payload = bytes(1_000_000)  # like a chunk's request body held by httpx's cycle
            self.me = self

    before = gc.get_threshold()
    try:
        gc.set_threshold(10_000_000, before[1], before[2])  # no automatic collection in this test
        node = Node()
        ref = weakref.ref(node)
        del node
        assert ref() is not None  # a cycle: reference counting alone does not free it
        release_memory()
        assert ref() is None
    finally:
        gc.set_threshold(*before)


def test_setting_parses_and_rejects_negative() -> None:
    assert Settings.from_env({}).gc_threshold == 50_000
    assert Settings.from_env({"KMSG_GC_THRESHOLD": "0"}).gc_threshold == 0
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KMSG_GC_THRESHOLD": "-1"})
    assert info.value.variable == "KMSG_GC_THRESHOLD"


_TRIM_PROBE = """
import gc, json
from kmsg_worker.gctune import release_memory

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 1e6

before = rss_mb()
blob = [{"id": f"{i:032x}", "text": "x" * 600 + str(i)} for i in range(60_000)]
peak = rss_mb()
del blob
gc.collect()
released = release_memory()
print(json.dumps({"before": before, "peak": peak, "after": rss_mb(), "released": released}))
"""


def test_release_memory_gives_freed_memory_back() -> None:
    import json
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's; elsewhere release_memory() reports False and does nothing")
    # A fresh interpreter: in this test process earlier tests' freed memory would be reused.
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True, timeout=60)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["released"] is True
    assert probe["peak"] > probe["before"] + 30  # ~60,000 chunk-like rows
    # most of it went back to the system
    assert probe["after"] < probe["before"] + (probe["peak"] - probe["before"]) / 2


def test_overlapping_blocks_restore_the_callers_settings_once_the_last_ends(
    set_first_threshold: Callable[[int], None],
) -> None:
    # Two intakes in two threads: the first ends while the second still runs, then the second ends.
    import sys
    import threading

    from kmsg_worker.gctune import lowered_switch_interval

    before_interval = sys.getswitchinterval()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    during: list[tuple[int, float]] = []

    def first() -> None:
        with raised_threshold(50_000), lowered_switch_interval(0.0005):
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with raised_threshold(50_000), lowered_switch_interval(0.0005):
            second_in.set()
            first_out.wait(5)
            # the first block has ended: the settings still hold for this one
            during.append((gc.get_threshold()[0], sys.getswitchinterval()))

    try:
        set_first_threshold(700)
        sys.setswitchinterval(0.005)
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # (Python keeps the interval in whole microseconds.)
        assert during == [(50_000, pytest.approx(0.0005, rel=0.05))]
        assert gc.get_threshold()[0] == 700 and sys.getswitchinterval() == pytest.approx(0.005, rel=0.05)
    finally:
        sys.setswitchinterval(before_interval)


def test_a_switched_off_collector_stays_off(set_first_threshold: Callable[[int], None]) -> None:
    set_first_threshold(0)
    with raised_threshold(50_000):
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0
