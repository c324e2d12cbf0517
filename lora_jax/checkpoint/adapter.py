"""Adapter checkpoints: the metadata describing an adapter tree, its fit to a model, and
:func:`save_adapter`, :func:`load_adapter`, :func:`adapter_info`.

An adapter checkpoint is one Orbax checkpoint of two items: ``arrays`` (the adapter arrays)
and ``adapter`` (JSON: the format version, every target path with its leaf kind, rank, alpha,
scale, kernel shape and static fields, and user meta), so loading needs no arguments. A
:class:`~lora_jax.checkpoint.Manager` step holds the same metadata and arrays, which is why
:func:`load_adapter` also reads the adapter of one step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lora_jax import lora as L
from lora_jax import validation as V
from lora_jax.checkpoint import codec, collective, files, lock
from lora_jax.checkpoint import restore as R
from lora_jax.checkpoint.codec import CheckpointError

PyTree = Any
FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
TRAIN_FORMAT = "lora_jax.train_state"  # a Manager step's JSON, which holds an adapter's


# ----------------------------------------------------------------------------------------
# Metadata


def array_meta(x) -> dict:
    """``{"shape": [...], "dtype": "float32"}`` of an array (a PRNG key: of its key data)."""
    dtype = jax.random.key_data(x).dtype if codec.is_key(x) else x.dtype
    return {"shape": list(x.shape), "dtype": np.dtype(dtype).name}


def as_dict(arrays: list) -> dict:
    """A list of arrays as the ``{"000000": x, ...}`` item Orbax stores."""
    return {f"{i:06d}": x for i, x in enumerate(arrays)}


def _jsonable(obj, where: str = "meta"):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and np.size(obj) == 1:
        return np.asarray(obj).item()
    raise TypeError(f"{where} is a {type(obj).__name__}; meta must be JSON-like (dicts, lists, "
                    "numbers, strings, dataclasses)")


def adapter_meta(lora: PyTree, meta: Any, where: str) -> tuple[dict, list]:
    """``(JSON metadata, arrays in storage order)`` of an adapter tree; errors name ``where``."""
    try:
        leaves = L.leaves(lora)
    except TypeError as e:
        raise TypeError(f"{where}: {e}; pass the adapter tree (never the base params)") from None
    if not leaves:
        raise ValueError(f"{where}: the LoRA tree holds no adapter leaf: nothing to save")
    names = codec.type_names()
    arrays: list = []
    entries: list[dict[str, Any]] = []
    for path, leaf in leaves.items():
        V.adapter_leaf(path, leaf, where)
        enc = codec.encode(leaf, arrays, names, path)
        fields = {n: {**array_meta(arrays[c["i"]]), "i": c["i"]}
                  for n, c in zip(enc["f"], enc["c"]) if c["t"] == "array"}
        entries.append({"path": path, "kind": leaf.kind, "class": enc["cls"], "r": leaf.r,
                        "alpha": float(leaf.hparams().get("alpha", leaf.scale * leaf.r)),
                        "scale": float(leaf.scale), "kernel_shape": list(leaf.kernel_shape),
                        "static": enc["static"], "arrays": fields})

    def uniform(key):
        vals = {e[key] for e in entries}
        return vals.pop() if len(vals) == 1 else {e["path"]: e[key] for e in entries}

    kinds = sorted({e["kind"] for e in entries})
    info = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "lora_jax_version": _version(), "kind": kinds[0] if len(kinds) == 1 else kinds,
            "targets": list(leaves), "r": uniform("r"), "alpha": uniform("alpha"),
            "param_count": L.param_count(lora), "leaves": entries,
            "meta": None if meta is None else _jsonable(meta)}
    return info, arrays


def _version() -> str:
    import lora_jax

    return getattr(lora_jax, "__version__", "unknown")


def check_format(info: Any, where: str) -> dict:
    """``info`` if it is adapter metadata this version reads; else raises
    :class:`CheckpointError`."""
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{where} is not a lora_jax adapter (format {got!r})")
    version = info.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} has adapter format version {version}; this lora_jax "
                              f"reads versions up to {FORMAT_VERSION}: upgrade lora_jax")
    if not isinstance(info.get("leaves"), list):
        raise CheckpointError(f"{where}: the adapter metadata has no list of leaves")
    return info


# ----------------------------------------------------------------------------------------
# Fit to the model


def check_fit(abstract: dict, like: PyTree | None, base: PyTree | None, where: str) -> None:
    """Clear errors, before anything is read, when the checkpoint does not fit the model.

    ``abstract`` is ``{path: leaf}`` as stored; ``like`` an adapter tree it must match
    (targets, kinds, shapes, static fields); ``base`` the base params it must fit
    (:func:`lora_jax.lora.check_fits`).
    """
    if like is not None:
        try:
            want = L.leaves(like)
        except TypeError as e:
            raise TypeError(f"{where}: like= must be an adapter tree: {e}") from None
        extra, missing = sorted(set(abstract) - set(want)), sorted(set(want) - set(abstract))
        if extra or missing:
            raise ValueError(f"{where} does not fit the model: it has adapters for {extra or 'no'}"
                             f" extra and lacks {missing or 'no'} expected targets")
        for path, w in want.items():
            got = abstract[path]
            if type(got) is not type(w):
                raise ValueError(f"{where}: {path!r} is a {type(got).__name__} in the checkpoint,"
                                 f" a {type(w).__name__} in the model")
            stored = codec.array_fields(got)
            for name, x in codec.array_fields(w).items():
                y = stored[name]
                if x is not None and tuple(y.shape) != tuple(x.shape):
                    raise ValueError(f"{where}: {path}/{name} has shape {tuple(y.shape)} in the "
                                     f"checkpoint, {tuple(x.shape)} in the model")
            for f in dataclasses.fields(w):
                if not f.metadata.get("pytree_node", True) and \
                        getattr(got, f.name) != getattr(w, f.name):
                    raise ValueError(f"{where}: {path!r} has {f.name}={getattr(got, f.name)!r} in"
                                     f" the checkpoint, {getattr(w, f.name)!r} in the model")
    if base is not None:
        V.params_tree(base, where, "base=")

        def fits(lora):  # traced: the stored leaves are shapes, and so may the base's be
            L.check_fits(base, lora, where=where)

        try:
            jax.eval_shape(fits, L.from_leaves(abstract))
        except ValueError as e:
            raise ValueError(f"{where} does not fit the base model: {e}") from None


# ----------------------------------------------------------------------------------------
# Save, read, load


def agreed_checkpointer() -> ocp.Checkpointer:
    """An Orbax Checkpointer whose handler's saves and restores fail on every process
    together: a write or read that fails on one process would otherwise leave the others at
    Orbax's next barrier (:mod:`lora_jax.checkpoint.collective`)."""
    handler = ocp.CompositeCheckpointHandler()
    save, restore = handler.save, handler.restore
    # Bound on the instance: Orbax finds the Args classes by the handler's type, kept as is.

    def agreed_save(directory: Any, *args: Any, **kwargs: Any) -> Any:
        return collective.run_everywhere("writing the checkpoint",
                                         lambda: save(directory, *args, **kwargs))

    def agreed_restore(directory: Any, args: Any = None) -> Any:
        return collective.run_everywhere("reading the checkpoint",
                                         lambda: restore(directory, args=args))

    handler.save = agreed_save  # type: ignore[method-assign]
    handler.restore = agreed_restore  # type: ignore[method-assign]
    return ocp.Checkpointer(handler)


