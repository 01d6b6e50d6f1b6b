"""Prefork-safe metrics: prometheus-client's multiprocess mode, one folder of files per worker.

Each Celery prefork child counts in its own memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR``.
The worker's main process points that variable at ``<var>/metrics/<node name>`` and empties it at
start (:func:`prepare_multiprocess_dir`), a child's live gauges are dropped and its counters folded
into one archive file when it exits (:func:`mark_process_dead`), and an exposition merges every
file (:class:`MultiProcessDirCollector`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import multiprocess, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kmsg_worker.observability.events import reset_default_metrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kmsg_worker.settings import Settings

__all__ = [
    "MultiProcessDirCollector",
    "fold_process_files",
    "mark_process_dead",
    "metrics_dir",
    "multiprocess_dir",
    "node_dir",
    "prepare_multiprocess_dir",
]

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(settings: Settings) -> Path:
    """Folder of every worker's metric files on this host: ``<var>/metrics``."""
    return settings.var_dir / "metrics"


def multiprocess_dir() -> Path | None:
    """This process's ``PROMETHEUS_MULTIPROC_DIR``, if multiprocess mode is on."""
    value = os.environ.get(_ENV)
    return Path(value) if value else None


def _safe_name(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", node) or "worker"


def prepare_multiprocess_dir(folder: Path) -> Path:
    """Empty ``folder``, make it this process's ``PROMETHEUS_MULTIPROC_DIR`` and switch multiprocess mode on.

    Called in the worker's main process before the pool forks, so every child inherits the variable.
    Files left by a previous run would be summed into the new one: they are deleted.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[_ENV] = str(folder)
    # prometheus-client picks its value class when it is first imported, which in a worker happens
    # before this runs (this module imports it). Re-pick it now; metrics made from here on use mmap files.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    reset_default_metrics()
    return folder


def node_dir(settings: Settings, node: str) -> Path:
    """The metric folder of worker ``node`` (``<var>/metrics/<node>``)."""
    return metrics_dir(settings) / _safe_name(node)


#: Metric kinds whose values add up across processes: an exited process's are folded into one file.
_SUMMED_KINDS = ("counter", "histogram", "summary")
#: The "pid" part of the folded files' names (``counter_archive.db``): read like any process's file.
_ARCHIVE = "archive"
#: Taken exclusively while a process's files are folded, shared while an exposition reads them.
_LOCK_FILE = ".fold.lock"


@contextmanager
def _folder_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    try:
        fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # A folder this process cannot write to (a read-only scrape): nothing is folded by this
        # process, and a scrape without the lock is what prometheus-client itself does.
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def mark_process_dead(pid: int, folder: Path | None = None) -> None:
    """Tidy up after an exited prefork child: drop its live gauges, fold its counters into the archive.

    Celery replaces a pool child every ``worker_max_tasks_per_child`` tasks, and prometheus-client
    keeps each dead child's counter and histogram files (their counts must stay in the totals). An
    OTP worker replacing a child every few minutes would leave thousands of files a week, and every
    scrape reads every file. Instead the child's values are added into ``counter_archive.db`` (and
    ``histogram_``/``summary_``) under an exclusive lock that expositions share, and its own files are
    deleted: a scrape sees the totals before or after, never a counter that went down.
    """
    target = folder or multiprocess_dir()
    if target is None or not target.is_dir():
        return
    multiprocess.mark_process_dead(pid, str(target))  # type: ignore[no-untyped-call]
    fold_process_files(pid, target)


def fold_process_files(pid: int, folder: Path) -> int:
    """Add process ``pid``'s counter, histogram and summary values to ``folder``'s archive files.

    Returns:
        How many of the process's files were folded (and deleted).
    """
    folded = 0
    with _folder_lock(folder, exclusive=True):
        for kind in _SUMMED_KINDS:
            dead = folder / f"{kind}_{pid}.db"
            if not dead.is_file():
                continue
            values = MmapedDict.read_all_values_from_file(str(dead))  # type: ignore[no-untyped-call]
            archive = MmapedDict(str(folder / f"{kind}_{_ARCHIVE}.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _pos in values:
                    current, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                    archive.write_value(key, current + value, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            dead.unlink()
            folded += 1
    return folded


def _has_header(path: Path) -> bool:
    try:
        return path.stat().st_size >= 8
    except FileNotFoundError:
        return False


class MultiProcessDirCollector(Collector):
    """Merge the metric files of every process under ``folder`` (recursively: one sub-folder per worker).

    Args:
        folder: A ``PROMETHEUS_MULTIPROC_DIR`` or a parent of several.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Metric]:
        """Merged counters, histograms and gauges of every process."""
        with ExitStack() as stack:
            # Each worker folder's lock, shared: no exited child is folded while its files are read.
            folders = sorted({p.parent for p in self.folder.rglob("*.db")})
            for sub in folders:
                stack.enter_context(_folder_lock(sub, exclusive=False))
            # Listed again under the locks (a fold since the first listing removed files), and only
            # in the locked folders (a worker started meanwhile is read at the next scrape).
            # A process creates its file empty and sizes it a moment later: an empty file holds no
            # values yet and would fail the whole read (prometheus-client unpacks its header). Files
            # only grow, so one seen non-empty here is readable below.
            files = sorted(str(p) for sub in folders for p in sub.glob("*.db") if _has_header(p))
            merged: list[Metric] = list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        return merged

    def describe(self) -> Iterable[Metric]:
        """Nothing: the names depend on the files present at scrape time."""
        return []
