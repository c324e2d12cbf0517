"""Per-step checkpoints of the train state: :class:`Manager`, over Orbax's CheckpointManager.

A step holds the adapter (arrays and the metadata of :mod:`lora_jax.checkpoint.adapter`) and,
optionally, the optimizer state, the AdaLoRA allocator state and PRNG keys, each stored as
arrays plus the JSON of :mod:`lora_jax.checkpoint.codec`. :meth:`Manager.save` never skips a
step silently: saving a step that exists, or one not above the latest, raises
:class:`StepExistsError` unless the Manager was opened with ``on_existing="overwrite"``, which
first drops every step from that one up (the abandoned later steps of a run resumed from an
earlier step).
"""

from __future__ import annotations

import itertools
import os
import shutil
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.checkpoint import codec, collective, files, lock, storage
from lora_jax.checkpoint import restore as R
from lora_jax.checkpoint.adapter import (
    FORMAT_VERSION,
    TRAIN_FORMAT,
    adapter_meta,
    agreed_checkpointer,
    array_meta,
    as_dict,
    check_fit,
    check_format,
)
from lora_jax.checkpoint.codec import CheckpointError
from lora_jax.paths import flatten

PyTree = Any
ON_EXISTING = ("error", "overwrite")
_TRASH = "_deleted"  # dropped steps wait here (unlisted) until removed
_ITEMS = ("opt_state", "adalora", "rng")  # what a train state holds besides the adapter
AGREE_TIMEOUT_S = 600.0  # how long a process waits for the others' write outcome
_WRITES = itertools.count()  # every process numbers its Managers' writes alike


