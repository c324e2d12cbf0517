"""Sharding LoRA, AdaLoRA and QLoRA trees on a device mesh.

Adapters take their sharding from the base weight they adapt: ``A (*stack, *in, r)`` shards
like the kernel's input axes, ``B (*stack, r, *out)`` like its output axes, the rank axis is
replicated. Under FSDP the merged weight ``W0 + s·A·B`` is then formed shard by shard, where
``W0`` lives, and gathered for each matmul that needs it (the forward, and ``dx`` in the
backward pass), exactly as ``W0`` alone would be; ``ΔW`` is never communicated on its own, and
no weight-sized gradient is (the backward pass never forms ``dW``).

Specs are ordinary :class:`jax.sharding.PartitionSpec` trees. *Base specs* give one spec per
base parameter, for its logical (dense) shape, also where the parameter is a
:class:`lora_jax.QuantizedArray`; :func:`storage_specs` turns them into specs for the arrays
actually stored. :func:`fsdp` and :func:`tensor_parallel` derive base specs for users who
have none.

>>> import jax, jax.numpy as jnp, lora_jax
>>> from jax.sharding import PartitionSpec as P
>>> params = {"up": {"kernel": jnp.ones((8, 16))}, "down": {"kernel": jnp.ones((16, 8))}}
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(0))
>>> s = specs(lora, {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}})
>>> s["up"]["kernel"].a, s["up"]["kernel"].b
(P(), P(None, 'model'))
>>> s["down"]["kernel"].a, s["down"]["kernel"].b
(P('model',), P())
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import protocols
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any
POLICIES = ("inherit", "replicate")

# Megatron-style tensor parallelism: column-parallel layers split their output features,
# row-parallel layers their input features, so each MLP/attention block needs one all-reduce.
COLUMN_PARALLEL = (r"(.*/)?(q|k|v|query|key|value|qkv|q_proj|k_proj|v_proj|qkv_proj|in_proj|"
                   r"c_attn|up|gate|up_proj|gate_proj|wi|wi_0|wi_1|w1|w3|fc1|c_fc)/kernel")
ROW_PARALLEL = (r"(.*/)?(o|out|o_proj|out_proj|wo|proj|c_proj|down|down_proj|w2|fc2)/kernel")


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _spec(entries) -> PartitionSpec:
    """A PartitionSpec without trailing ``None`` s (the canonical form)."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


# ----------------------------------------------------------------------------------------
# Meshes and shardings


