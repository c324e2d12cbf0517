"""Failing together: a check that fails on one process of a multi-process program fails on all.

A process that raises alone leaves the others waiting at the next collective (an all-gather,
a barrier inside Orbax) until it times out: on a pod, a hang rather than an error.
:func:`agree` is called by every process, each with its own outcome (None, or the exception
it caught), before any collective that depends on it. It all-gathers a small status record
(a kind code and the message) and, if any process failed, every process raises the same
error, naming the process and the cause. On one process it just re-raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from lora_jax.checkpoint.codec import CheckpointError

_T = TypeVar("_T")
_MESSAGE_BYTES = 2000  # the text of each process' error travels in this many bytes


def _kinds() -> list[type[BaseException]]:
    """Exception classes that travel by code (index + 1); anything else as the first base
    class here it derives from, or CheckpointError."""
    from lora_jax.checkpoint.lock import CheckpointBusyError
    from lora_jax.checkpoint.storage import CheckpointStorageError

    return [CheckpointBusyError, CheckpointStorageError, CheckpointError, FileNotFoundError,
            FileExistsError, TypeError, ValueError, OSError]


def _code(error: BaseException) -> int:
    for i, kind in enumerate(_kinds()):
        if isinstance(error, kind):
            return i + 1
    return _kinds().index(CheckpointError) + 1


def agree(what: str, error: BaseException | None) -> None:
    """Raises on every process if ``error`` is not None on any (call it on every process).

    Args:
      what: the operation, for the message (e.g. ``"load onto the mesh"``).
      error: this process' outcome: None, or the exception it caught.

    Raises:
      The first failing process' error class (one of the library's checkpoint errors, or a
      ValueError/TypeError/OSError kind), with the message ``"<what> failed on process i:
      <its message>"`` on every process; the original is chained where it was raised.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    if error is not None and getattr(error, "lora_jax_agreed", False):
        raise error  # already agreed: every process holds it
    from jax.experimental import multihost_utils

    record = np.zeros(_MESSAGE_BYTES + 1, np.int32)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        record[0] = _code(error)
        record[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    table = np.asarray(multihost_utils.process_allgather(record))
    outcomes = [(int(table[i, 0]), bytes(table[i, 1:].astype(np.uint8)).rstrip(b"\0").decode(
        errors="replace")) for i in range(table.shape[0])]
    _raise_agreed(what, outcomes, error)


def _raise_agreed(what: str, outcomes: list[tuple[int, str]],
                  error: BaseException | None) -> None:
    """Raises the first failure of ``outcomes`` (per process: kind code, 0 if none, and
    text) as the same error on every process; returns if none failed."""
    failed = [i for i, (code, _) in enumerate(outcomes) if code]
    if not failed:
        return
    first = failed[0]
    kind = _kinds()[outcomes[first][0] - 1]
    text = outcomes[first][1]
    also = f" (and on process{'es' if len(failed) > 2 else ''} {failed[1:]})" \
        if len(failed) > 1 else ""
    agreed = kind(f"{what} failed on process {first}{also}: {text}")
    agreed.lora_jax_agreed = True  # type: ignore[attr-defined]
    if error is not None:
        raise agreed from error
    raise agreed


def agree_by_key(what: str, key: str, error: BaseException | None,
                 timeout_s: float) -> None:
    """:func:`agree` through the coordinator's key-value store instead of a collective, so
    that a background thread (Orbax's asynchronous commit) can call it while the main thread
    runs collectives of its own. Every process calls it once with the same unique ``key``.

    Raises:
      as :func:`agree`; a :class:`CheckpointError` on every process still waiting if some
      process has not reported after ``timeout_s`` seconds (it died or hangs).
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    if error is not None and getattr(error, "lora_jax_agreed", False):
        raise error
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise CheckpointError(f"{what}: jax.distributed is not initialized")
    me = jax.process_index()
    text = "" if error is None else f"{type(error).__name__}: {error}"[:_MESSAGE_BYTES]
    client.key_value_set(f"{key}/{me}", f"{_code(error) if error is not None else 0}:{text}")
    outcomes = []
    for i in range(jax.process_count()):
        try:
            value = client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000))
        except Exception as e:  # noqa: BLE001 - a timeout, in words
            raise CheckpointError(
                f"{what}: process {i} did not report its outcome within {timeout_s:.0f} s "
                f"(it died or hangs); this process' own outcome: {text or 'done'}") from e
        code, _, message = value.partition(":")
        outcomes.append((int(code), message))
    _raise_agreed(what, outcomes, error)


def run_everywhere(what: str, fn: Callable[[], _T]) -> _T:
    """``fn()`` on this process, then :func:`agree` on its outcome: its value if no process
    failed, else the same error on every process."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - every kind is shared, then re-raised
        agree(what, e)
        raise AssertionError("unreachable") from e
    agree(what, None)
    return value
