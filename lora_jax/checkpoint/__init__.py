"""Orbax checkpoints: adapter-only directories, and the full train state per step.

Both keep arrays in Orbax's array format and everything else (leaf kinds, ranks, alphas,
targets, the structure of optimizer and AdaLoRA state) as JSON beside them, in one Orbax
checkpoint, so loading needs no arguments and no pickles. The JSON names the types of the
pytree nodes it stores; reading rebuilds only types in an explicit registry (the library's
adapter leaves, ``QuantizedArray``, the AdaLoRA allocator state, optax's states, and what a
program adds with :func:`register`), so a checkpoint never makes the reader build or call
anything else. The base model is never written: only adapter trees are accepted.

Crashes and re-saves:

* Orbax writes each checkpoint to a temporary directory and renames it into place once
  complete: a save that dies half-way leaves the previous checkpoints as they were.
* :func:`save_adapter` with ``overwrite=True`` writes the new adapter beside the old one
  (``<path>.incoming-<sequence>``) and then swaps it in. Whatever point a crash stops it at,
  the next :func:`save_adapter`, :func:`load_adapter` or :func:`adapter_info` on that path
  finishes the job: the newest complete adapter wins, and the leftovers (``.incoming-*``,
  ``.old-*``, ``*.orbax-checkpoint-tmp*``) are removed.
* One writer per path at a time, enforced: :func:`save_adapter` and :meth:`Manager.save` take a
  lock file (``lock.py``); a second writer waits (``wait=`` seconds) or raises
  :class:`CheckpointBusyError` naming the holder. Readers take no lock: a read that a writer's
  swap overlapped is repeated, so it never mixes two saves.
* A save that storage stops (full disk, file-size limit, quota, read-only) raises
  :class:`CheckpointStorageError` naming the file and the cause, after checking (by reading
  it again) that the previous checkpoint is intact.
* In a multi-process program every check that can fail on one process is agreed by all
  before the next collective (``collective.py``): every process raises the same error
  instead of the others hanging.
* Preemption: :class:`StopOnSignal` turns SIGTERM into a flag the training loop checks each
  step (agreed by every process), so the job saves that step and stops; the restarted job
  resumes from it.
* :meth:`Manager.save` never skips a step silently: saving a step that exists, or one not
  above the latest, raises unless the :class:`Manager` was opened with
  ``on_existing="overwrite"``, which first drops every step from that one up (the abandoned
  later steps of a run resumed from an earlier step).

The package: ``codec.py`` (pytrees as JSON plus arrays, and the registry of types a file may
name), ``files.py`` (directories on disk: atomic replacement, crash recovery, what a folder
is, :func:`disk_size`), ``adapter.py`` (adapter metadata, fit checks, :func:`save_adapter`,
:func:`load_adapter`, :func:`adapter_info`), ``restore.py`` (abstract trees and shardings for
restoring onto a mesh), ``manager.py`` (:class:`Manager`), ``lock.py`` (one writer per path),
``storage.py`` (storage errors in words), ``collective.py`` (failing together on every
process) and ``preemption.py`` (:class:`StopOnSignal`).

>>> import os, tempfile, jax, jax.numpy as jnp, lora_jax
>>> params = {"dense": {"kernel": jnp.ones((16, 8))}}
>>> lora = lora_jax.init(params, r=4, alpha=8, key=jax.random.key(0))
>>> path = os.path.join(tempfile.mkdtemp(), "adapter")
>>> nbytes = save_adapter(path, lora)
>>> back = load_adapter(path)
>>> back["dense"]["kernel"].scale, adapter_info(path)["targets"]
(2.0, ['dense/kernel'])
"""

from __future__ import annotations

from lora_jax.checkpoint import codec
from lora_jax.checkpoint.adapter import (
    FORMAT,
    FORMAT_VERSION,
    adapter_info,
    load_adapter,
    save_adapter,
)
from lora_jax.checkpoint.codec import CheckpointError, register
from lora_jax.checkpoint.files import disk_size
from lora_jax.checkpoint.lock import CheckpointBusyError
from lora_jax.checkpoint.manager import ON_EXISTING, Manager, StepExistsError, TrainState
from lora_jax.checkpoint.preemption import StopOnSignal
from lora_jax.checkpoint.storage import CheckpointStorageError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ON_EXISTING",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointStorageError",
    "Manager",
    "StepExistsError",
    "StopOnSignal",
    "TrainState",
    "adapter_info",
    "codec",
    "disk_size",
    "load_adapter",
    "register",
    "save_adapter",
]
