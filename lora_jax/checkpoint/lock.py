"""One writer per checkpoint path: a lock file created atomically beside what is written.

The lock is a small JSON file (``<adapter path>.lock``, or ``.lock`` inside a
:class:`~lora_jax.checkpoint.Manager` directory) holding its holder's host, process id and
process start time. It is created with ``O_CREAT | O_EXCL``, so of two writers exactly one
gets it; the other waits (``wait=`` seconds, polling) or raises :class:`CheckpointBusyError`
naming the path and the holder.

A lock left by a dead process of this host (its pid is gone, or was reused by a process that
started later) is broken, under a second ``O_EXCL`` file so that two writers never break the
same lock twice. A lock of another host is never broken automatically (this host cannot tell
whether that process lives): the error says how to remove it. Only process 0 of a
multi-process program takes the lock (see :func:`lora_jax.checkpoint.files.write_dir`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid

from lora_jax.checkpoint.codec import CheckpointError

POLL_S = 0.05  # how often a waiting writer looks again
BREAK_GUARD_STALE_S = 30.0  # a breaker's guard file this old was left by a killed breaker


class CheckpointBusyError(CheckpointError):
    """Another writer holds the lock of the checkpoint path (the message names it)."""


def wait_seconds(value, where: str) -> float:
    """A ``wait=`` argument: seconds >= 0 (``math.inf``: wait as long as it takes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number of seconds, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{where} must be >= 0 seconds, got {value!r}")
    return float(value)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), or None
    if unknown (no ``/proc``, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of stat(5)


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "time": time.time(),
            "token": uuid.uuid4().hex}


def describe(holder: dict | None) -> str:
    """``host h, pid p, since <time>`` of a lock's contents."""
    if not holder:
        return "an unknown holder (the lock file is empty or unreadable)"
    since = holder.get("time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
        since, (int, float)) else "an unknown time"
    return f"host {holder.get('host')!r}, pid {holder.get('pid')}, since {when}"


def _same_host(holder: dict) -> bool:
    """The holder ran on this host, in this pid namespace (a container with the same name
    but other pids is another host here)."""
    mine = _me()
    if holder.get("host") != mine["host"]:
        return False
    return all(holder.get(k) is None or mine[k] is None or holder.get(k) == mine[k]
               for k in ("pid_ns",))


def is_dead(holder: dict) -> bool:
    """Whether a lock's holder is a process of this host that no longer runs. Unknown (another
    host, no ``/proc``, a pid we may not signal) counts as alive."""
    if not isinstance(holder, dict) or not _same_host(holder):
        return False
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return True  # the host rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's live process
    start = holder.get("start")
    now = process_start(pid)
    return start is not None and now is not None and now != start  # the pid was reused


def read_holder(lock_path: str) -> dict | None:
    """The contents of a lock file; None if it is empty or not JSON. Raises
    FileNotFoundError if there is none."""
    with open(lock_path) as fh:
        text = fh.read()
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class WriterLock:
    """The lock of one checkpoint path; :meth:`acquire` then :meth:`release` (or ``with``).

    Args:
      lock_path: the lock file.
      target: what it guards, for messages.
      wait: seconds to wait for a busy lock before raising :class:`CheckpointBusyError`
        (0: raise at once).
    """

    def __init__(self, lock_path: str, target: str, *, wait: float = 0.0):
        self.lock_path = lock_path
        self.target = target
        self.wait = wait
        self.holder: dict | None = None  # our contents while held

    @property
    def held(self) -> bool:
        """Whether the lock file on disk is still ours."""
        if self.holder is None:
            return False
        try:
            current = read_holder(self.lock_path)
        except OSError:
            return False
        return bool(current) and current.get("token") == self.holder["token"]

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_create():
                return
            try:
                holder = read_holder(self.lock_path)
            except FileNotFoundError:
                continue  # released between our two calls: try again at once
            except OSError as e:
                raise self._unusable(e) from e
            if holder is not None and is_dead(holder):
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise self._busy(holder)
            time.sleep(POLL_S)

    def release(self) -> None:
        """Removes the lock file if it is still ours (never another writer's)."""
        if self.held:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
        self.holder = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # -- internals
    def _try_create(self) -> bool:
        me = _me()
        try:
            os.makedirs(os.path.dirname(self.lock_path) or ".", exist_ok=True)
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise self._unusable(e) from e
        try:
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            os.unlink(self.lock_path)
            raise self._unusable(e) from e
        os.close(fd)
        self.holder = me
        return True

    def _break(self, seen: dict) -> None:
        """Removes the lock of a dead holder ``seen``, unless it changed meanwhile: under a
        guard file, so that of two breakers only one removes, and only the dead one's lock."""
        guard = self.lock_path + ".breaking"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(guard).st_mtime > BREAK_GUARD_STALE_S:
                    os.unlink(guard)  # a breaker killed half-way
            except OSError:
                pass
            time.sleep(POLL_S)
            return
        try:
            try:
                current = read_holder(self.lock_path)
            except FileNotFoundError:
                return
            if current is not None and current.get("token") == seen.get("token"):
                os.unlink(self.lock_path)
        finally:
            os.close(fd)
            os.unlink(guard)

    def _busy(self, holder: dict | None) -> CheckpointBusyError:
        waited = f" after waiting {self.wait:g} s" if self.wait else ""
        if holder is not None and not _same_host(holder):
            how = ("It belongs to another host, so it is never removed automatically: if that "
                   f"process is gone, delete {self.lock_path} by hand.")
        elif holder is None:
            how = (f"Its holder is unknown (killed while creating it?): if no other writer "
                   f"runs, delete {self.lock_path} by hand.")
        else:
            how = "Pass wait=<seconds> to wait for it."
        return CheckpointBusyError(
            f"{self.target} is being written by another writer ({describe(holder)}): its lock "
            f"{self.lock_path} is held{waited}. {how}")

    def _unusable(self, e: OSError) -> CheckpointError:
        from lora_jax.checkpoint import storage

        cause = storage.cause_of(e.errno)
        return storage.CheckpointStorageError(
            f"cannot create the lock file {self.lock_path} for {self.target}: "
            f"{cause or os.strerror(e.errno or errno.EIO)} ({type(e).__name__}: {e}). Nothing "
            "was written.")
