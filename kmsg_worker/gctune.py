"""Python's cyclic garbage collector, tuned for batch work.

Bulk intake and chunk tasks allocate hundreds of thousands of short-lived objects (row dicts,
messages, outcomes). With the default first-generation threshold (700) the collector runs hundreds
of times per 10,000-row chunk and each older-generation pass walks every live object: a third of a
worker's CPU in ``bench/run.py``. Raising the threshold (and freezing what exists after start-up, so
the collector never walks imported modules again) keeps the collector but makes it rare.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["raised_threshold", "tune_worker"]


def tune_worker(threshold: int) -> None:
    """For a worker process after its warm-up: raise the threshold and freeze start-up objects.

    ``threshold`` 0 leaves Python's defaults.
    """
    if threshold <= 0:
        return
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
    gc.freeze()


@contextmanager
def raised_threshold(threshold: int) -> Iterator[None]:
    """Raise the first-generation threshold for a block (bulk intake in the caller's process).

    The caller's own setting is restored afterwards; a lower threshold already set is kept.
    """
    before = gc.get_threshold()
    if threshold > before[0]:
        gc.set_threshold(threshold, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
