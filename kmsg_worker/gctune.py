"""Interpreter settings tuned for batch work: Python's cyclic garbage collector and the GIL switch interval.

Bulk intake and chunk tasks allocate hundreds of thousands of short-lived objects (row dicts,
messages, outcomes). With the default first-generation threshold (700) the collector runs hundreds
of times per 10,000-row chunk and each older-generation pass walks every live object: a third of a
worker's CPU in ``bench/run.py``. Raising the threshold (and freezing what exists after start-up, so
the collector never walks imported modules again) keeps the collector but makes it rare.

Bulk intake runs in the caller's process, so what it changes there (:func:`raised_threshold`,
:func:`lowered_switch_interval`) it changes only while it runs, and puts back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

__all__ = ["lowered_switch_interval", "raised_threshold", "release_memory", "tune_worker"]

_T = TypeVar("_T")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> bool:
    """Free what the last batch left behind and hand it back to the operating system.

    Two steps, after each chunk task:

    - ``gc.collect()``: httpx's request and response form a reference cycle (response <-> stream),
      and that cycle holds a chunk's 10,000-message request body and its response (~3.5 MB). With
      the first-generation threshold raised (:func:`tune_worker`) such a cycle can outlive several
      chunks; a 1,000,000-message run measured ~20 MB more resident memory per process without this.
      The start-up objects are frozen, so the collection only walks what the chunk created (a few ms).
    - glibc ``malloc_trim``: freed memory is otherwise kept mapped, so a worker child's RSS would
      settle at its largest chunk.

    Returns:
        Whether the C library could be asked to trim (False on a libc without ``malloc_trim``; the
        collection runs either way).
    """
    gc.collect()
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def tune_worker(threshold: int) -> None:
    """For a worker process after its warm-up: raise the threshold and freeze start-up objects.

    ``threshold`` 0 leaves Python's defaults.
    """
    if threshold <= 0:
        return
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
    gc.freeze()


class _ProcessSetting(Generic[_T]):
    """A process-wide interpreter setting, changed while any block needs it and put back after the last.

    Blocks may nest or overlap across threads (two intakes at once). Each restoring the value it
    found would undo the change under a block still running, or leave the other's value behind for
    good; here the value found by the first block is restored when the last one ends, and the first
    block's change holds for all of them.
    """

    def __init__(self, get: Callable[[], _T], set_: Callable[[_T], None]) -> None:
        self._get = get
        self._set = set_
        self._lock = threading.Lock()
        self._users = 0
        self._before: _T | None = None

    @contextmanager
    def changed(self, change: Callable[[_T], _T]) -> Iterator[None]:
        """Hold the setting at ``change(current value)`` for the block."""
        with self._lock:
            if self._users == 0:
                before = self._get()
                self._before = before
                self._set(change(before))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._before is not None:
                    self._set(self._before)


_GC_THRESHOLD: _ProcessSetting[tuple[int, int, int]] = _ProcessSetting(
    gc.get_threshold, lambda value: gc.set_threshold(*value)
)
_SWITCH_INTERVAL: _ProcessSetting[float] = _ProcessSetting(sys.getswitchinterval, sys.setswitchinterval)


@contextmanager
def raised_threshold(threshold: int) -> Iterator[None]:
    """Raise the first-generation threshold for a block (bulk intake in the caller's process).

    The caller's own setting is restored afterwards; a higher threshold already set is kept, and so
    is 0 (automatic collection switched off).
    """

    def raise_(before: tuple[int, int, int]) -> tuple[int, int, int]:
        if before[0] == 0 or threshold <= before[0]:
            return before
        return (threshold, before[1], before[2])

    with _GC_THRESHOLD.changed(raise_):
        yield


@contextmanager
def lowered_switch_interval(seconds: float) -> Iterator[None]:
    """Lower the GIL switch interval for a block (bulk intake in the caller's process).

    Intake's writer thread feeds each slice into PostgreSQL's socket piece by piece and needs the GIL
    each time the socket drains; the thread validating rows holds it and gives it up only after the
    switch interval (5 ms by default), while PostgreSQL, its input consumed, waits. At 0.5 ms a
    100,000-row intake (producer only, three alternated pairs) took 1.50-1.56 s instead of 1.64-1.74
    atomic and 1.54-1.64 s instead of 1.94-2.12 streamed, at the same CPU. The caller's setting is
    restored afterwards; a lower one already set is kept.
    """
    with _SWITCH_INTERVAL.changed(lambda before: min(before, seconds)):
        yield
