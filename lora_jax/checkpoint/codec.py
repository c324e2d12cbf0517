"""Pytrees as JSON plus a flat list of arrays, rebuilding only registered types.

Checkpoints store array data with Orbax and everything else (the nesting of dicts and lists,
the classes of optimizer states, the static fields of adapter leaves) as JSON written by
:func:`encode`. :func:`decode` reads it back and builds only the types in an explicit
registry: the library's adapter leaves, :class:`lora_jax.QuantizedArray`, the AdaLoRA
allocator state, optax's state classes, and classes a program adds with :func:`register`.
A file that names anything else (``os:system``, ``builtins:eval``...) is refused with a
:class:`CheckpointError` naming the file and the node: reading never imports, looks up or
calls what a file names.

>>> import jax.numpy as jnp, optax
>>> arrays = []
>>> tree = encode({"opt": optax.adam(1e-3).init({"w": jnp.ones(2)})}, arrays, type_names())
>>> tree["c"][0]["c"][0]["cls"].endswith(":ScaleByAdamState"), len(arrays)
(True, 3)
>>> decode({"t": "struct", "cls": "os:system", "f": [], "static": {"command": "ls"}}, [],
...        Reader("example"))
Traceback (most recent call last):
...
lora_jax.checkpoint.codec.CheckpointError: example: metadata node '<root>': names the type ...
"""

from __future__ import annotations