def mesh(shape: Sequence[int], names: Sequence[str], *, devices=None) -> Mesh:
    """``jax.make_mesh`` with ``Auto`` axes: the ``jit(in_shardings=..., out_shardings=...)``
    style, where XLA propagates shardings through unchanged model code.

    (``jax.make_mesh`` defaults to ``Explicit`` axes, under which every op with an ambiguous
    output sharding, such as Flax's embedding lookup on a batch-sharded input, must be
    annotated in the model code.)

    >>> m = mesh((1,), ("data",))
    >>> m.axis_names, m.axis_types
    (('data',), (Auto,))
    """
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    """The tree of ``NamedSharding(mesh, spec)`` for a tree of ``PartitionSpec``.

    >>> m = mesh((1,), ("data",))
    >>> named(m, {"w": PartitionSpec("data")})["w"].spec
    P('data',)
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def device_put(tree: PyTree, mesh: Mesh, specs: PyTree | Mapping[str, Any]) -> PyTree:
    """``jax.device_put(tree, named(mesh, specs))``, after checking every spec against its array.

    JAX's own error for a mesh axis that does not divide a dimension names no parameter; this
    one names the path, the dimension and the mesh axes, before anything moves.

    Args:
      tree: a tree of arrays (base params, a LoRA tree, optimizer state...).
      mesh: the mesh.
      specs: ``PartitionSpec`` s shaped like ``tree`` (from :func:`specs`,
        :func:`state_specs`, :func:`storage_specs`), or a flat ``{path: spec}`` dict (from
        :func:`fsdp`, :func:`tensor_parallel`) for trees of dense arrays. Arrays without a
        spec are replicated; a spec for a path the tree lacks is an error.

    Returns:
      The tree, placed.

    Raises:
      ValueError: a spec for a missing path, longer than its array's rank, naming an absent
        mesh axis, or sharding a dim that its mesh axes do not divide.

    >>> import jax.numpy as jnp
    >>> m = mesh((1,), ("data",))
    >>> device_put({"w": jnp.ones((4, 2))}, m, {"w": PartitionSpec("data")})["w"].sharding.spec
    P('data',)
    """
    def is_spec(x):
        return x is None or _is_spec(x) or isinstance(x, NamedSharding)

    pairs, tdef = jax.tree_util.tree_flatten_with_path(tree)
    table = {}
    for kp, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        if s is not None and not is_spec(s):
            raise TypeError(f"device_put: specs[{P.path_str(kp)!r}] is a {type(s).__name__}, "
                            "expected a PartitionSpec")
        table[P.path_str(kp)] = s.spec if isinstance(s, NamedSharding) else s
    paths = [P.path_str(kp) for kp, _ in pairs]
    extra = sorted(set(table) - set(paths))
    if extra:
        raise ValueError(f"device_put: specs name {extra[:4]}, which the tree lacks (its arrays "
                         f"are e.g. {paths[:4]}); for quantized weights pass "
                         "storage_specs(base, base_specs, mesh)")
    out = []
    for path, (_, x) in zip(paths, pairs):
        spec = table.get(path) or PartitionSpec()
        _check_divides(mesh, spec, tuple(x.shape), f"device_put: {path!r}")
        out.append(NamedSharding(mesh, spec))
    return jax.device_put(tree, tdef.unflatten(out))


# ----------------------------------------------------------------------------------------
# Adapter specs


def specs(
    lora: PyTree,
    base_specs: PyTree | Mapping[str, PartitionSpec] | None,
    *,
    policy: str = "inherit",
    mesh: Mesh | None = None,
) -> PyTree:
    """PartitionSpecs for a LoRA or AdaLoRA tree, derived from the base's specs.

    Args:
      lora: a LoRA/AdaLoRA tree (arrays or ``jax.ShapeDtypeStruct``).
      base_specs: one ``PartitionSpec`` (or ``NamedSharding``, or ``None`` for replicated) per
        base parameter for its logical shape: a tree shaped like the base params, or a flat
        ``{path: spec}`` dict. Only the adapted parameters are read. Ignored for
        ``policy="replicate"``.
      policy: ``"inherit"``: ``A``/``P`` shard like the kernel's input axes, ``B``/``Q`` like
        its output axes, AdaLoRA's ``E`` and every rank axis replicated, stacked-layer axes like
        the kernel's; ``"replicate"``: every adapter array on every device (adapters are small;
        the merge then needs no communication, but every device holds the whole adapter).
      mesh: if given, checks that the named mesh axes exist and divide the sharded dims.

    Returns:
      A tree with ``lora``'s structure whose adapter leaves hold ``PartitionSpec`` s in place
      of arrays (``leaf.replace(a=spec_a, b=spec_b)``); feed it to :func:`named`.

    Raises:
      ValueError: unknown policy; a target missing from ``base_specs``; a spec longer than the
        kernel's rank; a mesh axis that is absent or does not divide a dim.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    flat = {} if policy == "replicate" else _spec_map(base_specs)

    def leaf_specs(path, leaf):
        if policy == "replicate":
            kernel = (None,) * len(leaf.kernel_shape)
        elif path not in flat:
            raise ValueError(f"base_specs has no entry for the adapted parameter {path!r}; "
                             f"it has e.g. {sorted(flat)[:4]}")
        else:
            kernel = _entries(flat[path], len(leaf.kernel_shape), f"base_specs[{path!r}]")
        out = _leaf_specs(leaf, kernel, path)
        if mesh is not None:
            for name, s in _fields(out).items():
                _check_divides(mesh, s, getattr(leaf, name).shape, f"{path}/{name}")
        return out

    def f(kp, x):
        if x is None:
            return None
        if not L.is_lowrank(x):
            raise TypeError(f"LoRA tree entry {P.path_str(kp)!r} is a {type(x).__name__}, "
                            "expected an adapter leaf")
        return leaf_specs(P.path_str(kp), x)

    return jax.tree_util.tree_map_with_path(f, lora, is_leaf=L.is_lowrank)


