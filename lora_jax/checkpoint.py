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
  ``.old-*``, ``*.orbax-checkpoint-tmp*``) are removed. One writer per path at a time.
* :meth:`Manager.save` never skips a step silently: saving a step that exists, or one not
  above the latest, raises unless the :class:`Manager` was opened with
  ``on_existing="overwrite"``, which first drops every step from that one up (the abandoned
  later steps of a run resumed from an earlier step).

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

import dataclasses
import difflib
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lora_jax import codec as _codec
from lora_jax import lora as L
from lora_jax import protocols
from lora_jax import paths as P
from lora_jax import sharding as S
from lora_jax import validation as V
from lora_jax.codec import CheckpointError  # noqa: F401 - part of this module's API
from lora_jax.codec import register  # noqa: F401 - part of this module's API

PyTree = Any
FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
_TRAIN_FORMAT = "lora_jax.train_state"
_TRASH = "_deleted"  # Manager: dropped steps wait here (unlisted) until removed
_ITEMS = ("opt_state", "adalora", "rng")  # what a train state holds besides the adapter
ON_EXISTING = ("error", "overwrite")


# ----------------------------------------------------------------------------------------
# Arrays and user metadata


def _check_storable(item: str, tree: PyTree) -> None:
    """Clear errors, before anything is written, for leaves a train state cannot hold."""
    for path, x in P.flatten(tree):
        where = f"{item}/{path}" if path else item
        if protocols.is_base_leaf(x):
            raise TypeError(f"{where} is a {type(x).__name__}, a base weight: checkpoints hold "
                            "adapters and train state, never the base model")
        if str(getattr(x, "dtype", "")) in ("int4", "uint4"):
            raise TypeError(f"{where}: Orbax cannot write {x.dtype} arrays; store them as "
                            "int8/uint8 (e.g. QuantizedArray.with_storage('packed'))")


def _array_meta(x) -> dict:
    dtype = jax.random.key_data(x).dtype if _codec.is_key(x) else x.dtype
    return {"shape": list(x.shape), "dtype": np.dtype(dtype).name}


def _as_dict(arrays: list) -> dict:
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


# ----------------------------------------------------------------------------------------
# Adapter metadata


