"""Checkpoint directories on disk: atomic replacement, recovery after a crash, what a folder is.

An adapter saved over an existing one is written completely beside it first
(``<path>.incoming-<sequence>-<id>``) and then swapped in by renames (:func:`write_dir`).
Whatever point a crash stops that at, :func:`recover` (run by the next save or read of the
path) finishes the job: the newest complete copy wins, and the leftovers (``.incoming-*``,
``.old-*``, ``*.orbax-checkpoint-tmp*``) are removed. Each step is one rename, so a crash
during recovery is recovered the same way. One writer per path at a time.

:func:`adapter_dir` resolves a path to read; :func:`not_ours` says what a folder is when it
is not what the caller wants (a Manager root, one step, a PEFT folder, an empty folder...).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from lora_jax.checkpoint import collective, lock, storage
from lora_jax.checkpoint.codec import CheckpointError

_T = TypeVar("_T")


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under a directory: the sizes of the files in it and its subdirectories
    (a checkpoint, a Manager step, a PEFT folder).

    Args:
      path: the directory.

    Returns:
      The total size in bytes (0 if ``path`` is not a directory).

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(d, "sub"))
    >>> for name in ("a", "sub/b"):
    ...     with open(os.path.join(d, name), "wb") as f:
    ...         _ = f.write(b"12345")
    >>> disk_size(d)
    10
    """
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _leftovers(path: str) -> tuple[list[str], list[str]]:
    """``(complete new copies, oldest first; debris)`` left beside ``path`` by killed saves.

    A complete copy is ``<path>.incoming-<sequence>-<id>``: Orbax renames it to that name only
    once it is fully written, and a loser is renamed away before it is deleted, so the name
    always means complete. Debris: Orbax's unfinished ``*.orbax-checkpoint-tmp*`` folders and
    ``.old-*`` copies on their way out.
    """
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent or ".")
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    n = re.escape(name)
    incoming = re.compile(n + r"\.incoming-(\d{20})-[0-9a-f]{8}")
    legacy = re.compile(n + r"\.incoming-[0-9a-f]{8}")  # lora_jax 0.1.0, ordered by time
    debris = re.compile(n + r"(\.incoming-(\d{20}-)?[0-9a-f]{8})?\.orbax-checkpoint-tmp.*"
                        + r"|" + n + r"\.old-(\d{20}-)?[0-9a-f]{8}")
    done, junk = [], []
    for e in entries:
        full = os.path.join(parent, e)
        if m := incoming.fullmatch(e):
            done.append((int(m.group(1)), 0, full))
        elif legacy.fullmatch(e):
            done.append((-1, os.stat(full).st_mtime_ns, full))
        elif debris.fullmatch(e):
            junk.append(full)
    return [p for *_, p in sorted(done)], junk


def _seq(path: str) -> str:
    """A sequence above every copy beside ``path`` (a time, so that it sorts across runs)."""
    done, _ = _leftovers(path)
    last = max((int(m.group(1)) for p in done
                if (m := re.search(r"\.incoming-(\d{20})-", p))), default=0)
    return f"{max(time.time_ns(), last + 1):020d}-{uuid.uuid4().hex[:8]}"


def _retire(path: str, victim: str) -> str:
    """Renames ``victim`` (atomically) to an ``.old-*`` name, which is never read."""
    old = f"{path}.old-{_seq(path)}"
    os.rename(victim, old)
    return old


def recover(path: str) -> None:
    """Finishes what killed saves of ``path`` left: the newest complete copy becomes ``path``,
    the rest is removed. Each step is one rename, so a crash here is recovered the same way."""
    done, junk = _leftovers(path)
    if done:
        junk += [_retire(path, p) for p in done[:-1]]
        if os.path.isdir(path):
            junk.append(_retire(path, path))
        os.rename(done[-1], path)
    for p in junk:
        shutil.rmtree(p, ignore_errors=True)