def _roles(leaf) -> dict[str, str]:
    """Which kernel axes each array field follows: "in" (*stack, *in, r), "out" (*stack, r,
    *out), "rank" (*stack, r); the leaf kind's ``field_roles``."""
    roles = getattr(leaf, "field_roles", None)
    if not roles:
        raise TypeError(f"no sharding roles known for adapter kind {type(leaf).__name__}; give "
                        "the class a `field_roles = {field: 'in'|'out'|'rank'}` attribute")
    return roles


def _fields(leaf) -> dict[str, Any]:
    return {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)
            if f.metadata.get("pytree_node", True)}


def _leaf_specs(leaf, kernel: tuple, path: str):
    sa, ia = leaf.stack_axes, leaf.in_axes
    stack, k_in, k_out = Lay.split(leaf.layout, kernel)
    by_role = {"in": stack + k_in + (None,), "out": stack + (None,) + k_out,
               "rank": stack + (None,)}
    roles = _roles(leaf)
    out = {}
    for name, arr in _fields(leaf).items():
        if arr is None:
            continue
        role = roles.get(name)
        entries = by_role[role] if role else stack + (None,) * (len(arr.shape) - sa)
        if len(entries) != len(arr.shape):
            raise ValueError(f"{path}/{name}: shape {tuple(arr.shape)} does not fit the kernel "
                             f"{leaf.kernel_shape} (roles {leaf.layout!r}, stack_axes={sa}, "
                             f"in_axes={ia})")
        out[name] = _spec(entries)
    return leaf.replace(**out)


def state_specs(state: PyTree, lora_specs: PyTree) -> PyTree:
    """Specs for a tree that holds copies of the adapter arrays (optimizer or AdaLoRA state).

    Every array whose path ends with an adapter array's path (``.../mu/<lora path>/a``, an
    :class:`lora_jax.adalora.AllocatorState` EMA) takes that array's spec; AdaLoRA masks
    (``mask/<lora path>``, shaped like ``E``) take ``E``'s; everything else (step counts,
    budgets, scalars) is replicated. Works for any optax state, ``AllocatorState``, and trees
    of them.

    Args:
      state: the state tree (arrays or ``jax.ShapeDtypeStruct``).
      lora_specs: from :func:`specs`.

    Returns:
      A ``PartitionSpec`` tree with ``state``'s structure.

    >>> import jax, jax.numpy as jnp, optax, lora_jax
    >>> lora = lora_jax.init({"w": {"kernel": jnp.ones((8, 4))}}, r=2, key=jax.random.key(0))
    >>> s = specs(lora, {"w/kernel": PartitionSpec("data", None)})
    >>> st = state_specs(optax.adam(1e-3).init(lora), s)
    >>> st[0].mu["w"]["kernel"].a, st[0].count
    (P('data',), P())
    """
    table: dict[str, PartitionSpec] = {}
    for path, leaf in L.leaves(lora_specs).items():
        roles = _roles(leaf)
        for name, s in _fields(leaf).items():
            if _is_spec(s):
                table[f"{path}/{name}"] = s
                if roles.get(name) == "rank":
                    table[path] = s

    def f(kp, x):
        shape = getattr(x, "shape", None)
        if shape is None:
            return PartitionSpec()
        parts = P.path_str(kp).split("/")
        for i in range(len(parts)):
            s = table.get("/".join(parts[i:]))
            if s is not None:
                return s if len(s) <= len(shape) else PartitionSpec()
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(f, state)


# ----------------------------------------------------------------------------------------
# Base specs: storage of quantized weights, and helpers for common layouts