def _adapter_meta(lora: PyTree, meta: Any, where: str) -> tuple[dict, list]:
    try:
        leaves = L.leaves(lora)
    except TypeError as e:
        raise TypeError(f"{where}: {e}; pass the adapter tree (never the base params)") from None
    if not leaves:
        raise ValueError(f"{where}: the LoRA tree holds no adapter leaf: nothing to save")
    names = _codec.type_names()
    arrays: list = []
    entries = []
    for path, leaf in leaves.items():
        V.adapter_leaf(path, leaf, where)
        enc = _codec.encode(leaf, arrays, names, path)
        fields = {n: {**_array_meta(arrays[c["i"]]), "i": c["i"]}
                  for n, c in zip(enc["f"], enc["c"]) if c["t"] == "array"}
        entries.append({"path": path, "kind": leaf.kind, "class": enc["cls"], "r": int(leaf.r),
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


def _check_format(info: Any, where: str) -> None:
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


def _abstract_lora(info: dict, shardings, where: str) -> dict[str, L.LowRankLeaf]:
    """``{path: leaf}`` whose arrays are ShapeDtypeStructs (``shardings(path, field, shape)``).

    Every leaf is checked (registered adapter class, numeric arrays, factors that chain,
    finite alpha) before any array is read.
    """
    rd = _codec.Reader(where)
    out = {}
    for n, e in enumerate(info["leaves"]):
        node = f"leaves/{n}"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise rd.error(node, "an adapter entry needs a 'path' string")
        path = e["path"]
        cls = rd.type(e.get("class"), node)
        if not issubclass(cls, L.LowRankLeaf):
            raise rd.error(node, f"{path!r}: {e.get('class')} is not an adapter leaf kind")
        fields = e.get("arrays")
        if not isinstance(fields, dict):
            raise rd.error(node, "'arrays' must map field names to shapes")
        arrays = {}
        for name, a in fields.items():
            sds = _codec.shape_dtype(a, rd, f"{node}/arrays/{name}")
            arrays[name] = jax.ShapeDtypeStruct(sds.shape, sds.dtype,
                                                sharding=shardings(path, name, sds.shape))
        leaf = _codec.build(cls, arrays, e.get("static", {}), rd, node)
        try:
            V.adapter_leaf(path, leaf, where)
        except (TypeError, ValueError) as err:
            raise CheckpointError(str(err)) from None
        if path in out:
            raise rd.error(node, f"{path!r} appears twice")
        out[path] = leaf
    return out


def _check_fit(abstract: dict, like: PyTree | None, base: PyTree | None, where: str) -> None:
    """Clear errors, before anything is read, when the checkpoint does not fit the model."""
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
            for name, x in S._fields(w).items():
                y = getattr(got, name)
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
        kernels = dict(P.flatten(base))
        for path, leaf in abstract.items():
            if path not in kernels:
                raise ValueError(f"{where} does not fit the base model: it adapts {path!r}, "
                                 f"which the base lacks (base has e.g. {sorted(kernels)[:4]})")
            shape = tuple(getattr(kernels[path], "shape", ()))
            if shape != tuple(leaf.kernel_shape):
                raise ValueError(f"{where} does not fit the base model: the adapter at {path!r}"
                                 f" fits a kernel of shape {tuple(leaf.kernel_shape)}, the base "
                                 f"kernel has shape {shape}")


def _lora_shardings(abstract_leaves: dict, mesh: Mesh | None, specs: PyTree | None):
    """``(path, field, shape) -> Sharding`` for restoring adapters."""
    if mesh is None:
        if specs is not None:
            raise ValueError("specs need a mesh")
        dev = SingleDeviceSharding(jax.local_devices()[0])
        return lambda path, name, shape: dev, None
    tree = L.from_leaves(abstract_leaves)
    if specs is None:
        lspecs = S.specs(tree, None, policy="replicate")
    elif any(L.is_lowrank(x) for x in jax.tree.leaves(specs, is_leaf=L.is_lowrank)):
        lspecs = specs  # already adapter specs (from lora_jax.sharding.specs)
    else:
        lspecs = S.specs(tree, specs, mesh=mesh)  # base specs
    table = {p: S._fields(x) for p, x in L.leaves(lspecs).items()}

    def f(path, name, shape):
        try:
            spec = table[path][name]
        except KeyError:
            raise ValueError(f"specs have no entry for {path}/{name}") from None
        S._check_divides(mesh, spec, shape, f"specs for {path}/{name}")
        return NamedSharding(mesh, spec)

    return f, lspecs


def _tree_shardings(abstract: PyTree, mesh: Mesh | None, lspecs: PyTree | None) -> PyTree:
    if mesh is None:
        dev = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: dev, abstract)
    return S.named(mesh, S.state_specs(abstract, lspecs) if lspecs is not None
                   else jax.tree.map(lambda _: PartitionSpec(), abstract))


def _rebuild_like(leaves: dict, like: PyTree | None) -> PyTree:
    if like is None:
        return L.from_leaves(leaves)
    _, tdef = jax.tree_util.tree_flatten(like, is_leaf=L.is_lowrank)
    return tdef.unflatten([leaves[p] for p in L.leaves(like)])


def _orbax_restore(what: str, fn):
    """Runs an Orbax read; its errors (which name no file) come back naming ``what``."""
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        raise CheckpointError(f"{what} cannot be read ({type(e).__name__}: {e}); the checkpoint "
                              "is damaged or incomplete") from e


# ----------------------------------------------------------------------------------------
# Adapter-only checkpoints: the files, a crash at any point, and folders that are not ours


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path`` (a checkpoint directory)."""
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


def _recover(path: str) -> None:
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


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _recovered(path: str) -> str:
    """``path`` after recovering from killed saves; read-only folders are resolved in place."""
    if jax.process_index() == 0 and not _is_step_dir(path):  # a Manager cleans its own steps
        try:
            _recover(path)
        except OSError:
            pass  # e.g. a read-only copy: read the newest complete one where it is
    _sync("lora_jax.checkpoint.recover")
    done, _ = _leftovers(path)
    return done[-1] if done else path


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "adapter")) and os.path.isdir(
        os.path.join(path, "arrays"))


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(
        os.path.join(path, "lora"))


def _not_ours(path: str, want: str) -> str | None:
    """Why ``path`` (an existing directory) is not a ``want``, or None if it may be one."""
    entries = sorted(os.listdir(path))
    steps = sorted(int(e) for e in entries if e.isdigit() and os.path.isdir(
        os.path.join(path, e)))
    if want != "manager" and (_is_adapter_dir(path) or _is_step_dir(path)):
        return None
    if want == "manager" and not (_is_adapter_dir(path) or _is_step_dir(path)) and \
            "adapter_config.json" not in entries:
        return None
    if "adapter_config.json" in entries:
        return (f"{path} is a Hugging Face PEFT adapter folder; read it with "
                "lora_jax.peft.load(path, params)")
    if _is_adapter_dir(path):
        return (f"{path} is an adapter written by save_adapter, not a Manager directory; give "
                "the Manager a directory of its own")
    if _is_step_dir(path):
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


def _adapter_dir(path) -> str:
    """The directory to read for the adapter at ``path``, after crash recovery and checks."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    path = _recovered(path)
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file; an adapter checkpoint is a directory written "
                              "by save_adapter (or a Manager step)")
    if not os.path.isdir(path):
        raise _missing(path, "adapter checkpoint")
    why = _not_ours(path, "adapter")
    if why:
        raise CheckpointError(why)
    return path