import builtins
import dataclasses
import sys
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import adalora as _ada
from lora_jax import dora as _dora
from lora_jax import lora as L
from lora_jax import quant as _quant
from lora_jax.multi.leaf import StackedLora
from lora_jax.paths import path_str

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is: not one of ours, damaged, from a newer
    version, or naming a type this program has not registered."""


# ----------------------------------------------------------------------------------------
# The registry of types a checkpoint may name

_REGISTRY: dict[str, type] = {}
# optax NamedTuples that hold functions, never state
_NOT_STATE = ("GradientTransformation", "GradientTransformationExtraArgs")


def _cls_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_namedtuple_type(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _is_struct_type(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def register(cls: type, *, name: str | None = None) -> type:
    """Lets checkpoints store and rebuild ``cls``, a NamedTuple or a (flax.struct) dataclass.

    Restoring builds only registered types; a checkpoint that names any other type is
    refused. Already registered: :class:`lora_jax.LoraWeight`,
    :class:`lora_jax.adalora.AdaLoraWeight`, :class:`lora_jax.QuantizedArray`,
    :class:`lora_jax.adalora.AllocatorState` and optax's state types. Register your own
    optimizer-state or adapter-leaf classes in the program that saves and in the one that
    restores (a restore calls the class's constructor with the stored fields). Usable as a
    decorator.

    Args:
      cls: the class.
      name: the name stored in checkpoints (default ``"module:QualName"``); give the old
        name when a class has moved, so that existing checkpoints still load.

    Returns:
      ``cls``.

    Raises:
      TypeError: ``cls`` is not a NamedTuple or dataclass type. ValueError: ``name`` already
        stands for another class.

    >>> import typing
    >>> @register
    ... class MyState(typing.NamedTuple):
    ...     count: jax.Array
    >>> _cls_name(MyState) in known_types()
    True
    """
    if not (_is_namedtuple_type(cls) or _is_struct_type(cls)):
        raise TypeError(f"register: expected a NamedTuple or dataclass type, got {cls!r}")
    key = name or _cls_name(cls)
    prev = _REGISTRY.get(key)
    # A reloaded module (notebooks) re-creates the class under the same name: replace it.
    if prev is not None and prev is not cls and _cls_name(prev) != _cls_name(cls):
        raise ValueError(f"register: the name {key!r} already stands for {prev!r}")
    _REGISTRY[key] = cls
    return cls


# The library's own types, under the names checkpoints have always stored for them: fixed, so
# that files stay readable when a class moves to another module.
for _name, _cls in (("lora_jax.lora:LoraWeight", L.LoraWeight),
                    ("lora_jax.adalora:AdaLoraWeight", _ada.AdaLoraWeight),
                    ("lora_jax.quant:QuantizedArray", _quant.QuantizedArray),
                    ("lora_jax.adalora:AllocatorState", _ada.AllocatorState),
                    ("lora_jax.multi:StackedLora", StackedLora),
                    ("lora_jax.dora:DoraWeight", _dora.DoraWeight)):
    register(_cls, name=_name)


def _optax_types() -> dict[str, type]:
    """optax's state classes (NamedTuples and dataclasses defined in its loaded modules).

    Found by walking the optax modules this program has imported, never by importing
    anything a checkpoint names.
    """
    out = {}
    for modname, mod in list(sys.modules.items()):
        if mod is None or not (modname == "optax" or modname.startswith("optax.")):
            continue
        for obj in list(vars(mod).values()):
            if (isinstance(obj, type) and obj.__module__.split(".")[0] == "optax"
                    and obj.__name__ not in _NOT_STATE
                    and (_is_namedtuple_type(obj) or _is_struct_type(obj))):
                out[_cls_name(obj)] = obj
    return out


def known_types() -> dict[str, type]:
    return {**_optax_types(), **_REGISTRY}


class Reader:
    """Decoding context: the file being read and the types it may name."""

    def __init__(self, where: str):
        self.where = where
        self.types = known_types()

    def error(self, node: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: metadata node {node or '<root>'!r}: {msg}")

    def type(self, name: Any, node: str) -> builtins.type:  # in this class `type` is this method
        cls = self.types.get(name) if isinstance(name, str) else None
        if cls is None and isinstance(name, str) and name.startswith("optax"):
            # optax moves classes between private modules: match on the class name alone.
            qual = name.partition(":")[2]
            same = [c for n, c in self.types.items()
                    if n.startswith("optax") and n.partition(":")[2] == qual]
            cls = same[0] if len(same) == 1 else None
        if cls is None:
            raise self.error(node, f"names the type {name!r}, which is not a registered "
                             "checkpoint type, so nothing is built from it. If it is a class of "
                             "your own and the file is trusted, call "
                             "lora_jax.checkpoint.register(cls) before restoring")
        return cls


def type_names() -> dict[type, str]:
    """The name stored for each registered type: ``module:qualname`` if registered under it,
    else the name it was registered under."""
    out: dict[type, str] = {}
    for name, cls in known_types().items():
        if cls not in out or name == _cls_name(cls):
            out[cls] = name
    return out


# ----------------------------------------------------------------------------------------
# Pytrees as JSON structure plus a flat list of arrays


def is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def array_fields(obj: Any) -> dict[str, Any]:
    """A dataclass's pytree fields (an adapter leaf's arrays) by name, in declaration order:
    the order in which :func:`encode` stores them."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.init and f.metadata.get("pytree_node", True)}


def _static_json(v, where: str):
    if isinstance(v, (tuple, list)):
        return {"tuple": [_static_json(x, where) for x in v]}
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{where}: cannot store static field value {v!r} in a checkpoint")


def _static_value(v, rd: Reader, node: str):
    """A static field value read back: JSON scalars, and tuples of them."""
    if isinstance(v, dict) and set(v) == {"tuple"} and isinstance(v["tuple"], list):
        return tuple(_static_value(x, rd, node) for x in v["tuple"])
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise rd.error(node, f"a static field holds {v!r}; expected numbers, strings or tuples")