def save_adapter(path: str | os.PathLike, lora: PyTree, *, meta: Any = None,
                 overwrite: bool = False, wait: float = 0.0) -> int:
    """Saves an adapter tree (LoRA or AdaLoRA, never the base) as an Orbax checkpoint.

    The metadata records the format version, every target path with its leaf kind, rank,
    alpha, scale, kernel shape and static fields, so :func:`load_adapter` needs no arguments.

    Args:
      path: a directory to create.
      lora: the adapter tree (sharded arrays are fine; each host writes its shards).
      meta: optional JSON-like user data (a dataclass config, a dict), returned by
        :func:`adapter_info`.
      overwrite: replace an existing adapter at ``path``. The new one is written completely
        beside it first, then swapped in. A crash at any point leaves either adapter whole,
        and the next save or load of ``path`` settles on the newest complete one and removes
        the leftovers (see :mod:`lora_jax.checkpoint`).
      wait: seconds to wait for another writer of ``path`` to finish (one writer at a time:
        :mod:`lora_jax.checkpoint.lock`); 0 raises at once.

    Returns:
      The adapter's size on disk in bytes.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      CheckpointBusyError: another writer holds ``path``'s lock (after ``wait`` seconds).
      CheckpointStorageError: the disk, a file-size limit, a quota or a permission stopped the
        write; the message names the file and says whether the previous adapter is intact
        (it is read again to check).
      TypeError/ValueError: ``lora`` holds something other than adapter leaves, a leaf whose
        factors do not chain, or ``meta`` is not JSON-like.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    info, arrays = adapter_meta(lora, meta, "save_adapter")

    def write(target: str) -> None:
        with agreed_checkpointer() as ck:
            ck.save(target, ocp.args.Composite(adapter=ocp.args.JsonSave(info),
                                               arrays=ocp.args.StandardSave(as_dict(arrays))))

    wait = lock.wait_seconds(wait, "save_adapter: wait")
    files.write_dir(path, write, overwrite=overwrite, what="save_adapter", wait=wait,
                    verify=_read_whole)
    return files.disk_size(path)


def _read_whole(path: str) -> None:
    """Reads the adapter at ``path`` completely (metadata and every array), onto this host."""
    info, item = _read_info(path)
    abstract = R.abstract_lora(info, R.lora_shardings({}, None, None)[0], path)
    jax.block_until_ready(_restore_arrays(path, item, abstract))


def adapter_info(path: str | os.PathLike) -> dict:
    """The metadata of a saved adapter or :class:`~lora_jax.checkpoint.Manager` step (format,
    targets, ranks, alphas, user meta) plus its ``"nbytes"`` on disk."""

    def read(directory: str) -> dict:
        info, _ = _read_info(directory)
        R.abstract_lora(info, R.unsharded, directory)  # a damaged or foreign file is reported
        return {**info, "nbytes": files.disk_size(directory)}

    return files.read_stable(path, read)


def _read_info(path: str) -> tuple[dict, str]:
    """(adapter metadata, name of the array item) of an adapter or a Manager step."""
    train = files.is_step_dir(path)
    item = "state" if train else "adapter"

    def read():
        with agreed_checkpointer() as ck:
            return ck.restore(path, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    info = files.orbax_read(f"the metadata of {path}", read)
    if train:
        if not isinstance(info, dict) or info.get("format") != TRAIN_FORMAT:
            raise CheckpointError(f"{path} is not a lora_jax train state")
        info = info.get("adapter")
    return check_format(info, path), "lora" if train else "arrays"


def load_adapter(path: str | os.PathLike, *, like: PyTree | None = None,
                 base: PyTree | None = None, mesh: Mesh | None = None,
                 specs: PyTree | None = None) -> PyTree:
    """Loads an adapter saved by :func:`save_adapter`, or the adapter of a
    :class:`~lora_jax.checkpoint.Manager` step (``<directory>/<step>``), e.g. to export it.

    Args:
      path: the adapter directory, or a step directory of a Manager.
      like: an adapter tree (arrays or ShapeDtypeStructs) the checkpoint must match: same
        targets, kinds, shapes and static fields; the result takes its tree structure.
      base: the base params (or their shapes) the adapter must fit.
      mesh: restore sharded on this mesh (default: one device).
      specs: adapter specs (from :func:`lora_jax.sharding.specs`) or base specs to derive
        them from; default replicated on ``mesh``.

    Returns:
      The adapter tree (nested dicts of adapter leaves unless ``like`` says otherwise).

    Raises:
      FileNotFoundError: nothing at ``path`` (the message suggests close names).
      CheckpointError: (a ValueError) ``path`` is not an adapter (an empty folder, a
        Manager root, a PEFT folder...), is damaged, has a newer format, or names a
        type that is not registered.
      ValueError: (before any array is read) a mismatch with ``like`` or ``base`` that names
        the parameter.
    """

    def read(directory: str) -> dict:
        info, item = _read_info(directory)
        abstract = R.abstract_lora(info, R.unsharded, directory)
        check_fit(abstract, like, base, f"adapter {directory}")
        shard, _ = R.lora_shardings(abstract, mesh, specs)
        abstract = R.abstract_lora(info, shard, directory)
        return _restore_arrays(directory, item, abstract)

    return R.rebuild_like(files.read_stable(path, read), like)


def _restore_arrays(path: str, item: str, abstract: dict) -> dict:
    """Restores the adapter arrays of ``abstract`` (``{path: leaf of ShapeDtypeStructs}``)."""
    flat, where = R.flat_fields(abstract)

    def read():
        with agreed_checkpointer() as ck:
            return ck.restore(path, ocp.args.Composite(
                **{item: ocp.args.StandardRestore(flat)}))[item]

    got = files.orbax_read(f"the arrays of {path}", read)
    out: dict[str, dict] = {p: {} for p in abstract}
    for (p, name), key in zip(where, flat):
        out[p][name] = got[key]
    return {p: leaf.replace(**out[p]) for p, leaf in abstract.items()}