def save_adapter(path: str | os.PathLike, lora: PyTree, *, meta: Any = None,
                 overwrite: bool = False) -> int:
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
        the leftovers (see the module docstring).

    Returns:
      The adapter's size on disk in bytes.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      TypeError/ValueError: ``lora`` holds something other than adapter leaves, a leaf whose
        factors do not chain, or ``meta`` is not JSON-like.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    info, arrays = _adapter_meta(lora, meta, "save_adapter")
    if jax.process_index() == 0:
        _recover(path)  # an earlier save killed half-way
    _sync("lora_jax.checkpoint.save_adapter.recover")
    exists = os.path.lexists(path)
    if exists and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if exists and not os.path.isdir(path):
        raise FileExistsError(f"{path} is a file, not an adapter; remove it first")
    if exists:
        seq = _seq(path)
        if jax.process_count() > 1:  # every host writes into the same directory
            from jax.experimental import multihost_utils

            seq = bytes(multihost_utils.broadcast_one_to_all(
                np.frombuffer(seq.encode(), np.uint8))).decode()
        target = f"{path}.incoming-{seq}"
    else:
        target = path
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(target, ocp.args.Composite(adapter=ocp.args.JsonSave(info),
                                           arrays=ocp.args.StandardSave(_as_dict(arrays))))
    if target != path and jax.process_index() == 0:
        _recover(path)  # target is the newest complete copy: swapped in, the old one removed
    _sync("lora_jax.checkpoint.save_adapter.swap")
    return disk_size(path)


def adapter_info(path: str | os.PathLike) -> dict:
    """The metadata of a saved adapter or :class:`Manager` step (format, targets, ranks,
    alphas, user meta) plus its ``"nbytes"`` on disk."""
    path = _adapter_dir(path)
    info, _ = _read_info(path)
    _abstract_lora(info, lambda *_: None, path)  # a damaged or foreign file is reported
    return {**info, "nbytes": disk_size(path)}


def _read_info(path: str) -> tuple[dict, str]:
    """(adapter metadata, name of the array item) of an adapter or a Manager step."""
    train = _is_step_dir(path)
    item = "state" if train else "adapter"

    def read():
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
            return getattr(ck.restore(path, ocp.args.Composite(
                **{item: ocp.args.JsonRestore()})), item)

    info = _orbax_restore(f"the metadata of {path}", read)
    if train:
        if not isinstance(info, dict) or info.get("format") != _TRAIN_FORMAT:
            raise CheckpointError(f"{path} is not a lora_jax train state")
        info = info.get("adapter")
    _check_format(info, path)
    return info, "lora" if train else "arrays"