def encode(tree: PyTree, arrays: list, names: dict[type, str], path: str = "") -> dict:
    """JSON description of ``tree``; its arrays are appended to ``arrays``."""
    if tree is None:
        return {"t": "none"}
    if is_key(tree):
        arrays.append(jax.random.key_data(tree))
        return {"t": "key", "impl": str(jax.random.key_impl(tree)), "i": len(arrays) - 1}
    if isinstance(tree, (bool, int, float)) and not isinstance(tree, np.generic):
        arrays.append(np.asarray(tree))
        return {"t": "py", "type": type(tree).__name__, "i": len(arrays) - 1}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        arrays.append(tree)
        return {"t": "array", "i": len(arrays) - 1}
    sub = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {"t": "namedtuple", "cls": _stored_name(type(tree), names, path),
                "c": [encode(x, arrays, names, sub(f)) for f, x in zip(tree._fields, tree)]}
    if isinstance(tree, (list, tuple)):
        return {"t": type(tree).__name__,
                "c": [encode(x, arrays, names, sub(i)) for i, x in enumerate(tree)]}
    if type(tree) is dict and all(isinstance(k, (str, int)) for k in tree):
        keys = sorted(tree, key=lambda k: (isinstance(k, int), str(k)))
        return {"t": "dict", "k": keys, "c": [encode(tree[k], arrays, names, sub(k))
                                              for k in keys]}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = [f for f in dataclasses.fields(tree) if f.init]
        dyn = [f.name for f in fields if f.metadata.get("pytree_node", True)]
        static = {f.name: _static_json(getattr(tree, f.name), sub(f.name)) for f in fields
                  if not f.metadata.get("pytree_node", True)}
        return {"t": "struct", "cls": _stored_name(type(tree), names, path), "f": dyn,
                "static": static,
                "c": [encode(getattr(tree, n), arrays, names, sub(n)) for n in dyn]}
    # Any other pytree node (FrozenDict, nnx.State, ...): keep the arrays and their paths.
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    start = len(arrays)
    arrays.extend(x for _, x in pairs)
    return {"t": "opaque", "cls": _cls_name(type(tree)), "paths": [path_str(p) for p, _ in pairs],
            "i": list(range(start, start + len(pairs)))}


def _stored_name(cls: type, names: dict[type, str], path: str) -> str:
    if cls not in names:
        raise TypeError(f"{path or 'the tree'} is a {_cls_name(cls)}, a type checkpoints do not "
                        f"know: call lora_jax.checkpoint.register({cls.__qualname__}) in the "
                        "program that saves and in the one that restores (nothing was written)")
    return names[cls]


def _index(node: dict, key: str, n: int, rd: Reader, path: str) -> int:
    i = node.get(key)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise rd.error(path, f"array index {i!r} is not one of the {n} stored arrays")
    return i


def _children(node: dict, rd: Reader, path: str) -> list:
    c = node.get("c", [])
    if not isinstance(c, list):
        raise rd.error(path, f"children must be a list, got {type(c).__name__}")
    return c


def decode(node: Any, arrays: list, rd: Reader, path: str = "") -> PyTree:
    """The tree described by ``node`` over ``arrays``, building only registered types."""
    if not isinstance(node, dict):
        raise rd.error(path, f"expected a JSON object, got {type(node).__name__}")
    t = node.get("t")
    sub = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
    if t == "none":
        return None
    if t == "array":
        return arrays[_index(node, "i", len(arrays), rd, path)]
    if t == "key":
        x = arrays[_index(node, "i", len(arrays), rd, path)]
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        impl = node.get("impl")
        try:  # jax looks the name up in its own table of PRNG implementations
            return jax.random.wrap_key_data(x, impl=impl if isinstance(impl, str) else None)
        except (ValueError, TypeError) as e:
            raise rd.error(path, f"PRNG key implementation {impl!r}: {e}") from None
    if t == "py":
        x = arrays[_index(node, "i", len(arrays), rd, path)]
        kinds: dict[Any, type] = {"int": int, "float": float, "bool": bool}
        kind = kinds.get(node.get("type"))
        if kind is None:
            raise rd.error(path, f"Python scalar type {node.get('type')!r}; expected int, float "
                           "or bool")
        return x if isinstance(x, jax.ShapeDtypeStruct) else kind(x)
    if t in ("list", "tuple"):
        children = [decode(c, arrays, rd, sub(i))
                    for i, c in enumerate(_children(node, rd, path))]
        return children if t == "list" else tuple(children)
    if t == "dict":
        keys, cs = node.get("k"), _children(node, rd, path)
        if (not isinstance(keys, list) or len(keys) != len(cs)
                or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys)):
            raise rd.error(path, "a dict node needs one str/int key per child")
        return {k: decode(c, arrays, rd, sub(k)) for k, c in zip(keys, cs)}
    if t == "namedtuple":
        cls = rd.type(node.get("cls"), path)
        cs = _children(node, rd, path)
        if not _is_namedtuple_type(cls) or len(cs) != len(cls._fields):
            raise rd.error(path, f"{cls.__qualname__} takes {len(getattr(cls, '_fields', ()))} "
                           f"fields as a NamedTuple; the node has {len(cs)} children")
        return cls(*[decode(c, arrays, rd, sub(f)) for f, c in zip(cls._fields, cs)])
    if t == "struct":
        cls = rd.type(node.get("cls"), path)
        names, cs = node.get("f"), _children(node, rd, path)
        if not isinstance(names, list) or len(names) != len(cs):
            raise rd.error(path, "a struct node needs one field name per child")
        dyn = {n: decode(c, arrays, rd, sub(n)) for n, c in zip(names, cs)}
        return build(cls, dyn, node.get("static", {}), rd, path)
    if t == "opaque":  # rebuilt as {path: array}; pass a template to get the original type
        paths, idx = node.get("paths"), node.get("i")
        if not isinstance(paths, list) or not isinstance(idx, list) or len(paths) != len(idx):
            raise rd.error(path, "an opaque node needs one index per path")
        return {str(p): arrays[_index({"i": i}, "i", len(arrays), rd, path)]
                for p, i in zip(paths, idx)}
    raise rd.error(path, f"unknown node type {t!r}")