def sync(name: str) -> None:
    """A barrier across hosts (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_creatable(path: str, what: str) -> None:
    """Raises a clear error if the directory ``path`` cannot be created because something on
    its way is a regular file (missing parents are created, as Orbax does)."""
    ancestor = path
    while not os.path.lexists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            return
        ancestor = parent
    if ancestor != path and not os.path.isdir(ancestor):
        raise NotADirectoryError(
            f"{what}: cannot create {path}: {ancestor} is a file, not a directory")


def write_dir(path: str, write: Callable[[str], None], *, overwrite: bool, what: str,
              wait: float = 0.0, verify: Callable[[str], None] | None = None) -> None:
    """Creates the directory ``path`` with ``write(target)``, replacing an existing one atomically.

    ``write`` must create ``target`` completely or not at all (Orbax does: it writes to a
    temporary name and renames). The writer first takes the lock ``<path>.lock``
    (:mod:`lora_jax.checkpoint.lock`; ``wait`` seconds for a busy one). Leftovers of earlier
    killed saves are recovered first; an existing ``path`` is replaced by writing beside it and
    swapping (see the module docstring). Every host calls this; host 0 locks and renames, and
    every check is agreed by all hosts before the next collective
    (:func:`lora_jax.checkpoint.collective.agree`).

    A write that storage stops (full disk, file-size limit, quota, read-only) raises
    :class:`~lora_jax.checkpoint.storage.CheckpointStorageError`, after removing the partial
    files and reading the previous ``path`` again with ``verify(path)``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False, or is a file.
      NotADirectoryError: a parent of ``path`` is a regular file.
      CheckpointBusyError: another writer holds the lock.
    """
    first = jax.process_index() == 0
    writer = lock.WriterLock(f"{path}.lock", path, wait=wait)

    def acquire() -> None:
        check_creatable(path, what)
        if first:
            writer.acquire()

    collective.run_everywhere(what, acquire)
    try:
        _write_locked(path, write, overwrite=overwrite, what=what, verify=verify)
    finally:
        if first:
            writer.release()


def _write_locked(path: str, write: Callable[[str], None], *, overwrite: bool, what: str,
                  verify: Callable[[str], None] | None) -> None:
    if jax.process_index() == 0:
        collective.run_everywhere(what, lambda: recover(path))  # a save killed half-way
    else:
        collective.run_everywhere(what, lambda: None)

    def check() -> bool:
        exists = os.path.lexists(path)
        if exists and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if exists and not os.path.isdir(path):
            raise FileExistsError(f"{path} is a file, not an adapter; remove it first")
        return exists

    exists = collective.run_everywhere(what, check)
    if exists:
        seq = _seq(path)
        if jax.process_count() > 1:  # every host writes into the same directory
            from jax.experimental import multihost_utils

            seq = bytes(multihost_utils.broadcast_one_to_all(
                np.frombuffer(seq.encode(), np.uint8))).decode()
        target = f"{path}.incoming-{seq}"
    else:
        target = path
    try:
        collective.run_everywhere(what, lambda: write(target))
    except Exception as e:
        if storage.storage_failure(e) is None:
            raise
        raise _storage_error(path, what, e, exists, verify) from e
    if target != path and jax.process_index() == 0:
        recover(path)  # target is the newest complete copy: swapped in, the old one removed
    sync(f"lora_jax.checkpoint.{what}.swap")


def _storage_error(path: str, what: str, error: Exception, existed: bool,
                   verify: Callable[[str], None] | None) -> Exception:
    """The :class:`CheckpointStorageError` of a write of ``path`` that storage stopped, after
    removing its partial files and reading the previous adapter again."""
    if jax.process_index() == 0:
        for leftover in _leftovers(path)[1]:  # the failed write's temporary folders
            shutil.rmtree(leftover, ignore_errors=True)
    sync(f"lora_jax.checkpoint.{what}.cleanup")
    intact: BaseException | bool = True
    if existed and verify is not None:
        try:
            collective.run_everywhere(f"{what}: reading the previous adapter again",
                                      lambda: verify(path))
        except Exception as e:  # noqa: BLE001 - reported in the message
            intact = e
    return storage.save_failed(what, path, error, f"the previous adapter at {path}"
                               if existed else None, intact)


def _recovered(path: str) -> str:
    """``path`` after recovering from killed saves; read-only folders are resolved in place.

    A reader recovers only when there is something to recover (leftovers, or the lock of a
    writer that died, which it removes) and no live writer holds the lock (never removing what
    a live writer is writing); otherwise it reads the newest complete copy where it is."""
    if jax.process_index() == 0 and not is_step_dir(path) and (
            any(_leftovers(path)) or os.path.lexists(f"{path}.lock")):
        writer = lock.WriterLock(f"{path}.lock", path)
        try:
            writer.acquire()
        except CheckpointError:
            pass  # a writer is busy (or the folder is read-only): leave its files alone
        else:
            try:
                recover(path)
            except OSError:
                pass  # e.g. a read-only copy: read the newest complete one where it is
            finally:
                writer.release()
    sync("lora_jax.checkpoint.recover")
    done, _ = _leftovers(path)
    return done[-1] if done else path


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


READ_ATTEMPTS = 20


def read_stable(path: str | os.PathLike, read: Callable[[str], _T]) -> _T:
    """``read(directory)`` of the adapter at ``path``, never a mix of two saves: a writer may
    swap a new adapter in while it reads (writers lock, readers do not), so the read is
    repeated if the directory at ``path`` changed meanwhile (or vanished under it).

    Raises:
      CheckpointBusyError: it changed during each of :data:`READ_ATTEMPTS` reads.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if jax.process_count() > 1:  # every process must read the same number of times
        return collective.run_everywhere(f"reading {path}", lambda: read(adapter_dir(path)))
    last: Exception | None = None
    for _ in range(READ_ATTEMPTS):
        directory, before = path, None
        try:
            directory = adapter_dir(path)  # may miss a swap's rename: retried below
            before = _identity(directory)
            value = read(directory)
        except (CheckpointError, FileNotFoundError) as e:
            writing = os.path.exists(f"{path}.lock")
            changed = os.path.isdir(path) if before is None else _identity(directory) != before
            if not writing and not changed:
                raise  # missing or damaged, and no writer is replacing it
            last = e
            time.sleep(lock.POLL_S)
            continue
        if _identity(directory) == before and before is not None:
            return value
    if last is not None:
        raise last
    raise lock.CheckpointBusyError(f"{path} was replaced by a writer during each of "
                                   f"{READ_ATTEMPTS} attempts to read it")