def load_adapter(path: str | os.PathLike, *, like: PyTree | None = None,
                 base: PyTree | None = None, mesh: Mesh | None = None,
                 specs: PyTree | None = None) -> PyTree:
    """Loads an adapter saved by :func:`save_adapter`, or the adapter of a :class:`Manager`
    step (``<directory>/<step>``), e.g. to export it.

    Args:
      path: the adapter directory, or a step directory of a :class:`Manager`.
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
        :class:`Manager` root, a PEFT folder...), is damaged, has a newer format, or names a
        type that is not registered.
      ValueError: (before any array is read) a mismatch with ``like`` or ``base`` that names
        the parameter.
    """
    path = _adapter_dir(path)
    info, item = _read_info(path)
    abstract = _abstract_lora(info, lambda *_: None, path)
    _check_fit(abstract, like, base, f"adapter {path}")
    shard, _ = _lora_shardings(abstract, mesh, specs)
    abstract = _abstract_lora(info, shard, path)
    arrays = _restore_arrays(path, item, abstract)
    return _rebuild_like(arrays, like)


def _flat_fields(abstract: dict) -> tuple[dict, list]:
    """Adapter arrays as ``{"000000": x, ...}`` plus the ``(path, field)`` of each entry."""
    flat, where = {}, []
    for p, leaf in abstract.items():
        for name, x in S._fields(leaf).items():
            if x is not None:
                flat[f"{len(flat):06d}"] = x
                where.append((p, name))
    return flat, where


def _restore_arrays(path: str, item: str, abstract: dict) -> dict:
    """Restores the adapter arrays of ``abstract`` (``{path: leaf of ShapeDtypeStructs}``)."""
    flat, where = _flat_fields(abstract)

    def read():
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
            return getattr(ck.restore(path, ocp.args.Composite(
                **{item: ocp.args.StandardRestore(flat)})), item)

    got = _orbax_restore(f"the arrays of {path}", read)
    out = {p: {} for p in abstract}
    for (p, name), key in zip(where, flat):
        out[p][name] = got[key]
    return {p: leaf.replace(**out[p]) for p, leaf in abstract.items()}


