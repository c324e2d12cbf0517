"""From PEFT module tensors to adapter leaves: layouts, fused kernels, stacked layers, and
AdaLoRA's pruned ranks.

A fused kernel concatenates its modules' ``lora_B`` along the output when they share
``lora_A``, else stacks their ranks (:func:`fuse`); the layers of an ``nn.scan`` kernel are
stacked into one leaf, absent layers as zeros (:func:`stack_leaf`); AdaLoRA's ``rank_pattern``
masks put the kept ranks back in place among ``init_r`` (:func:`adalora_masks`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lora_jax import adalora as AL
from lora_jax import dora as D
from lora_jax import lora as L
from lora_jax.peft.config import pattern_key
from lora_jax.peft.modules import Target


def _check_shape(key: str, x: np.ndarray, expected: tuple[int, ...]) -> None:
    """A tensor of the expected shape, or an error naming it."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"load: tensor {key!r} has shape {tuple(x.shape)}, expected "
                         f"{tuple(expected)}")


def lora_module(t: Target, d, n_out: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(a (*in, r) or (n_in, r), b (r, n_out)) of one LoRA module, shapes checked."""
    (ka, A), (kb, B) = d["A"], d["B"]
    if t.layer == "conv":
        spatial, cin, cout = t.core[:-2], t.core[-2], t.core[-1]
        _check_shape(ka, A, (r, cin) + spatial)
        _check_shape(kb, B, (cout, r) + (1,) * len(spatial))
        nd = A.ndim
        return A.transpose(tuple(range(2, nd)) + (1, 0)), B.reshape(cout, r).T
    _check_shape(ka, A, (r, t.n_in))
    _check_shape(kb, B, (n_out, r))
    return A.T, B.T


def load_lora(t: Target, per_index, mods, cfg, dtype, dropout) -> L.LoraWeight:
    """The LoRA leaf of ``t`` from its modules' tensors (``per_index``: stack index -> the
    ``(module name, slice)`` pairs there; ``mods``: module -> tensors), with PEFT's per-module
    rank and alpha from the config's patterns."""
    rslora = bool(cfg.get("use_rslora"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    got: dict = {}  # stack index -> ((a, b[, m]), (alpha, rslora))
    for idx, parts in per_index.items():
        blocks = []  # (slice, a (n_in.., r), b (r, n_out), alpha) of the modules present
        for name, sl in parts:
            if name not in mods:
                continue
            r = rp.get(pattern_key(list(rp), name), cfg.get("r", 8))  # PEFT's defaults: 8, 8
            alpha = float(ap.get(pattern_key(list(ap), name), cfg.get("lora_alpha", 8)))
            key_a, a_t = mods[name]["A"]
            if ("lora_embedding_A" in key_a) != (t.layer == "embedding"):
                raise ValueError(f"load: tensor {key_a!r} does not fit {t.path!r}, which is "
                                 f"{'an' if t.layer == 'embedding' else 'a'} {t.layer} parameter")
            if a_t.shape[0] != r:
                raise ValueError(f"load: tensor {key_a!r} has rank {a_t.shape[0]} but the config "
                                 f"(r, rank_pattern) gives r={r} for module {name!r}")
            n_out = t.n_out if sl is None else sl.stop - sl.start
            blocks.append((sl, *lora_module(t, mods[name], n_out, r), alpha))
        if blocks:
            got[idx] = fuse(t, blocks, rslora)
            if cfg.get("use_dora"):  # DoRA's magnitude (out,) per module
                got[idx] = (got[idx][0] + (_magnitude(t, parts, mods),), got[idx][1])
    if cfg.get("use_dora"):
        if len(got) != max(1, math.prod(t.stack_shape)):
            raise NotImplementedError(f"load: DoRA adapter for only some layers of stacked kernel "
                                      f"{t.path!r}")
        return stack_leaf(t, got, lambda a, b, m, alpha, rs: D.DoraWeight(
            a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), m=jnp.asarray(m, dtype),
            alpha=alpha, rslora=rs, in_axes=t.in_axes, stack_axes=len(t.stack_shape),
            dropout=dropout))
    return stack_leaf(t, got, lambda a, b, alpha, rs: L.LoraWeight(
        a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=alpha, rslora=rs,
        in_axes=t.in_axes, stack_axes=len(t.stack_shape), dropout=dropout))


def _magnitude(t: Target, parts, mods) -> np.ndarray:
    """DoRA's ``lora_magnitude_vector`` of one (unfused) module, shaped as the output axes."""
    if len(parts) != 1 or parts[0][1] is not None or t.layer != "linear":
        raise NotImplementedError(f"load: DoRA is read for unfused Linear kernels only, not "
                                  f"{t.path!r}")
    key, m = mods[parts[0][0]]["M"]
    _check_shape(key, m, (t.n_out,))
    return m.reshape(t.core[t.in_axes:])


def fuse(t: Target, blocks, rslora):
    """((a, b), (alpha, rslora)) for one kernel from its modules: shared A, or stacked ranks."""
    in_dims, out_dims = t.core[: t.in_axes], t.core[t.in_axes:]
    sl0, a0, b0, alpha0 = blocks[0]
    if sl0 is None:  # one module for the whole kernel
        return (a0.reshape(in_dims + (-1,)), b0.reshape((-1,) + out_dims)), (alpha0, rslora)
    if all(np.array_equal(a, a0) and alpha == alpha0 for _, a, _, alpha in blocks):
        b = np.zeros((a0.shape[-1], t.n_out), b0.dtype)  # absent modules stay zero
        for sl, _, bb, _ in blocks:
            b[:, sl] = bb
        return (a0.reshape(in_dims + (-1,)), b.reshape((-1,) + out_dims)), (alpha0, rslora)
    # Different A per module: stack the ranks, each module's scale folded into its block of b.
    a = np.concatenate([a for _, a, _, _ in blocks], axis=-1)
    b = np.zeros((a.shape[-1], t.n_out), np.float64)
    row = 0
    for sl, aa, bb, alpha in blocks:
        r = aa.shape[-1]
        b[row: row + r, sl] = bb * (alpha / math.sqrt(r) if rslora else alpha / r)
        row += r
    rank = a.shape[-1]
    return (a.reshape(in_dims + (rank,)), b.reshape((rank,) + out_dims)), (float(rank), False)


def stack_leaf(t: Target, got: dict, make):
    """One leaf from ``{stack index: (arrays, meta)}``; absent layers get zero arrays."""
    if not t.stack_shape:
        arrays, meta = got[()]
        return make(*arrays, *meta)
    metas = {(arrs[0].shape[-1],) + tuple(meta) for arrs, meta in got.values()}
    if len(metas) > 1:
        raise NotImplementedError(f"load: the layers of stacked kernel {t.path!r} have different "
                                  f"(rank, alpha, ...) {sorted(metas, key=str)}; one adapter leaf "
                                  "holds one of each")
    ref, meta = next(iter(got.values()))
    stacked = [np.stack([got[idx][0][j] if idx in got else np.zeros_like(ref[j])
                         for idx in np.ndindex(*t.stack_shape)]
                        ).reshape(t.stack_shape + ref[j].shape) for j in range(len(ref))]
    return make(*stacked, *meta)


def adalora_masks(rank_pattern, init_r) -> dict[str, np.ndarray]:
    """``{module: kept ranks (bool, init_r)}`` from an AdaLoRA config's ``rank_pattern``."""
    masks = {}
    for key, m in (rank_pattern or {}).items():
        name = key.split(".lora_E")[0]
        m = np.asarray(m, bool).reshape(-1)
        if m.shape[0] != init_r:
            raise ValueError(f"load: AdaLoRA rank_pattern[{key!r}] has {m.shape[0]} entries, "
                             f"expected init_r={init_r}")
        masks[name] = m
    return masks


def load_adalora(t: Target, per_index, mods, masks, cfg, dtype, dropout) -> AL.AdaLoraWeight:
    """The AdaLoRA leaf of ``t`` (as :func:`load_lora`), every module at its full ``init_r``:
    pruned ranks (``masks``) come back as zero entries of ``e``."""
    init_r = int(cfg.get("init_r", 12))  # PEFT's default
    alpha = float(cfg.get("lora_alpha", 8) or 0) or float(init_r)  # PEFT: r when lora_alpha == 0
    if t.layer != "linear":
        raise NotImplementedError(f"load: {t.path!r}: PEFT's AdaLoRA adapts Linear layers only")
    got = {}
    for idx, parts in per_index.items():
        ps, es, qs = [], [], []
        for name, sl in parts:
            if name not in mods:
                continue
            n_out = t.n_out if sl is None else sl.stop - sl.start
            keep = masks.get(name, np.ones(init_r, bool))
            k = int(keep.sum())
            (ka, A), (kb, B), (ke, E) = mods[name]["A"], mods[name]["B"], mods[name]["E"]
            _check_shape(ka, A, (k, t.n_in))
            _check_shape(kb, B, (n_out, k))
            _check_shape(ke, E, (k, 1))
            p, e, q = (np.zeros((t.n_in, init_r), A.dtype), np.zeros(init_r, E.dtype),
                       np.zeros((init_r, n_out), B.dtype))
            p[:, keep], e[keep], q[keep] = A.T, E[:, 0], B.T
            ps.append(p), es.append(e), qs.append((sl, q))
        if not ps:
            continue
        if any(not np.array_equal(p, ps[0]) or not np.array_equal(e, es[0])
               for p, e in zip(ps, es)):
            raise NotImplementedError(f"load: the AdaLoRA modules of fused kernel {t.path!r} "
                                      "have different lora_A/lora_E")
        q = np.zeros((init_r, t.n_out), qs[0][1].dtype)
        for sl, qq in qs:
            q[:, slice(None) if sl is None else sl] = qq
        got[idx] = ((ps[0].reshape(t.core[: t.in_axes] + (init_r,)), es[0],
                     q.reshape((init_r,) + t.core[t.in_axes:])), (alpha,))
    return stack_leaf(t, got, lambda p, e, q, alpha: AL.AdaLoraWeight(
        p=jnp.asarray(p, dtype), e=jnp.asarray(e, dtype), q=jnp.asarray(q, dtype), alpha=alpha,
        target_r=int(cfg.get("target_r", 0)), in_axes=t.in_axes,
        stack_axes=len(t.stack_shape), dropout=dropout))
