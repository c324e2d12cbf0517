"""Orbax checkpoints: adapter-only directories, and the full train state per step.

Both keep arrays in Orbax's array format and everything else (leaf kinds, ranks, alphas,
targets, the structure of optimizer and AdaLoRA state) as JSON beside them, in one Orbax
checkpoint, so loading needs no arguments and no pickles. Orbax writes each checkpoint to a
temporary directory and renames it into place once complete: a save that dies half-way leaves
the previous checkpoints as they were, and the half-written one is never read. The base model
is never written: only adapter trees are accepted.

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
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import sharding as S

PyTree = Any
FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
_TRAIN_FORMAT = "lora_jax.train_state"
_TRASH = "_deleted"  # Manager: dropped steps wait here (unlisted) until removed


# ----------------------------------------------------------------------------------------
# Pytrees as JSON structure plus a flat list of arrays


def _cls_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type:
    """A class named in a checkpoint, from a module that is already imported (so that reading
    a checkpoint never imports code)."""
    module, _, qual = name.partition(":")
    obj = sys.modules.get(module)
    if obj is None:
        raise ValueError(f"the checkpoint holds a {qual} from module {module!r}, which is not "
                         "imported; import it first, or pass a template of the tree")
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _static_json(v):
    if isinstance(v, (tuple, list)):
        return {"tuple": [_static_json(x) for x in v]}
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store static field value {v!r} in a checkpoint")


def _static_value(v):
    if isinstance(v, dict) and set(v) == {"tuple"}:
        return tuple(_static_value(x) for x in v["tuple"])
    return v


def _encode(tree: PyTree, arrays: list) -> dict:
    """JSON description of ``tree``; its arrays are appended to ``arrays``."""
    if tree is None:
        return {"t": "none"}
    if _is_key(tree):
        arrays.append(jax.random.key_data(tree))
        return {"t": "key", "impl": str(jax.random.key_impl(tree)), "i": len(arrays) - 1}
    if isinstance(tree, (bool, int, float)) and not isinstance(tree, np.generic):
        arrays.append(np.asarray(tree))
        return {"t": "py", "type": type(tree).__name__, "i": len(arrays) - 1}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        arrays.append(tree)
        return {"t": "array", "i": len(arrays) - 1}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {"t": "namedtuple", "cls": _cls_name(type(tree)),
                "c": [_encode(x, arrays) for x in tree]}
    if isinstance(tree, (list, tuple)):
        return {"t": type(tree).__name__, "c": [_encode(x, arrays) for x in tree]}
    if type(tree) is dict and all(isinstance(k, (str, int)) for k in tree):
        keys = sorted(tree, key=lambda k: (isinstance(k, int), str(k)))
        return {"t": "dict", "k": keys, "c": [_encode(tree[k], arrays) for k in keys]}
    if dataclasses.is_dataclass(tree) and hasattr(tree, "replace"):  # flax.struct dataclass
        fields = dataclasses.fields(tree)
        dyn = [f.name for f in fields if f.metadata.get("pytree_node", True)]
        static = {f.name: _static_json(getattr(tree, f.name)) for f in fields
                  if not f.metadata.get("pytree_node", True)}
        return {"t": "struct", "cls": _cls_name(type(tree)), "f": dyn, "static": static,
                "c": [_encode(getattr(tree, n), arrays) for n in dyn]}
    # Any other pytree node (FrozenDict, nnx.State, ...): keep the arrays and their paths.
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    start = len(arrays)
    arrays.extend(x for _, x in pairs)
    return {"t": "opaque", "cls": _cls_name(type(tree)), "paths": [P.path_str(p) for p, _ in pairs],
            "i": list(range(start, start + len(pairs)))}


def _decode(node: dict, arrays: list) -> PyTree:
    t = node["t"]
    if t == "none":
        return None
    if t == "array":
        return arrays[node["i"]]
    if t == "key":
        x = arrays[node["i"]]
        return x if isinstance(x, jax.ShapeDtypeStruct) else jax.random.wrap_key_data(
            x, impl=node["impl"])
    if t == "py":
        x = arrays[node["i"]]
        return x if isinstance(x, jax.ShapeDtypeStruct) else {"int": int, "float": float,
                                                             "bool": bool}[node["type"]](x)
    children = [_decode(c, arrays) for c in node.get("c", [])]
    if t in ("list", "tuple"):
        return children if t == "list" else tuple(children)
    if t == "dict":
        return dict(zip(node["k"], children))
    if t == "namedtuple":
        return _resolve(node["cls"])(*children)
    if t == "struct":
        static = {k: _static_value(v) for k, v in node["static"].items()}
        return _resolve(node["cls"])(**dict(zip(node["f"], children)), **static)
    if t == "opaque":  # rebuilt as {path: array}; pass a template to get the original type
        return {p: arrays[i] for p, i in zip(node["paths"], node["i"])}
    raise ValueError(f"unknown node type {t!r} in checkpoint metadata")


def _check_storable(item: str, tree: PyTree) -> None:
    """Clear errors, before anything is written, for leaves a train state cannot hold."""
    for path, x in P.flatten(tree):
        where = f"{item}/{path}" if path else item
        if P.is_base_leaf(x):
            raise TypeError(f"{where} is a {type(x).__name__}, a base weight: checkpoints hold "
                            "adapters and train state, never the base model")
        if str(getattr(x, "dtype", "")) in ("int4", "uint4"):
            raise TypeError(f"{where}: Orbax cannot write {x.dtype} arrays; store them as "
                            "int8/uint8 (e.g. QuantizedArray.with_storage('packed'))")


def _array_meta(x) -> dict:
    dtype = jax.random.key_data(x).dtype if _is_key(x) else x.dtype
    return {"shape": list(x.shape), "dtype": np.dtype(dtype).name}


def _as_dict(arrays: list) -> dict:
    return {f"{i:06d}": x for i, x in enumerate(arrays)}


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and np.size(obj) == 1:
        return np.asarray(obj).item()
    raise TypeError(f"meta must be JSON-like (dicts, lists, numbers, strings, dataclasses); "
                    f"got a {type(obj).__name__}")


# ----------------------------------------------------------------------------------------
# Adapter metadata


def _adapter_meta(lora: PyTree, meta: Any) -> tuple[dict, list]:
    leaves = L.leaves(lora)
    if not leaves:
        raise ValueError("the LoRA tree holds no adapter leaf: nothing to save")
    arrays: list = []
    entries = []
    for path, leaf in leaves.items():
        enc = _encode(leaf, arrays)
        fields = {n: {**_array_meta(arrays[c["i"]]), "i": c["i"]}
                  for n, c in zip(enc["f"], enc["c"]) if c["t"] == "array"}
        entries.append({"path": path, "kind": leaf.kind, "class": enc["cls"], "r": int(leaf.r),
                        "alpha": float(getattr(leaf, "alpha", leaf.scale * leaf.r)),
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


def _check_format(info: dict, where: str) -> None:
    if info.get("format") != FORMAT:
        raise ValueError(f"{where} is not a lora_jax adapter (format {info.get('format')!r})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{where} has adapter format version {info['format_version']}; this "
                         f"lora_jax reads versions up to {FORMAT_VERSION}: upgrade lora_jax")


def _abstract_lora(info: dict, shardings) -> dict[str, L.LowRankLeaf]:
    """``{path: leaf}`` whose arrays are ShapeDtypeStructs (``shardings(path, field, shape)``)."""
    out = {}
    for e in info["leaves"]:
        cls = _resolve(e["class"])
        if not (isinstance(cls, type) and issubclass(cls, L.LowRankLeaf)):
            raise ValueError(f"{e['path']!r}: {e['class']} is not an adapter leaf kind")
        arrays = {n: jax.ShapeDtypeStruct(tuple(a["shape"]), np.dtype(a["dtype"]),
                                          sharding=shardings(e["path"], n, tuple(a["shape"])))
                  for n, a in e["arrays"].items()}
        dyn = [f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)]
        static = {k: _static_value(v) for k, v in e["static"].items()}
        out[e["path"]] = cls(**{n: arrays.get(n) for n in dyn}, **static)
    return out


def _check_fit(abstract: dict, like: PyTree | None, base: PyTree | None, where: str) -> None:
    """Clear errors, before anything is read, when the checkpoint does not fit the model."""
    if like is not None:
        want = L.leaves(like)
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


# ----------------------------------------------------------------------------------------
# Adapter-only checkpoints


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path`` (a checkpoint directory)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


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
        first, then swapped in, so a crash never leaves neither.

    Returns:
      The adapter's size on disk in bytes.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      TypeError/ValueError: ``lora`` holds something other than adapter leaves.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    info, arrays = _adapter_meta(lora, meta)
    target = path + f".incoming-{uuid.uuid4().hex[:8]}" if os.path.exists(path) else path
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(target, ocp.args.Composite(adapter=ocp.args.JsonSave(info),
                                           arrays=ocp.args.StandardSave(_as_dict(arrays))))
    if target != path and jax.process_index() == 0:
        old = path + f".old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(target, path)
        shutil.rmtree(old, ignore_errors=True)
    return disk_size(path)


def adapter_info(path: str | os.PathLike) -> dict:
    """The metadata of a saved adapter or :class:`Manager` step (format, targets, ranks,
    alphas, user meta) plus its ``"nbytes"`` on disk."""
    path = _adapter_dir(path)
    info, _ = _read_info(path)
    return {**info, "nbytes": disk_size(path)}


def _read_info(path: str) -> tuple[dict, str]:
    """(adapter metadata, name of the array item) of an adapter or a Manager step."""
    train = os.path.isdir(os.path.join(path, "state"))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        if train:
            info = ck.restore(path, ocp.args.Composite(state=ocp.args.JsonRestore())).state
            info = info.get("adapter", {}) if isinstance(info, dict) else {}
        else:
            info = ck.restore(path, ocp.args.Composite(adapter=ocp.args.JsonRestore())).adapter
    _check_format(info, path)
    return info, "lora" if train else "arrays"


def _adapter_dir(path) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return path
    # A crash between the two renames of an overwrite leaves the complete new copy.
    parent, name = os.path.split(path)
    done = re.compile(re.escape(name) + r"\.incoming-[0-9a-f]{8}")
    incoming = sorted(p for p in os.listdir(parent or ".") if done.fullmatch(p))
    if incoming:
        return os.path.join(parent, incoming[-1])
    raise FileNotFoundError(f"no adapter checkpoint at {path}")


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
      ValueError: not an adapter, a newer format, or (before any array is read) a mismatch
        with ``like`` or ``base`` that names the parameter.
    """
    path = _adapter_dir(path)
    info, item = _read_info(path)
    abstract = _abstract_lora(info, lambda *_: None)
    _check_fit(abstract, like, base, f"adapter {path}")
    shard, _ = _lora_shardings(abstract, mesh, specs)
    abstract = _abstract_lora(info, shard)
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
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        got = getattr(ck.restore(path, ocp.args.Composite(
            **{item: ocp.args.StandardRestore(flat)})), item)
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

    Args:
      directory: where step directories go.
      max_to_keep: how many recent checkpoints to keep (``None``: all).
      async_save: write in a background thread; :meth:`save` returns once the arrays are
        copied off the devices. :meth:`wait` (or :meth:`close`) waits for the writes.
      save_interval_steps: :meth:`save` skips steps that are not a multiple of this.
      keep_period: also keep every checkpoint whose step is a multiple of this.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, save_interval_steps: int = 1,
                 keep_period: int | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
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
        return self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.JsonRestore())).state

    def _step(self, step):
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
          step: the step number.
          lora: the adapter tree (the base model is never saved).
          opt_state: optax state (any pytree of arrays; optax's NamedTuples are rebuilt on
            restore).
          adalora: :class:`lora_jax.adalora.AllocatorState`.
          rng: a PRNG key (typed or raw) or a pytree of them.
          meta: JSON-like user data (e.g. a dataclass config).
          force: save even if ``save_interval_steps`` would skip this step.

        Returns:
          Whether a checkpoint was started.

        Raises:
          TypeError: (before anything is written) a base weight such as a ``QuantizedArray``,
            or an int4/uint4 array, in ``opt_state``, ``adalora`` or ``rng``, naming its path.
        """
        self._empty_trash()  # steps dropped by earlier saves
        info, lora_arrays = _adapter_meta(lora, meta)
        state = {"format": _TRAIN_FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                 "adapter": info, "items": {}}
        args = {"lora": ocp.args.StandardSave(_as_dict(lora_arrays))}
        for name, tree in (("opt_state", opt_state), ("adalora", adalora), ("rng", rng)):
            _check_storable(name, tree)
            arrays: list = []
            enc = _encode(tree, arrays)
            state["items"][name] = {"tree": enc, "arrays": [_array_meta(x) for x in arrays]}
            if arrays:
                args[name] = ocp.args.StandardSave(_as_dict(arrays))
        args["state"] = ocp.args.JsonSave(state)
        return bool(self._mngr.save(int(step), args=ocp.args.Composite(**args), force=force))

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
          ValueError: (before any array is read) the checkpoint does not fit ``like``,
            ``base`` or ``opt_state``, naming the first mismatch.
        """
        self.wait()  # a restore sees every save that was started before it
        step = self._step(step)
        state = self.metadata(step)
        if state.get("format") != _TRAIN_FORMAT:
            raise ValueError(f"step {step} in {self.directory} is not a lora_jax train state")
        where = f"checkpoint step {step} in {self.directory}"
        info = state["adapter"]
        _check_format(info, where)
        abstract = _abstract_lora(info, lambda *_: None)
        _check_fit(abstract, like, base, where)
        shard, lspecs = _lora_shardings(abstract, mesh, specs)
        abstract = _abstract_lora(info, shard)

        args, items = {}, {}
        flat_lora, where_lora = _flat_fields(abstract)
        args["lora"] = ocp.args.StandardRestore(flat_lora)
        for name, item in state["items"].items():
            shapes = [jax.ShapeDtypeStruct(tuple(a["shape"]), np.dtype(a["dtype"]))
                      for a in item["arrays"]]
            if name == "opt_state" and opt_state is not None:
                tree = _match_template(opt_state, shapes, where)
            else:
                tree = _decode(item["tree"], shapes)
            items[name] = tree
            if not shapes:
                continue
            # Shardings follow the tree's paths; arrays are stored in encoding order.
            pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(_tree_shardings(tree, mesh, lspecs)))
            by_id = {id(x): sh for x, sh in pairs}
            args[name] = ocp.args.StandardRestore(_as_dict(
                [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_id[id(x)]) for x in shapes]))
        got = self._mngr.restore(step, args=ocp.args.Composite(**args))

        leaves = {p: {} for p in abstract}
        for (p, name), key in zip(where_lora, flat_lora):
            leaves[p][name] = got.lora[key]
        lora = _rebuild_like({p: leaf.replace(**leaves[p]) for p, leaf in abstract.items()}, like)
        out = {}
        for name, tree in items.items():
            n = len(state["items"][name]["arrays"])
            if n == 0:
                out[name] = tree
                continue
            arrays = [getattr(got, name)[f"{i:06d}"] for i in range(n)]
            if name == "opt_state" and opt_state is not None:
                out[name] = jax.tree.structure(tree).unflatten(arrays)
            else:  # typed keys and Python scalars come back as such
                out[name] = _decode(state["items"][name]["tree"], arrays)
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
        if tuple(x.shape) != tuple(a.shape):
            raise ValueError(f"{where}: optimizer state {P.path_str(kp)!r} has shape "
                             f"{tuple(a.shape)} in the checkpoint, {tuple(x.shape)} in the "
                             "template")
    return tdef.unflatten(shapes)
