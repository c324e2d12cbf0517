"""Saving when the job is preempted: a SIGTERM sets a flag, the training loop checks it each
step, saves that step and stops; the restarted job resumes from it.

>>> import os, signal
>>> with StopOnSignal() as stop:
...     for step in range(100):
...         if step == 3:
...             os.kill(os.getpid(), signal.SIGTERM)   # what the scheduler sends
...         if stop.reached(step):
...             break                                  # save `step` here, then exit
>>> step, stop.signal_name
(3, 'SIGTERM')
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

import jax
import numpy as np


class StopOnSignal:
    """A context manager that turns SIGTERM (or other signals) into a flag a training loop
    polls with :meth:`reached`, so the loop saves at a step boundary instead of dying
    mid-step. The previous handlers come back on exit.

    On several processes, :meth:`reached` all-gathers the flags (one tiny collective per
    call, made by every process at the same step), so every process stops at the same step
    even if only one was signalled; call it at the same steps on every process.

    Args:
      signals: the signals to catch (default SIGTERM, what schedulers send before a kill).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._previous.items():
            signal.signal(s, old)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def reached(self, step: int) -> bool:
        """Whether to save ``step`` and stop: a signal came (on any process)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray([flag, step], np.int64))
            flags = np.asarray(flags).reshape(-1, 2)
            if len(set(flags[:, 1].tolist())) != 1:
                raise RuntimeError(f"StopOnSignal.reached: processes are at different steps "
                                   f"{flags[:, 1].tolist()}; call it at the same steps on all")
            flag = bool(flags[:, 0].any())
        return flag