def build(cls: type, dyn: dict, static: Any, rd: Reader, path: str):
    """``cls(**dyn, **static)`` for a registered dataclass, after checking the fields.

    Generic over the class's fields: a static field added to a class later (with a default)
    needs no change here, and checkpoints written before it load with the default.
    """
    if not _is_struct_type(cls):
        raise rd.error(path, f"{cls.__qualname__} is not a dataclass")
    if not isinstance(static, dict):
        raise rd.error(path, "static fields must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in dyn:
        f = fields.get(name)
        if f is None or not f.metadata.get("pytree_node", True):
            raise rd.error(path, f"{cls.__qualname__} has no array field {name!r}")
    for name in static:
        f = fields.get(name)
        if f is None or f.metadata.get("pytree_node", True):
            raise rd.error(path, f"{cls.__qualname__} has no static field {name!r} (a newer "
                           "lora_jax, or another class?)")
    missing = [n for n, f in fields.items() if n not in dyn and n not in static
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise rd.error(path, f"{cls.__qualname__} needs the fields {missing}, which the node "
                       "lacks")
    kwargs = {**dyn, **{k: _static_value(v, rd, f"{path}/{k}") for k, v in static.items()}}
    _check_static_types(cls, {k: kwargs[k] for k in static}, rd, path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise rd.error(path, f"{cls.__qualname__}(...) refused the stored fields: {e}") from None


# A static field declared bool, int, float or str must hold that type in a file: a stored
# alpha of true would otherwise be 1.0, an rslora of 1 a flag, a roles of 5 an odd TypeError.
_STATIC_KINDS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _check_static_types(cls: type, static: dict, rd: Reader, path: str) -> None:
    """Refuses a stored static field whose JSON type is not the field's declared type."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a registered class with unresolvable annotations
        return
    for name, value in static.items():
        kind = _STATIC_KINDS.get(hints.get(name))
        if kind is not None and not kind[1](value):
            raise rd.error(path, f"{cls.__qualname__}.{name} must be {kind[0]}, got "
                           f"{value!r:.80}")


def shape_dtype(a: Any, rd: Reader, node: str, sharding=None) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct from ``{"shape": [...], "dtype": "float32"}`` (numbers only)."""
    shape, dtype = (a.get("shape"), a.get("dtype")) if isinstance(a, dict) else (None, None)
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise rd.error(node, f"array shape {shape!r} is not a list of sizes")
    try:
        dt = jnp.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or not (jnp.issubdtype(dt, jnp.number) or dt == jnp.bool_):
        raise rd.error(node, f"array dtype {dtype!r} is not a numeric dtype")
    return jax.ShapeDtypeStruct(tuple(shape), dt, sharding=sharding)