# ----------------------------------------------------------------------------------------
# Full train state


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

    Raises:
      ValueError: ``directory`` is an adapter, one step of a Manager, or a PEFT folder; a bad
        option. NotADirectoryError: ``directory`` is a file.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, save_interval_steps: int = 1,
                 keep_period: int | None = None, on_existing: str = "error"):
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
        if os.path.isdir(self.directory):
            why = _not_ours(self.directory, "manager")
            if why:
                raise ValueError(f"Manager: {why}")
        self.on_existing = on_existing
        self._interval = save_interval_steps
        # Old steps are renamed out of the way (atomic) instead of deleted in place: a process
        # killed half-way through an rmtree would otherwise leave a listed, broken step.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            keep_period=keep_period, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True, todelete_subdir=_TRASH)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
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
        """Blocks until pending asynchronous saves are on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()
        self._empty_trash()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def size(self, step: int | None = None) -> int:
        """Bytes on disk of a checkpoint (default: the latest), after pending writes."""
        self.wait()
        return disk_size(os.path.join(self.directory, str(self._step(step))))

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of a step: adapter info, structures, user meta."""
        step = self._step(step)
        where = f"checkpoint step {step} in {self.directory}"
        state = _orbax_restore(f"the metadata of {where}", lambda: self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.JsonRestore())).state)
        if not isinstance(state, dict) or state.get("format") != _TRAIN_FORMAT:
            raise CheckpointError(f"{where} is not a lora_jax train state")
        return state

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
          StepExistsError: (a ValueError) ``step`` exists or is not above the latest step,
            and ``on_existing`` is ``"error"``; nothing is written.
          TypeError: (before anything is written) a base weight such as a ``QuantizedArray``,
            an int4/uint4 array, or an unregistered NamedTuple/dataclass in ``opt_state``,
            ``adalora`` or ``rng``, naming its path.
        """
        step = V.integer(step, "Manager.save: step", low=0)
        info, lora_arrays = _adapter_meta(lora, meta, "Manager.save")
        state = {"format": _TRAIN_FORMAT, "format_version": FORMAT_VERSION, "step": step,
                 "adapter": info, "items": {}}
        args = {"lora": ocp.args.StandardSave(_as_dict(lora_arrays))}
        names = _codec.type_names()
        for name, tree in (("opt_state", opt_state), ("adalora", adalora), ("rng", rng)):
            _check_storable(name, tree)
            arrays: list = []
            enc = _codec.encode(tree, arrays, names, name)
            state["items"][name] = {"tree": enc, "arrays": [_array_meta(x) for x in arrays]}
            if arrays:
                args[name] = ocp.args.StandardSave(_as_dict(arrays))
        args["state"] = ocp.args.JsonSave(state)

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
            self.wait()
            for s in self.steps:
                if s >= step:
                    self._mngr.delete(s)
        started = bool(self._mngr.save(step, args=ocp.args.Composite(**args), force=force))
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
        info = state.get("adapter")
        _check_format(info, where)
        abstract = _abstract_lora(info, lambda *_: None, where)
        _check_fit(abstract, like, base, where)
        shard, lspecs = _lora_shardings(abstract, mesh, specs)
        abstract = _abstract_lora(info, shard, where)

        rd = _codec.Reader(where)
        stored = state.get("items")
        if not isinstance(stored, dict) or not set(stored) <= set(_ITEMS):
            raise rd.error("items", f"expected a subset of {list(_ITEMS)}, got "
                           f"{list(stored) if isinstance(stored, dict) else stored!r}")
        args, items, counts = {}, {}, {}
        flat_lora, where_lora = _flat_fields(abstract)
        args["lora"] = ocp.args.StandardRestore(flat_lora)
        for name, item in stored.items():
            if not isinstance(item, dict) or not isinstance(item.get("arrays"), list):
                raise rd.error(name, "an item needs 'tree' and 'arrays'")
            shapes = [_codec.shape_dtype(a, rd, f"{name}/arrays/{i}")
                      for i, a in enumerate(item["arrays"])]
            if name == "opt_state" and opt_state is not None:
                tree = _match_template(opt_state, shapes, where)
            else:
                tree = _codec.decode(item.get("tree"), shapes, rd, name)
            items[name], counts[name] = tree, len(shapes)
            if not shapes:
                continue
            # Shardings follow the tree's paths; arrays are stored in encoding order.
            pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(_tree_shardings(tree, mesh, lspecs)))
            by_id = {id(x): sh for x, sh in pairs}
            if len(by_id) != len(shapes):
                raise rd.error(name, f"the tree uses {len(by_id)} of its {len(shapes)} arrays")
            args[name] = ocp.args.StandardRestore(_as_dict(
                [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_id[id(x)]) for x in shapes]))
        got = _orbax_restore(f"the arrays of {where}", lambda: self._mngr.restore(
            step, args=ocp.args.Composite(**args)))

        leaves = {p: {} for p in abstract}
        for (p, name), key in zip(where_lora, flat_lora):
            leaves[p][name] = got.lora[key]
        lora = _rebuild_like({p: leaf.replace(**leaves[p]) for p, leaf in abstract.items()}, like)
        out = {}
        for name, tree in items.items():
            if counts[name] == 0:
                out[name] = tree
                continue
            arrays = [getattr(got, name)[f"{i:06d}"] for i in range(counts[name])]
            if name == "opt_state" and opt_state is not None:
                out[name] = jax.tree.structure(tree).unflatten(arrays)
            else:  # typed keys and Python scalars come back as such
                out[name] = _codec.decode(stored[name]["tree"], arrays, rd, name)
        return TrainState(step=step, lora=lora, opt_state=out.get("opt_state"),
                          adalora=out.get("adalora"), rng=out.get("rng"),
                          meta=info.get("meta"))


def _match_template(template, shapes, where):
    """The template's structure over the checkpoint's arrays, after checking they agree."""
    pairs, tdef = jax.tree_util.tree_flatten_with_path(template)
    if len(pairs) != len(shapes):
        raise ValueError(f"{where}: the optimizer state has {len(shapes)} arrays, the "
                         f"template {len(pairs)}; was it saved with another optimizer?")
    for (kp, x), a in zip(pairs, shapes):
        if tuple(getattr(x, "shape", ())) != tuple(a.shape):
            raise ValueError(f"{where}: optimizer state {P.path_str(kp)!r} has shape "
                             f"{tuple(a.shape)} in the checkpoint, "
                             f"{tuple(getattr(x, 'shape', ()))} in the template")
    return tdef.unflatten(shapes)
