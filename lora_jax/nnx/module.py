"""``LoRA``: an NNX model with adapters, trained the NNX way.

``lm = LoRA(model, r=8, alpha=16, rngs=nnx.Rngs(0))`` is an ``nnx.Module`` holding the model
(its weights now frozen :class:`FrozenParam` variables, quantized if asked) and the adapters
(:class:`LoraParam` variables). ``lm(x)`` runs the model through :func:`lora_jax.apply`'s fast
path; the model's RNG counts, batch statistics and caches are updated in place as NNX does, so
``nnx.Dropout`` draws new masks every step, also under ``nnx.jit``.

>>> import jax, jax.numpy as jnp, optax, lora_jax
>>> from flax import nnx
>>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
>>> lm = lora_jax.nnx.LoRA(model, r=2, alpha=4, rngs=nnx.Rngs(2))
>>> opt = nnx.Optimizer(lm, optax.adam(1e-2), wrt=lora_jax.nnx.LoraParam)
>>> x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
>>> @nnx.jit
... def step(lm, opt, x, y):
...     loss_fn = lambda lm: jnp.mean((lm(x) - y) ** 2)
...     loss, grads = nnx.value_and_grad(loss_fn)(lm)  # default wrt=nnx.Param: the adapters
...     opt.update(lm, grads)
...     return loss
>>> losses = [float(step(lm, opt, x, y)) for _ in range(3)]
>>> losses[2] < losses[0]
True
>>> merged = lm.merge()          # a plain model of nnx.Param, adapters folded in
>>> bool(jnp.allclose(merged(x), lm(x), atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from lora_jax import init_schemes, merging, quant, summaries
from lora_jax import paths as P
from lora_jax.initializers import init as lora_init
from lora_jax.leaves import leaves
from lora_jax.nnx.pure import functional
from lora_jax.nnx.variables import Defs, FrozenParam, assign, is_variable, pack, unpack
from lora_jax.transform import apply, report

PyTree = Any
# The model's weights: frozen ones, and the modules_to_save that stay nnx.Param.
_WEIGHTS = nnx.Any(FrozenParam, nnx.Param)


class LoRA(nnx.Module):
    """An NNX model with LoRA adapters, run through :func:`lora_jax.apply`'s fast path.

    Every ``nnx.Param`` of ``model`` becomes a frozen :class:`FrozenParam` (stored quantized
    with ``quantize=``); the adapters are :class:`LoraParam` variables (a subclass of
    ``nnx.Param``), so ``nnx.Optimizer(lm, tx, wrt=LoraParam)`` (or ``wrt=nnx.Param``) and
    ``nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoraParam))`` (or the default) train
    the adapters only. ``lm.eval()``/``lm.train()`` switch the model's dropout and the LoRA
    dropout together.

    Targets: by default every float weight named ``kernel``, ``w`` or ``weight`` with two or
    more axes: every ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and
    ``nnx.MultiHeadAttention`` projection, **including the output head**; never embeddings,
    biases or norms. Exclude the head with ``exclude=r"head/kernel"`` (a regex over the
    '/'-joined parameter paths, e.g. ``"blocks/0/attn/value/kernel"``; see ``lm.summary()``).
    With ``layouts=lora_jax.nnx.trace(model, x)`` the targets and their input/output axes come
    from how the model uses each weight (convolutions, einsum kernels with the input axis
    anywhere, fused projections) instead of from names.

    Args:
      model: the ``nnx.Module`` to adapt. Its arrays are shared, not copied: ``del`` your
        own reference to free them when quantizing.
      r: rank.
      rngs: ``nnx.Rngs``: ``rngs.params()`` initializes the adapters, ``rngs.dropout()``
        draws the LoRA dropout masks on each training call.
      alpha: LoRA alpha (scale ``alpha / r``); ``None`` means ``r``.
      quantize: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``: store the frozen base
        quantized (QLoRA), with ``block_size`` and ``double_quant`` as in
        :func:`lora_jax.quantize`. A model whose params already hold quantized leaves works too.
      strict: raise :class:`lora_jax.LoraFallbackError` where a use of an adapted weight
        would take the merged-weight fallback.
      compute_dtype: as in :func:`lora_jax.apply`.
      method: the model's method ``lm(...)`` calls (a name, or ``fn(model, *args)``).
      modules_to_save: regexes over parameter paths (``r"head/.*"``) whose weights stay
        ``nnx.Param`` and train in full beside the adapters (PEFT's ``modules_to_save``):
        ``nnx.Optimizer(lm, tx, wrt=nnx.Param)`` trains both, ``wrt=LoraParam`` the
        adapters only. They are never quantized.
      **kwargs: the rest of :func:`lora_jax.init`'s options: ``targets``, ``exclude``,
        ``rules``, ``init`` (a scheme that changes the base, ``"pissa"`` or ``"olora"``, makes
        the frozen base its residual ``W − s·A·B``; ``quantize=`` then quantizes that
        residual, as QPiSSA), ``rslora``, ``dora``, ``dropout``, ``dtype``, ``layouts``,
        ``in_axes``, ``stack_axes``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module`` (or is a ``LoRA`` already), ``rngs`` is
        not an ``nnx.Rngs``. ValueError: what :func:`lora_jax.init` raises (a target pattern
        that matches nothing, a rank too large), or a model without ``nnx.Param``.
    """

    def __init__(self, model: nnx.Module, r: int = 8, *, rngs: nnx.Rngs,
                 alpha: float | None = None, quantize: str | None = None, block_size: int = 64,
                 double_quant: bool = True, strict: bool = False, compute_dtype: Any = None,
                 method: str | Callable = "__call__", modules_to_save: P.Pattern | None = None,
                 **kwargs: Any):
        graphdef, params, rest = _split(model, rngs, type(self).__name__)
        scheme = init_schemes.get(kwargs.get("init", "default"), type(self).__name__)
        if scheme.factors is None:  # LoftQ: the quantized base comes with the factors
            raise ValueError(f"{type(self).__name__}: init={scheme.name!r} builds its own base; "
                             f"call {scheme.builder} on nnx.state(model, nnx.Param) and run the "
                             "model with lora_jax.apply (lora_jax.nnx.functional)")
        lora = lora_init(params, r, key=rngs.params(), alpha=alpha, **kwargs)
        # PiSSA, OLoRA: the frozen base is the residual, so the model starts unchanged.
        params = init_schemes.residual_base(params, lora)
        self._wrap(graphdef, params, rest, lora, rngs, quantize=quantize, block_size=block_size,
                   double_quant=double_quant, layouts=kwargs.get("layouts"), strict=strict,
                   compute_dtype=compute_dtype, method=method, modules_to_save=modules_to_save)

    def _wrap(self, graphdef, params, rest, lora, rngs, *, quantize, block_size, double_quant,
              layouts, strict, compute_dtype, method, modules_to_save) -> None:
        save = tuple(P.check_pattern(p, "modules_to_save pattern")
                     for p in P.as_patterns(modules_to_save))
        if quantize is not None:
            params = quant.quantize(params, quantize, block_size=block_size,
                                    double_quant=double_quant, layouts=layouts,
                                    exclude=list(save) or None)
        pairs, tdef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
        kept = [P.path_str(kp) for kp, _ in pairs if P.matches(P.path_str(kp), save)]
        if save and not kept:
            raise ValueError(f"modules_to_save {list(save)} matches no parameter; paths look like "
                             f"{[P.path_str(kp) for kp, _ in pairs][:4]}")
        self.modules_to_save = tuple(kept)
        frozen = tdef.unflatten([v if P.path_str(kp) in kept else _retype(v, FrozenParam)
                                 for kp, v in pairs])
        self.model = nnx.merge(graphdef, frozen, rest, copy=True)
        variables, defs = pack(lora)
        self.lora = nnx.data(variables)
        self.lora_defs: Defs = defs
        self.rngs = rngs
        self.deterministic = False  # set by lm.eval() / lm.train(), as nnx.Dropout's
        self.strict, self.compute_dtype, self.method = strict, compute_dtype, method
        self.lora_dropout = any(leaf.dropout > 0 for leaf in leaves(lora).values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output with the adapters applied; the model's state is updated."""
        return self.call(self.method, *args, **kwargs)

    def call(self, method: str | Callable, *args: Any, **kwargs: Any) -> Any:
        """Another method of the model with the adapters applied (``lm.call("encode", x)``),
        by name or as ``fn(model, *args)``."""
        graphdef, base, rest = nnx.split(self.model, _WEIGHTS, ...)
        fn = functional(graphdef, method, param_filter=_WEIGHTS)
        rng = self.rngs.dropout() if self.lora_dropout and not self.deterministic else None
        out, rest = apply(fn, strict=self.strict, compute_dtype=self.compute_dtype,
                          modules_to_save=list(self.modules_to_save) or None)(
            base, self.adapters(), rest, *args, lora_rng=rng, **kwargs)
        nnx.update(self.model, rest)
        return out

    # ---- the ordinary LoRA tree, for summary, report, checkpoints and PEFT files

    def adapters(self) -> dict:
        """The adapters as the ordinary LoRA tree (paths as in the model: ``"head/kernel"``),
        for :func:`lora_jax.summary`, :func:`lora_jax.checkpoint.save_adapter`,
        :func:`lora_jax.peft.save`, :func:`lora_jax.merge`."""
        return unpack(self.lora, self.lora_defs)

    def set_adapters(self, lora: PyTree) -> None:
        """Loads a LoRA tree (``checkpoint.load_adapter``, ``peft.load``) into the adapters.

        Raises:
          ValueError: ``lora`` lacks an adapter this module has, has one it lacks, or one of
            another kind, rank or shape.
        """
        merging.check_fits(self.base(), lora, where="set_adapters")
        assign(self.lora, self.lora_defs, lora)

    def base(self) -> nnx.State:
        """The model's weights as an ``nnx.State`` (quantized leaves kept): the frozen base,
        and the ``modules_to_save`` weights."""
        return nnx.state(self.model, _WEIGHTS)

    def summary(self) -> summaries.Summary:
        """:func:`lora_jax.summary` of the adapters against the base."""
        return summaries.summary(self.adapters(), self.base())

    def report(self, *args: Any, **kwargs: Any):
        """:func:`lora_jax.report` for ``lm(*args, **kwargs)``: how each use of each adapted
        weight is computed (the fast path, or a fallback and why). Runs no FLOPs."""
        graphdef, base, rest = nnx.split(self.model, _WEIGHTS, ...)
        fn = functional(graphdef, self.method, param_filter=_WEIGHTS)
        return report(fn, base, self.adapters(), rest, *args, **kwargs)

    # ---- folding the adapters in and out

    def merge(self, *, dtype: Any = None) -> nnx.Module:
        """The plain model (``nnx.Param`` weights) with the adapters folded into its kernels.

        A quantized base is dequantized (to ``dtype``, default the original dtype). ``lm``
        itself is unchanged; the result shares no variables with it.
        """
        graphdef, base, rest = nnx.split(self.model, _WEIGHTS, ...)
        merged = merging.merge(base, self.adapters(), dtype=dtype)
        params = jax.tree.map(_restore_type, merged, is_leaf=is_variable)
        return nnx.merge(graphdef, params, rest, copy=True)

    def unmerge(self, merged: nnx.Module) -> nnx.Module:
        """The inverse of :meth:`merge`: a plain model with the adapters taken out of its
        kernels (``merged`` is not changed)."""
        if not isinstance(merged, nnx.Module):
            raise TypeError(f"unmerge: expected the plain nnx.Module from merge(), got a "
                            f"{type(merged).__name__}")
        graphdef, params, rest = nnx.split(merged, nnx.Param, ...)
        return nnx.merge(graphdef, merging.unmerge(params, self.adapters()), rest, copy=True)


# ----------------------------------------------------------------------------------------


def _split(model: Any, rngs: Any, who: str):
    if not (hasattr(nnx, "data") and hasattr(nnx.Variable, "get_value")):  # flax 0.12.1
        import flax

        raise ImportError(f"{who} needs flax >= 0.12.1 (installed: {flax.__version__}); "
                          "lora_jax.nnx.functional works with older versions")
    if isinstance(model, LoRA):
        raise TypeError(f"{who}: model is a lora_jax.nnx.LoRA already; wrap the plain model "
                        "(lm.merge() gives it with the adapters folded in)")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{who}: model must be an nnx.Module, got a {type(model).__name__}; for "
                        "a Linen model or a parameter tree use lora_jax.init and lora_jax.apply")
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{who}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got a "
                        f"{type(rngs).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if not jax.tree.leaves(params):
        kinds = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=is_variable)})
        raise ValueError(f"{who}: the model has no nnx.Param to adapt (its state holds {kinds})")
    return graphdef, params, rest


def _retype(v: nnx.Variable, new: type) -> nnx.Variable:
    # A Param subclass (a user's own) comes back as itself from merge().
    meta = dict(v.get_metadata())
    if type(v) is not nnx.Param:
        meta["param_type"] = type(v)
    return new(v.get_value(), **meta)


def _restore_type(v: nnx.Variable) -> nnx.Variable:
    if not isinstance(v, FrozenParam):  # a modules_to_save weight: an nnx.Param already
        return v
    meta = dict(v.get_metadata())
    cls = meta.pop("param_type", nnx.Param)
    return cls(v.get_value(), **meta)


__all__ = ["LoRA"]