def storage_specs(base: PyTree, base_specs: PyTree | Mapping[str, Any], mesh: Mesh) -> PyTree:
    """Specs for the arrays a base tree stores, from specs of its logical (dense) shapes.

    Dense parameters keep their spec. A :class:`lora_jax.QuantizedArray` stores its codes and
    block scales flat in row-major block order; they are sharded over the same mesh axes as
    the kernel's spec, each shard holding whole blocks. Where the kernel's spec shards only its
    leading axis, a shard of the codes is exactly the codes of a shard of the kernel, so
    dequantizing needs no communication; otherwise XLA reshuffles at the dequantization (the
    memory is still divided). Second-level scales (double quantization) are sharded when every
    shard holds whole groups of 256 blocks, else replicated (they are tiny).

    Args:
      base: the base tree (dense arrays and/or ``QuantizedArray`` leaves; abstract is fine).
      base_specs: one spec per parameter, as for :func:`specs`; missing entries replicate.
      mesh: the mesh (for the axis sizes).

    Returns:
      A spec tree with ``base``'s pytree structure, for :func:`named`/``jax.device_put``.

    Raises:
      ValueError: a spec does not fit its parameter, or a shard would split a quantization
        block.
    """
    flat = _spec_map(base_specs)

    def f(kp, x):
        path = P.path_str(kp)
        spec = _spec(_entries(flat.get(path, PartitionSpec()), len(x.shape),
                              f"base_specs[{path!r}]"))
        _check_divides(mesh, spec, x.shape, path)
        if not protocols.is_base_leaf(x):
            return spec
        return x.storage_specs(spec, dict(mesh.shape), path)

    return jax.tree_util.tree_map_with_path(f, base, is_leaf=protocols.is_base_leaf)


def _axes_of(spec) -> tuple[str, ...]:
    out = []
    for e in spec:
        out += [] if e is None else [e] if isinstance(e, str) else list(e)
    return tuple(out)


def fsdp(
    params: PyTree,
    mesh: Mesh,
    *,
    axis: str | tuple[str, ...] = "data",
    min_size: int = 1024,
    specs: PyTree | Mapping[str, Any] | None = None,
) -> dict[str, PartitionSpec]:
    """Base specs for fully sharded data parallelism: each parameter split along its largest
    axis that the mesh ``axis`` divides (a quantized weight along its leading axis if it can).

    Args:
      params: the base tree (dense or quantized leaves; abstract is fine).
      mesh: the mesh.
      axis: mesh axis (or tuple of axes) to shard over, usually the data axis.
      min_size: parameters with fewer elements stay replicated.
      specs: existing base specs (e.g. from :func:`tensor_parallel`) to add FSDP to; axes
        they already shard are left alone.

    Returns:
      ``{path: PartitionSpec}`` for every parameter (accepted wherever base specs are).
      A parameter of at least ``min_size`` elements that cannot be split (no axis divisible,
      or blocks of a quantized weight that would be split) stays replicated with a warning.

    >>> import jax.numpy as jnp
    >>> p = {"w": {"kernel": jnp.ones((64, 256))}, "b": {"bias": jnp.ones(256)}}
    >>> fsdp(p, mesh((1,), ("data",)))
    {'b/bias': P(), 'w/kernel': P(None, 'data')}
    """
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    _check_axes(mesh, axes)
    min_size = V.integer(min_size, "fsdp: min_size", low=0)
    n = math.prod(mesh.shape[a] for a in axes)
    prior = _spec_map(specs) if specs is not None else {}
    out = {}
    for path, x in P.flatten(params):
        shape = tuple(x.shape)
        entries = list(_entries(prior.get(path, PartitionSpec()), len(shape), path))
        used = set(_axes_of(entries))
        if math.prod(shape) >= min_size and not used & set(axes):
            # A quantized weight prefers the axis its blocks were flattened along first: its
            # shards then hold whole runs of blocks, and dequantizing needs no communication.
            first = x.major_axis if protocols.is_base_leaf(x) else None
            for d in sorted(range(len(shape)), key=lambda d: (d != first, -shape[d], d)):
                if entries[d] is not None or shape[d] % n:
                    continue
                trial = entries.copy()
                trial[d] = axes if len(axes) > 1 else axes[0]
                if _splits_blocks(x, trial, mesh):
                    continue
                entries = trial
                break
            else:
                warnings.warn(f"fsdp: {path!r} of shape {shape} has no axis that {n} shards "
                              "divide (or its quantization blocks would be split); replicated",
                              stacklevel=2)
        out[path] = _spec(entries)
    return out


