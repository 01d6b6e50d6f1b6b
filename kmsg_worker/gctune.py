"""Python's cyclic garbage collector, tuned for batch work.

Bulk intake and chunk tasks allocate hundreds of thousands of short-lived objects (row dicts,
messages, outcomes). With the default first-generation threshold (700) the collector runs hundreds
of times per 10,000-row chunk and each older-generation pass walks every live object: a third of a
worker's CPU in ``bench/run.py``. Raising the threshold (and freezing what exists after start-up, so
the collector never walks imported modules again) keeps the collector but makes it rare.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["raised_threshold", "release_memory", "tune_worker"]


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