# ----------------------------------------------------------------------------------------
# What a folder is


def is_adapter_dir(path: str) -> bool:
    """``path`` holds the items :func:`lora_jax.checkpoint.save_adapter` writes."""
    return os.path.isdir(os.path.join(path, "adapter")) and os.path.isdir(
        os.path.join(path, "arrays"))


def is_step_dir(path: str) -> bool:
    """``path`` is one step of a :class:`lora_jax.checkpoint.Manager`."""
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(
        os.path.join(path, "lora"))


def not_ours(path: str, want: str) -> str | None:
    """Why ``path`` (an existing directory) is not a ``want`` (``"adapter"`` or
    ``"manager"``), or None if it may be one."""
    entries = sorted(os.listdir(path))
    steps = sorted(int(e) for e in entries if e.isdigit() and os.path.isdir(
        os.path.join(path, e)))
    if want != "manager" and (is_adapter_dir(path) or is_step_dir(path)):
        return None
    if want == "manager" and not (is_adapter_dir(path) or is_step_dir(path)) and \
            "adapter_config.json" not in entries:
        return None
    if "adapter_config.json" in entries:
        return (f"{path} is a Hugging Face PEFT adapter folder; read it with "
                "lora_jax.peft.load(path, params)")
    if is_adapter_dir(path):
        return (f"{path} is an adapter written by save_adapter, not a Manager directory; give "
                "the Manager a directory of its own")
    if is_step_dir(path):
        return (f"{path} is one step of a Manager, not a Manager directory; pass its parent "
                f"{os.path.dirname(path)}")
    if not entries:
        return f"{path} is an empty directory, not a lora_jax adapter"
    if steps:
        return (f"{path} is a Manager directory (steps {steps}), not one adapter; pass one step "
                f"such as {os.path.join(path, str(steps[-1]))}, or use Manager(path).restore()")
    if "_CHECKPOINT_METADATA" in entries:
        items = [e for e in entries if os.path.isdir(os.path.join(path, e))]
        return (f"{path} is an Orbax checkpoint that lora_jax did not write (items {items}); "
                "expected the 'adapter' and 'arrays' items of save_adapter")
    return (f"{path} is not a lora_jax adapter: it holds {entries[:6]}"
            f"{' ...' if len(entries) > 6 else ''}, expected the 'adapter' and 'arrays' items "
            "that save_adapter writes")


def _missing(path: str, what: str) -> FileNotFoundError:
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return FileNotFoundError(f"no {what} at {path}: the directory {parent} does not exist")
    near = difflib.get_close_matches(name, os.listdir(parent), n=3)
    hint = f"; did you mean {', '.join(repr(os.path.join(parent, x)) for x in near)}?" if near \
        else ""
    return FileNotFoundError(f"no {what} at {path}{hint}")


def adapter_dir(path: str | os.PathLike) -> str:
    """The directory to read for the adapter at ``path`` (an adapter or a Manager step), after
    crash recovery and checks.

    Raises:
      FileNotFoundError: nothing there (the message suggests close names). CheckpointError: a
        file, or a folder that is not an adapter (the message says what it is).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    path = _recovered(path)
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file; an adapter checkpoint is a directory written "
                              "by save_adapter (or a Manager step)")
    if not os.path.isdir(path):
        raise _missing(path, "adapter checkpoint")
    why = not_ours(path, "adapter")
    if why:
        raise CheckpointError(why)
    return path


def orbax_read(what: str, fn: Callable[[], _T]) -> _T:
    """Runs an Orbax read; its errors (which name no file) come back naming ``what``."""
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        raise CheckpointError(f"{what} cannot be read ({type(e).__name__}: {e}); the checkpoint "
                              "is damaged or incomplete") from e