def tensor_parallel(
    params: PyTree,
    mesh: Mesh,
    *,
    axis: str = "model",
    column: P.Pattern = COLUMN_PARALLEL,
    row: P.Pattern = ROW_PARALLEL,
    stack_axes: int = 0,
    in_axes: int | Mapping[str, int] | None = None,
) -> dict[str, PartitionSpec]:
    """Base specs for Megatron-style tensor parallelism over mesh ``axis``.

    Column-parallel kernels (attention q/k/v, MLP up/gate; ``column`` regexes, ``re.fullmatch``
    over paths) split their first output axis, and their biases too; row-parallel kernels
    (attention output, MLP down; ``row``) split their first input axis. Everything else is
    replicated. Input axes follow :func:`lora_jax.paths.default_in_axes` unless ``in_axes``
    says otherwise; ``stack_axes`` leading axes (``nn.scan``) are never split.

    Returns:
      ``{path: PartitionSpec}`` for every parameter. A matched kernel whose axis the mesh
      axis does not divide (or whose quantization blocks would be split) stays replicated,
      with a warning.

    >>> import jax.numpy as jnp
    >>> p = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)},
    ...      "o": {"kernel": jnp.ones((8, 8))}}
    >>> tensor_parallel(p, mesh((1,), ("model",)))
    {'o/kernel': P('model',), 'q/bias': P('model',), 'q/kernel': P(None, 'model')}
    """
    _check_axes(mesh, (axis,))
    in_axes = V.axes_arg(in_axes, "tensor_parallel: in_axes", low=1)
    stack_axes = V.integer(stack_axes, "tensor_parallel: stack_axes", low=0)
    V.patterns(column, "tensor_parallel: column")
    V.patterns(row, "tensor_parallel: row")
    n = mesh.shape[axis]
    cols, rows = P.as_patterns(column), P.as_patterns(row)
    flat = P.flatten(params)
    out: dict[str, PartitionSpec] = {}
    column_modules = set()
    for path, x in flat:
        shape = tuple(x.shape)
        entries = [None] * len(shape)
        kind = "column" if P.matches(path, cols) else "row" if P.matches(path, rows) else None
        if kind and len(shape) - stack_axes >= 2:
            ia = P.setting_for(in_axes, path, None, None) or P.default_in_axes(path, shape,
                                                                               stack_axes)
            d = stack_axes + ia if kind == "column" else stack_axes
            entries[d] = axis
            if shape[d] % n or _splits_blocks(x, entries, mesh):
                warnings.warn(f"tensor_parallel: {path!r} of shape {shape}: axis {d} cannot be "
                              f"split {n} ways; replicated", stacklevel=2)
                entries[d] = None
            elif kind == "column":
                column_modules.add(path.rsplit("/", 1)[0])
        out[path] = _spec(entries)
    for path, x in flat:  # column-parallel biases follow their kernels' output split
        parent, _, name = path.rpartition("/")
        if name == "bias" and parent in column_modules and len(x.shape) > stack_axes:
            if x.shape[stack_axes] % n == 0:
                out[path] = PartitionSpec(*([None] * stack_axes + [axis]))
    return out


def _splits_blocks(x, entries, mesh) -> bool:
    if not protocols.is_base_leaf(x):
        return False
    try:
        x.storage_specs(_spec(entries), dict(mesh.shape), "")
    except ValueError:
        return True
    return False


# ----------------------------------------------------------------------------------------
# Spec plumbing