class _AgreedCommit:
    """Orbax commit futures whose outcome every process agrees on before Orbax's barriers:
    ``result()`` waits for this process' writes, then exchanges the outcome through the
    coordinator (:func:`~lora_jax.checkpoint.collective.agree_by_key`), so a write that
    fails on one process raises on all instead of leaving them at ``async_write_complete``.
    """

    def __init__(self, futures: list, key: str, what: str):
        self._futures, self._key, self._what = futures, key, what

    def result(self, timeout: float | None = None) -> None:
        error = None
        try:
            for f in self._futures:
                f.result(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - shared, then raised on every process
            error = e
        collective.agree_by_key(self._what, self._key, error, AGREE_TIMEOUT_S)

    def cancel(self) -> None:
        for f in self._futures:
            if hasattr(f, "cancel"):
                f.cancel()


def _agree_writes(handler: Any, directory: str) -> None:
    """Makes the writes of an Orbax handler fail on every process together (multi-process
    runs): the start of each write (directories, metadata) is agreed at once, its array
    writes when they finish, in Orbax's background thread, still asynchronously. The cost
    is one exchange of a few bytes through the coordinator per write, twice."""
    start = handler.async_save

    async def agreed_async_save(path: Any, *args: Any, **kwargs: Any) -> list:
        key = f"lora_jax/manager_write/{next(_WRITES)}"
        step = os.path.basename(os.fspath(path)).split(".")[0]
        what = f"Manager.save: writing step {step} in {directory}"
        try:
            futures = await start(path, *args, **kwargs) or []
        except Exception as e:  # noqa: BLE001 - shared, then raised on every process
            collective.agree_by_key(what, key + "/start", e, AGREE_TIMEOUT_S)
            raise AssertionError("unreachable") from e
        collective.agree_by_key(what, key + "/start", None, AGREE_TIMEOUT_S)
        futures = [f for f in jax.tree.leaves(futures) if f is not None]
        return [_AgreedCommit(futures, key + "/commit", what)]

    handler.async_save = agreed_async_save


def _check_storable(item: str, tree: PyTree) -> None:
    """Clear errors, before anything is written, for leaves a train state cannot hold."""
    for path, x in flatten(tree):
        where = f"{item}/{path}" if path else item
        if protocols.is_base_leaf(x):
            raise TypeError(f"{where} is a {type(x).__name__}, a base weight: checkpoints hold "
                            "adapters and train state, never the base model")
        if str(getattr(x, "dtype", "")) in ("int4", "uint4"):
            raise TypeError(f"{where}: Orbax cannot write {x.dtype} arrays; store them as "
                            "int8/uint8 (e.g. QuantizedArray.with_storage('packed'))")


class TrainState(NamedTuple):
    """What :meth:`Manager.restore` returns."""

    step: int
    lora: PyTree
    opt_state: PyTree
    adalora: PyTree
    rng: PyTree
    meta: Any


class StepExistsError(ValueError):
    """:meth:`Manager.save` of a step that exists or is not above the latest one."""


class Manager:
    """Per-step checkpoints of the train state, through ``orbax.checkpoint.CheckpointManager``.

    >>> import tempfile, jax, jax.numpy as jnp, optax, lora_jax
    >>> lora = lora_jax.init({"w": {"kernel": jnp.ones((8, 4))}}, r=2, key=jax.random.key(0))
    >>> opt = optax.adam(1e-3).init(lora)
    >>> with Manager(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
    ...     for step in range(3):
    ...         _ = ckpt.save(step, lora=lora, opt_state=opt, rng=jax.random.key(step))
    ...     ckpt.wait()
    ...     restored = ckpt.restore()
    >>> ckpt.steps, restored.step, type(restored.opt_state[0]).__name__
    ([1, 2], 2, 'ScaleByAdamState')

    Resuming: a run restored from step ``s`` that saves ``s + 1`` while later steps exist
    (from the run it abandons) gets a :class:`StepExistsError` saying so, unless the
    Manager was opened with ``on_existing="overwrite"``:

    >>> d = tempfile.mkdtemp()
    >>> with Manager(d, async_save=False) as ckpt:
    ...     for step in (1, 2, 3):
    ...         _ = ckpt.save(step, lora=lora)
    >>> with Manager(d, async_save=False, on_existing="overwrite") as ckpt:
    ...     state = ckpt.restore(1)        # ... train on from step 1 ...
    ...     _ = ckpt.save(2, lora=lora)    # drops the old steps 2 and 3 first
    ...     ckpt.steps
    [1, 2]

    Args:
      directory: where step directories go.
      max_to_keep: how many recent checkpoints to keep (``None``: all).
      async_save: write in a background thread; :meth:`save` returns once the arrays are
        copied off the devices. :meth:`wait` (or :meth:`close`) waits for the writes.
      save_interval_steps: :meth:`save` skips (returns False for) steps that are not a
        multiple of this, once a first checkpoint exists.
      keep_period: also keep every checkpoint whose step is a multiple of this.
      on_existing: what :meth:`save` does with a step that exists or is not above the
        latest: ``"error"`` (default) raises :class:`StepExistsError` and writes nothing;
        ``"overwrite"`` drops every checkpoint from that step up, then saves. A crash after
        the drop and before the new step is complete leaves the steps below it.
      wait: seconds :meth:`save` waits for another writer of ``directory`` (0: raise
        :class:`~lora_jax.checkpoint.CheckpointBusyError` at once). One writer at a time: a
        Manager holds the lock ``<directory>/.lock`` from its first :meth:`save` until
        :meth:`wait` or :meth:`close` returns (:mod:`lora_jax.checkpoint.lock`); restoring
        takes no lock.

    Raises:
      ValueError: ``directory`` is an adapter, one step of a Manager, or a PEFT folder; a bad
        option. NotADirectoryError: ``directory`` or one of its parents is a file.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, save_interval_steps: int = 1,
                 keep_period: int | None = None, on_existing: str = "error",
                 wait: float = 0.0):
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        if on_existing not in ON_EXISTING:
            raise ValueError(f"Manager: on_existing must be 'error' or 'overwrite', got "
                             f"{on_existing!r}")
        if max_to_keep is not None:
            max_to_keep = V.integer(max_to_keep, "Manager: max_to_keep", low=1)
        save_interval_steps = V.integer(save_interval_steps, "Manager: save_interval_steps",
                                        low=1)
        if keep_period is not None:
            keep_period = V.integer(keep_period, "Manager: keep_period", low=1)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"Manager: {self.directory} is a file; a Manager needs a "
                                     "directory")
        files.check_creatable(self.directory, "Manager")
        if os.path.isdir(self.directory):
            why = files.not_ours(self.directory, "manager")
            if why:
                raise ValueError(f"Manager: {why}")
        self.on_existing = on_existing
        self._lock = lock.WriterLock(os.path.join(self.directory, ".lock"), self.directory,
                                     wait=lock.wait_seconds(wait, "Manager: wait"))
        self._locked = False  # this Manager holds the lock (on every process' view)
        self._saving: list[int] = []  # steps started since the last wait
        self._identity: tuple[int, int] | None = None  # (device, inode) of the directory
        self._interval = save_interval_steps
        self._async = async_save
        # Old steps are renamed out of the way (atomic) instead of deleted in place: a process
        # killed half-way through an rmtree would otherwise leave a listed, broken step.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            keep_period=keep_period, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True, todelete_subdir=_TRASH)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        if jax.process_count() > 1:
            _agree_writes(self._mngr._checkpointer.handler, self.directory)
        self._empty_trash()

    def _empty_trash(self) -> None:
        trash = os.path.join(self.directory, _TRASH)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

    # -- bookkeeping
    @property
    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk, then releases the lock.

        Raises:
          CheckpointStorageError: storage stopped a pending save (the message names the file
            and the cause, and says whether the latest complete step is intact).
        """
        try:
            self._finish(self._mngr.wait_until_finished)
            self._saving = []
        finally:
            self._unlock()

    def close(self) -> None:
        try:
            self._finish(self._mngr.close)
            self._empty_trash()
        finally:
            self._unlock()

    # -- one writer at a time
    def _take_lock(self) -> None:
        if self._locked:
            return
        first = jax.process_index() == 0

        def acquire() -> None:
            self._check_directory()  # before the lock would create it again
            if first:
                self._lock.acquire()

        collective.run_everywhere("Manager.save", acquire)
        self._locked = True
        # The steps another writer may have saved since we last looked (none of ours is in
        # flight: the lock is released only once our saves are on disk).
        self._mngr.reload()

    def _check_directory(self, during: str = "") -> None:
        """Raises if ``self.directory`` is gone, or is another directory than the one this
        Manager saved into (it or a parent was removed or moved, and maybe created again):
        Orbax would create it again and save into an empty run silently."""
        try:
            st = os.stat(self.directory)
            identity = (st.st_dev, st.st_ino) if os.path.isdir(self.directory) else None
        except OSError:
            identity = None
        if identity is not None and self._identity in (None, identity):
            self._identity = identity
            return
        was = [s for s in self.steps if s not in self._saving]
        raise storage.CheckpointStorageError(
            f"Manager.save: the checkpoint directory {self.directory} was removed or moved "
            f"(it, or a parent) after this Manager opened it{during}"
            f"{'' if identity is None else ', and a new one is in its place'}. Nothing was "
            f"saved, and the steps it held ({was}) are gone from it. Open a new Manager to "
            "start a run there again.")

    def _unlock(self) -> None:
        if self._locked and jax.process_index() == 0:
            self._lock.release()
        self._locked = False

    def _finish(self, fn) -> None:
        """``fn()`` (a save, or waiting for one); a failure that storage caused becomes a
        :class:`CheckpointStorageError` once the partial step is removed and the latest
        complete step read again."""
        try:
            collective.run_everywhere("Manager.save", fn)
        except Exception as e:
            if storage.storage_failure(e) is None:
                raise
            raise self._storage_error(e) from e

    def _storage_error(self, error: Exception) -> Exception:
        def check_directory() -> None:  # removed or moved, maybe recreated by the writers
            try:
                self._check_directory(", during the save")
            except storage.CheckpointStorageError as e:
                raise storage.CheckpointStorageError(
                    f"{e} (Orbax said: {type(error).__name__}: {str(error)[:400]})") from e

        try:
            collective.run_everywhere("Manager.save", check_directory)
        except storage.CheckpointStorageError as gone:
            self._saving = []
            return gone
        self._saving = []
        if jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:  # the failed step's partial files
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        files.sync("lora_jax.checkpoint.Manager.cleanup")
        self._mngr.reload()
        latest = self.latest_step()
        if latest is None:
            return storage.save_failed("Manager.save", self.directory, error, None, True)
        intact: BaseException | bool = True
        try:
            collective.run_everywhere("Manager.save: reading the latest step again",
                                      lambda: self._read_whole(latest))
        except Exception as e:  # noqa: BLE001 - reported in the message
            intact = e
        return storage.save_failed("Manager.save", self.directory, error,
                                   f"the latest complete step {latest}", intact)

    def _read_whole(self, step: int) -> None:
        """Reads every array of ``step`` onto this host: the adapter and every stored item
        (optimizer, AdaLoRA state, PRNG keys), after its metadata (a check that it is intact).
        """
        state = self.metadata(step)
        where = f"step {step}"
        info = check_format(state.get("adapter"), where)
        device = R.lora_shardings({}, None, None)[0]
        abstract = R.abstract_lora(info, device, where)
        flat, _ = R.flat_fields(abstract)
        args: dict = {"lora": ocp.args.StandardRestore(flat)}
        rd = codec.Reader(where)
        stored = state.get("items")
        if not isinstance(stored, dict):
            raise rd.error("items", f"expected a dict of items, got {stored!r}")
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        for name, item in stored.items():
            arrays = item.get("arrays") if isinstance(item, dict) else None
            if not isinstance(arrays, list):
                raise rd.error(name, "an item needs 'tree' and 'arrays'")
            if arrays:
                args[name] = ocp.args.StandardRestore(as_dict(
                    [codec.shape_dtype(a, rd, f"{name}/arrays/{i}", sharding=one)
                     for i, a in enumerate(arrays)]))
        got = files.orbax_read(where, lambda: self._restore_items(step, args))
        jax.block_until_ready({name: dict(got[name]) for name in args})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def size(self, step: int | None = None) -> int:
        """Bytes on disk of a checkpoint (default: the latest), after pending writes."""
        self.wait()
        return files.disk_size(os.path.join(self.directory, str(self._step(step))))

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of a step: adapter info, structures, user meta."""
        step = self._step(step)
        where = f"checkpoint step {step} in {self.directory}"
        state = files.orbax_read(f"the metadata of {where}", lambda: self._restore_items(
            step, {"state": ocp.args.JsonRestore()})["state"])
        if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
            raise CheckpointError(f"{where} is not a lora_jax train state")
        return state

    def _restore_items(self, step: int, items: dict) -> Any:
        """Orbax's restore of ``items`` of a step, failing on every process together (a
        damaged file seen by one process would leave the others at Orbax's barrier)."""
        with agreed_checkpointer() as ck:
            return ck.restore(os.path.join(self.directory, str(step)),
                              ocp.args.Composite(**items))

    def _step(self, step):
        if step is not None:
            step = V.integer(step, "Manager: step", low=0)
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"steps are {self.steps}")
        return step

    # -- save / restore
    def save(self, step: int, *, lora: PyTree, opt_state: PyTree = None,
             adalora: PyTree = None, rng: PyTree = None, meta: Any = None,
             force: bool = False) -> bool:
        """Saves the train state of ``step`` (asynchronously by default).

        Args:
          step: the step number, an integer >= 0 (a 0-d integer array is fine).
          lora: the adapter tree (the base model is never saved).
          opt_state: optax state (any pytree of arrays; optax's state classes, and classes
            given to :func:`register`, are rebuilt on restore).
          adalora: :class:`lora_jax.adalora.AllocatorState`.
          rng: a PRNG key (typed or raw) or a pytree of them.
          meta: JSON-like user data (e.g. a dataclass config).
          force: save even if ``save_interval_steps`` would skip this step.

        Returns:
          Whether a checkpoint was started: False only for a step that
          ``save_interval_steps`` skips.

        Raises:
          CheckpointBusyError: another writer holds the directory's lock (after ``wait``).
          CheckpointStorageError: storage stopped this save, or an earlier asynchronous one
            (the message names the file and the cause, and says whether the latest complete
            step is intact: it and every item it holds are read again to check); or
            ``directory`` was removed (or a parent) after the Manager opened it.
          StepExistsError: (a ValueError) ``step`` exists or is not above the latest step,
            and ``on_existing`` is ``"error"``; nothing is written.
          TypeError: (before anything is written) a base weight such as a ``QuantizedArray``,
            an int4/uint4 array, or an unregistered NamedTuple/dataclass in ``opt_state``,
            ``adalora`` or ``rng``, naming its path.
        """
        step = V.integer(step, "Manager.save: step", low=0)
        info, lora_arrays = adapter_meta(lora, meta, "Manager.save")
        state = {"format": TRAIN_FORMAT, "format_version": FORMAT_VERSION, "step": step,
                 "adapter": info, "items": {}}
        args: dict[str, ocp.args.CheckpointArgs] = {
            "lora": ocp.args.StandardSave(as_dict(lora_arrays))}
        names = codec.type_names()
        for name, tree in (("opt_state", opt_state), ("adalora", adalora), ("rng", rng)):
            _check_storable(name, tree)
            arrays: list = []
            enc = codec.encode(tree, arrays, names, name)
            state["items"][name] = {"tree": enc, "arrays": [array_meta(x) for x in arrays]}
            if arrays:
                args[name] = ocp.args.StandardSave(as_dict(arrays))
        args["state"] = ocp.args.JsonSave(state)

        self._take_lock()
        self._empty_trash()  # steps dropped by earlier saves
        latest = self.latest_step()
        if latest is not None and step <= latest:
            steps = self.steps
            if self.on_existing == "error":
                what = "already exists" if step in steps else \
                    f"is not above the latest step {latest}"
                raise StepExistsError(
                    f"Manager.save: step {step} {what} in {self.directory} (steps {steps}); "
                    "nothing was written. To continue a run restored from an earlier step, "
                    "replacing the steps after it, open the Manager with "
                    f"on_existing='overwrite' (drops steps >= {step}); to keep them, save to "
                    f"another directory or at a step above {latest}")
            self._finish(self._mngr.wait_until_finished)  # keeps the lock, unlike wait()
            for s in self.steps:
                if s >= step:
                    self._mngr.delete(s)
        started = False

        def save():
            nonlocal started
            self._check_directory()
            self._saving.append(step)
            started = self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

        self._finish(save)
        if not self._async:
            self._saving = []  # on disk already
        if not started and (force or step % self._interval == 0):
            raise RuntimeError(f"Manager.save: Orbax declined to save step {step} in "
                               f"{self.directory} (steps {self.steps})")
        return started

    def restore(self, step: int | None = None, *, mesh: Mesh | None = None,
                specs: PyTree | None = None, like: PyTree | None = None,
                base: PyTree | None = None, opt_state: PyTree | None = None) -> TrainState:
        """Restores a step (default: the latest complete one), placed on ``mesh``.

        Args:
          step: which step; ``None`` for the latest.
          mesh: the mesh to restore onto, which need not be the one saved from; ``None``
            restores onto one device.
          specs: adapter specs (from :func:`lora_jax.sharding.specs`) or base specs; the
            optimizer and AdaLoRA state follow the adapters (:func:`~lora_jax.sharding.
            state_specs`); default replicated.
          like: adapter tree the checkpoint must match (targets, shapes, static fields).
          base: base params the adapters must fit.
          opt_state: a template (arrays or ShapeDtypeStructs, e.g. ``jax.eval_shape(tx.init,
            lora)``) the optimizer state must match; its structure is used.

        Returns:
          A :class:`TrainState`; absent items are ``None``.

        Raises:
          FileNotFoundError: no such checkpoint.
          CheckpointError: (a ValueError) the step is damaged or names an unregistered type.
          ValueError: (before any array is read) the checkpoint does not fit ``like``,
            ``base`` or ``opt_state``, naming the first mismatch.
        """
        self.wait()  # a restore sees every save that was started before it
        step = self._step(step)
        state = self.metadata(step)
        where = f"checkpoint step {step} in {self.directory}"
        info = check_format(state.get("adapter"), where)
        abstract = R.abstract_lora(info, R.unsharded, where)
        check_fit(abstract, like, base, where)
        shard, lspecs = R.lora_shardings(abstract, mesh, specs)
        abstract = R.abstract_lora(info, shard, where)

        rd = codec.Reader(where)
        stored = state.get("items")
        if not isinstance(stored, dict) or not set(stored) <= set(_ITEMS):
            raise rd.error("items", f"expected a subset of {list(_ITEMS)}, got "
                           f"{list(stored) if isinstance(stored, dict) else stored!r}")
        args, items, counts = {}, {}, {}
        flat_lora, where_lora = R.flat_fields(abstract)
        args["lora"] = ocp.args.StandardRestore(flat_lora)
        for name, item in stored.items():
            if not isinstance(item, dict) or not isinstance(item.get("arrays"), list):
                raise rd.error(name, "an item needs 'tree' and 'arrays'")
            shapes = [codec.shape_dtype(a, rd, f"{name}/arrays/{i}")
                      for i, a in enumerate(item["arrays"])]
            if name == "opt_state" and opt_state is not None:
                tree = R.match_template(opt_state, shapes, where)
            else:
                tree = codec.decode(item.get("tree"), shapes, rd, name)
            items[name], counts[name] = tree, len(shapes)
            if not shapes:
                continue
            # Shardings follow the tree's paths; arrays are stored in encoding order.
            shardings = R.tree_shardings(tree, mesh, lspecs)
            pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
            by_id = {id(x): sh for x, sh in pairs}
            if len(by_id) != len(shapes):
                raise rd.error(name, f"the tree uses {len(by_id)} of its {len(shapes)} arrays")
            args[name] = ocp.args.StandardRestore(as_dict(
                [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_id[id(x)]) for x in shapes]))
        got = files.orbax_read(f"the arrays of {where}", lambda: self._restore_items(
            step, args))

        leaves = {p: {} for p in abstract}
        for (p, name), key in zip(where_lora, flat_lora):
            leaves[p][name] = got["lora"][key]
        lora = R.rebuild_like({p: leaf.replace(**leaves[p]) for p, leaf in abstract.items()}, like)
        out = {}
        for name, tree in items.items():
            if counts[name] == 0:
                out[name] = tree
                continue
            arrays = [got[name][f"{i:06d}"] for i in range(counts[name])]
            if name == "opt_state" and opt_state is not None:
                out[name] = jax.tree.structure(tree).unflatten(arrays)
            else:  # typed keys and Python scalars come back as such
                out[name] = codec.decode(stored[name]["tree"], arrays, rd, name)
        return TrainState(step=step, lora=lora, opt_state=out.get("opt_state"),
                          adalora=out.get("adalora"), rng=out.get("rng"),
                          meta=info.get("meta"))

