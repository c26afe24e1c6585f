"""One writer per lakehouse: an exclusive lock on ``<root>/.msif.lock`` (``fcntl.flock``, released by the
operating system when its process ends, so a killed run never leaves a stale lock).

``msif run`` holds it for the whole run; a second ``msif run`` on the same root waits with a message
naming the holder (or, with ``--no-wait``, refuses). An asset step that runs in another process (a run
launched from the Dagster UI or by the daemon) takes it around its own work, so it waits for a running
``msif run`` and vice versa; steps inside the process that holds it do not take it again, nor do the step
worker processes executing its runs (``msif run --workers N``): each worker is told, per run, which live
process it works for (:func:`works_for`), and its steps work under that process's lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, int] = {}  # resolved root -> file descriptor held by this process


class LakehouseBusy(RuntimeError):
    """Another process holds the lakehouse lock."""


def _path(root: Path) -> Path:
    return Path(root).resolve() / ".msif.lock"


def holder(root: Path) -> str:
    """Who holds (or last held) the lock, in words."""
    try:
        info = json.loads(_path(root).read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} ({info.get('command', '?')}), since {since}"


HOLDER_TAG = "msif/lakehouse_held_by"  # run tag "<pid>:<root>": a run the lock holder started itself
_WORKS_FOR: list[str | None] = [None]  # set in a worker process of the holder while it executes the holder's run


def held_here(root: Path) -> bool:
    """Whether this process holds the lock of ``root``."""
    return str(Path(root).resolve()) in _HELD


def holder_tag(root: Path) -> str:
    """The :data:`HOLDER_TAG` value of the runs this process (which holds the lock of ``root``) starts."""
    key = str(Path(root).resolve())
    if key not in _HELD:
        raise RuntimeError(f"holder_tag: this process does not hold the lock of {key}")
    return f"{os.getpid()}:{key}"


def works_for(tag: str | None) -> None:
    """Called by a worker process of the lock holder (:mod:`msif_assets.jobs`) with the :data:`HOLDER_TAG` of
    the run it is about to execute (None after it): its steps then work under the holder's lock. Only the
    worker itself says so, never a run's tags, which a re-executed run copies from its parent."""
    _WORKS_FOR[0] = tag


def works_for_holder(root: Path) -> bool:
    """Whether this process is a worker executing a run for the live process that holds the lock of
    ``root`` now (:func:`works_for`): then its steps work under that lock."""
    key = str(Path(root).resolve())
    pid, _, tagged = (_WORKS_FOR[0] or "").partition(":")
    if tagged != key or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        info = json.loads(_path(root).read_text() or "{}")
    except (OSError, ValueError):
        return False
    if info.get("pid") != int(pid):
        return False
    fd = os.open(_path(root), os.O_RDWR)
    try:  # the holder's lock must be taken now: if this process gets it, nobody holds it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def acquire(root: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None,
            poll_s: float = 0.2) -> None:
    """Take the lock of ``root`` (re-entrant within a process). If another process holds it: wait
    (calling ``on_wait`` once with a message) or, with ``wait=False``, raise :class:`LakehouseBusy`."""
    key = str(Path(root).resolve())
    if key in _HELD:
        return
    path = _path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            msg = f"the lakehouse {key} is in use by {holder(root)}"
            if not wait:
                os.close(fd)
                raise LakehouseBusy(f"{msg}; try again when it has finished") from None
            if not told and on_wait is not None:
                on_wait(f"{msg}; waiting for it to finish")
                told = True
            time.sleep(poll_s)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(Path(sys.argv[0]).name.split()[:1]
                                                                       + sys.argv[1:3]),
                             "since": time.time()}).encode())
    _HELD[key] = fd


def release(root: Path) -> None:
    """Give the lock of ``root`` back (no-op when this process does not hold it)."""
    fd = _HELD.pop(str(Path(root).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def locked(root: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of ``root`` for the block (unless this process already holds it, or works for the
    process that does: :func:`works_for_holder`)."""
    if held_here(root) or works_for_holder(root):
        yield
        return
    acquire(root, wait=wait, on_wait=on_wait)
    try:
        yield
    finally:
        release(root)


@contextmanager
def pool_slot(folder: Path, pool: str, limit: int, on_wait: Callable[[str], None] | None = None,
              poll_s: float = 0.2) -> Iterator[int]:
    """Hold one of ``limit`` slot files ``<folder>/<pool>.<i>.lock`` (``fcntl.flock``) for the block; yields
    the slot's number. Waits (calling ``on_wait`` once) while all are held.

    Why, beside Dagster's own pool: with the SQLite storage of a local instance, Dagster's claim of a pool
    slot is a SELECT then an UPDATE (``FOR UPDATE`` means nothing to SQLite), so two steps that claim at the
    same instant in two processes can both get the one slot (seen here: two runs of ``--workers 2``
    started their pool steps 4 ms apart and overlapped). The file locks make the pool's limit hold between
    the processes of one machine, whatever the storage; the OS releases them when a process dies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        for i in range(max(1, limit)):
            fd = os.open(folder / f"{pool}.{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield i
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if not told and on_wait is not None:
            on_wait(f"all {limit} slot(s) of the pool {pool} are in use on this machine; waiting for one")
            told = True
        time.sleep(poll_s)
