"""Restoring onto a mesh: abstract trees from the metadata, and the sharding of every array.

A restore reads the JSON metadata first and builds the tree it describes with
``jax.ShapeDtypeStruct`` arrays (:func:`abstract_lora`, :func:`match_template`), each carrying
the ``Sharding`` it is to be read with (:func:`lora_shardings`, :func:`tree_shardings`); only
then does Orbax read the arrays, straight into place on the target mesh, which need not be
the mesh the checkpoint was saved from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lora_jax import lora as L
from lora_jax import sharding as S
from lora_jax import validation as V
from lora_jax.checkpoint import codec
from lora_jax.checkpoint.codec import CheckpointError
from lora_jax.paths import path_str
from lora_jax.sharding.placement import check_divides

PyTree = Any
Shardings = Callable[[str, str, tuple], Any]  # (path, field, shape) -> Sharding or None


def abstract_lora(info: dict, shardings: Shardings, where: str) -> dict[str, L.LowRankLeaf]:
    """``{path: leaf}`` whose arrays are ShapeDtypeStructs (``shardings(path, field, shape)``).

    Every leaf is checked (registered adapter class, numeric arrays, factors that chain,
    finite alpha) before any array is read.
    """
    rd = codec.Reader(where)
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
            sds = codec.shape_dtype(a, rd, f"{node}/arrays/{name}")
            arrays[name] = jax.ShapeDtypeStruct(sds.shape, sds.dtype,
                                                sharding=shardings(path, name, sds.shape))
        leaf = codec.build(cls, arrays, e.get("static", {}), rd, f"{node} ({path})")
        try:
            V.adapter_leaf(path, leaf, where)
        except (TypeError, ValueError) as err:
            raise CheckpointError(str(err)) from None
        _check_summary(e, leaf, rd, f"{node} ({path})")
        if path in out:
            raise rd.error(node, f"{path!r} appears twice")
        out[path] = leaf
    return out


def _check_summary(entry: dict, leaf: L.LowRankLeaf, rd: codec.Reader, node: str) -> None:
    """The rank, scale and kernel shape the file records next to a leaf (when it does) agree
    with the leaf rebuilt from its fields: a damaged or edited static field shows here."""
    scale = float(leaf.scale)
    stored = entry.get("scale", scale)
    if not (isinstance(stored, (int, float)) and not isinstance(stored, bool)
            and abs(stored - scale) <= 1e-6 * abs(scale)):
        raise rd.error(node, f"the file records scale {stored!r:.60} but the leaf's fields give "
                       f"{scale!r}: damaged or edited metadata")
    for key, value in (("r", leaf.r), ("kernel_shape", list(leaf.kernel_shape))):
        if key in entry and entry[key] != value:
            raise rd.error(node, f"the file records {key} {entry[key]!r:.60} but the leaf's "
                           f"fields give {value!r}: damaged or edited metadata")


def unsharded(path: str, name: str, shape: tuple) -> None:
    """The :data:`Shardings` of a tree read only for its shapes (no placement)."""
    return None


def lora_shardings(abstract_leaves: dict, mesh: Mesh | None,
                   specs: PyTree | None) -> tuple[Shardings, PyTree | None]:
    """``((path, field, shape) -> Sharding, adapter specs)`` for restoring adapters.

    Without a mesh, everything goes to the first local device; ``specs`` may be adapter specs
    (from :func:`lora_jax.sharding.specs`) or base specs to derive them from; default
    replicated on ``mesh``.
    """
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
    table = {p: codec.array_fields(x) for p, x in L.leaves(lspecs).items()}

    def f(path, name, shape):
        try:
            spec = table[path][name]
        except KeyError:
            raise ValueError(f"specs have no entry for {path}/{name}") from None
        check_divides(mesh, spec, shape, f"specs for {path}/{name}")
        return NamedSharding(mesh, spec)

    return f, lspecs


def tree_shardings(abstract: PyTree, mesh: Mesh | None, lspecs: PyTree | None) -> PyTree:
    """Shardings for a tree of optimizer or AdaLoRA state: like the adapter arrays it holds
    copies of (:func:`lora_jax.sharding.state_specs`), else replicated."""
    if mesh is None:
        dev = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: dev, abstract)
    return S.named(mesh, S.state_specs(abstract, lspecs) if lspecs is not None
                   else jax.tree.map(lambda _: PartitionSpec(), abstract))


def flat_fields(abstract: dict) -> tuple[dict, list]:
    """Adapter arrays as ``{"000000": x, ...}`` (the order they are stored in) plus the
    ``(path, field)`` of each entry."""
    flat, where = {}, []
    for p, leaf in abstract.items():
        for name, x in codec.array_fields(leaf).items():
            if x is not None:
                flat[f"{len(flat):06d}"] = x
                where.append((p, name))
    return flat, where


def rebuild_like(leaves: dict, like: PyTree | None) -> PyTree:
    """The adapter tree of ``{path: leaf}``: nested dicts, or ``like``'s structure."""
    if like is None:
        return L.from_leaves(leaves)
    _, tdef = jax.tree_util.tree_flatten(like, is_leaf=L.is_lowrank)
    return tdef.unflatten([leaves[p] for p in L.leaves(like)])


def match_template(template: PyTree, shapes: list, where: str) -> PyTree:
    """The template's structure over the checkpoint's arrays, after checking they agree."""
    pairs, tdef = jax.tree_util.tree_flatten_with_path(template)
    if len(pairs) != len(shapes):
        raise ValueError(f"{where}: the optimizer state has {len(shapes)} arrays, the "
                         f"template {len(pairs)}; was it saved with another optimizer?")
    for (kp, x), a in zip(pairs, shapes):
        if tuple(getattr(x, "shape", ())) != tuple(a.shape):
            raise ValueError(f"{where}: optimizer state {path_str(kp)!r} has shape "
                             f"{tuple(a.shape)} in the checkpoint, "
                             f"{tuple(getattr(x, 'shape', ()))} in the template")
    return tdef.unflatten(shapes)