def _spec_map(base_specs) -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` from a spec tree or a flat ``{path: spec}`` dict."""
    if base_specs is None:
        return {}

    def leaf(x):
        return x is None or _is_spec(x) or isinstance(x, NamedSharding) or protocols.is_base_leaf(x)

    out = {}
    for path, s in P.flatten(base_specs, is_leaf=leaf):
        if isinstance(s, NamedSharding):
            s = s.spec
        elif s is None:
            s = PartitionSpec()
        elif protocols.is_base_leaf(s):
            raise ValueError(f"base_specs[{path!r}] is a {type(s).__name__} of specs (storage "
                             "specs); pass one PartitionSpec for the parameter's logical shape")
        elif not _is_spec(s):
            raise TypeError(f"base_specs[{path!r}] is a {type(s).__name__}, expected a "
                            "PartitionSpec")
        out[path] = s
    return out


def _entries(spec: PartitionSpec, ndim: int, where: str) -> tuple:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where}: spec {spec} has {len(entries)} entries for an array of "
                         f"rank {ndim}")
    return entries + (None,) * (ndim - len(entries))


def _check_axes(mesh: Mesh, axes) -> None:
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}")


def _check_divides(mesh: Mesh, spec: PartitionSpec, shape, where: str) -> None:
    for d, e in enumerate(_entries(spec, len(shape), where)):
        if e is None:
            continue
        axes = (e,) if isinstance(e, str) else tuple(e)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"{where}: mesh axes {missing} are not in the mesh "
                             f"{dict(mesh.shape)} (spec {spec})")
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[d] % n:
            raise ValueError(f"{where}: dim {d} of shape {tuple(shape)} is not divisible by "
                             f"{n} shards (mesh axes {axes})")


# ----------------------------------------------------------------------------------------
# What a compiled program communicates


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective in a compiled program.

    Attributes:
      op: ``"all-gather"``, ``"all-reduce"``, ``"reduce-scatter"``, ``"all-to-all"`` or
        ``"collective-permute"``.
      shapes: per-device result shapes (several for a combined all-reduce).
      nbytes: bytes of the results on one device.
      source: for an all-gather, what is gathered, found by following its operand back
        through data movement: ``"parameter"`` (an input, e.g. a frozen weight shard),
        ``"sum"`` (a float add, e.g. the merged weight ``W0 + s·A·B``), ``"product"`` (a
        matmul result such as ``ΔW = s·A·B`` on its own), or the producing op's name.
      name: the HLO instruction name.
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int
    source: str | None
    name: str


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_MOVES = {"bitcast", "copy", "transpose", "reshape", "collective-permute", "dynamic-slice",
          "slice", "all-gather", "broadcast", "convert", "pad", "concatenate", "copy-start",
          "copy-done", "optimization-barrier", "get-tuple-element", "tuple"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}  # else the digits: s4, u8, f32...


def collectives(compiled) -> list[Collective]:
    """Lists the collectives of a compiled program (``jax.jit(f).lower(...).compile()``, or
    its HLO text), to check what a sharded step communicates.

    >>> import jax, jax.numpy as jnp
    >>> collectives(jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile())
    []
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    instrs, comps, comp = {}, {}, None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            comp = line.split()[0].lstrip("%")
            if comp == "ENTRY":
                comp = line.split()[1].lstrip("%")
            comps[comp] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, typ, op, args, rest = m.groups()
        calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
        instrs[name] = (typ, op, re.findall(r"%([\w.\-]+)", args), calls)
        if comp is not None:
            comps[comp].append(name)

    def shapes(typ):
        return [(dt, tuple(int(d) for d in dims.split(",") if d))
                for dt, dims in _SHAPE.findall(typ)]

    def nbytes(typ):
        return sum(-(-math.prod(s) * _BITS.get(dt, int(re.sub(r"\D", "", dt) or 8)) // 8)
                   for dt, s in shapes(typ))

    def ops_in(comp_names, seen=None):
        seen = set() if seen is None else seen
        found = set()
        for c in comp_names:
            if c in seen or c not in comps:
                continue
            seen.add(c)
            for i in comps[c]:
                typ, op, _, calls = instrs[i]
                is_float = any(dt[0] in "fb" for dt, _ in shapes(typ))
                found.add((op, is_float))
                found |= ops_in(calls, seen)
        return found

    def source(name, depth=0):
        if name not in instrs or depth > 64:
            return None
        typ, op, operands, calls = instrs[name]
        if op == "parameter":
            return "parameter"
        if op in ("dot", "convolution"):
            return "product"
        if op == "add" and any(dt[0] in "fb" for dt, _ in shapes(typ)):
            return "sum"
        if op in ("fusion", "custom-call", "call") or calls:
            inner = ops_in(calls)
            has_dot = any(o in ("dot", "convolution") for o, _ in inner)
            has_add = ("add", True) in inner
            if has_add:
                return "sum"
            if has_dot:
                return "product"
        elif op not in _MOVES:
            return op
        if not operands:
            return op
        big = max(operands, key=lambda o: nbytes(instrs[o][0]) if o in instrs else -1)
        return source(big, depth + 1)

    out = []
    for name, (typ, op, operands, _) in instrs.items():
        base = op.removesuffix("-start")
        if base not in _COLLECTIVES or op.endswith("-done"):
            continue
        src = source(operands[0]) if base == "all-gather" and operands else None
        out.append(Collective(base, tuple(s for _, s in shapes(typ)), nbytes(typ), src, name))
    return out
