"""Any JAX model as written (issue #12): layouts learned from use, on models in other styles.

The models (tests/styles/) are written as gemma, RecurrentGemma, MaxText-style ``nn.scan``
stacks and Flax NNX write them, with no regard for lora_jax's conventions. For each one:

* ``lora_jax.trace`` finds every matmul weight (the paths are listed here, by hand) with the
  roles of its axes, and calls the lookup tables embeddings;
* ``init`` by use adapts exactly those weights, with the standard factors: A over the input
  axes, B over the output axes, stack axes leading, r·(prod(in) + prod(out)) parameters per
  stack index, and a delta that is A·B put back in the kernel's axis order (checked in NumPy);
* the rank bound is min(prod(in), prod(out)) per stack index, and PiSSA's factors are the top-r
  singular vectors of the kernel read as that (in, out) matrix;
* ``apply(strict=True)`` takes the fast path for every use, under ``jit`` and ``grad``, and its
  values and gradients equal float64 autodiff of ``fn(merge(params, lora), ...)``;
* the same with an NF4-quantized base (reference: the merged dequantized model), with AdaLoRA,
  through gemma's KV-cache decode, and with a ``Rule`` that makes a fused kv/qkv axis a stack.

Factors are fresh random values (B included), drawn with NumPy: on a 2-core CPU an eager jax
op of a new shape costs a compile. Jitted functions are built once per model and reused (the
float64 reference serves the dense and the quantized base alike).
"""

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f64, max_rel_err, randomize_np
from styles import gemma_style, griffin_style, mlp_style, nnx_style, scan_style

import lora_jax

R = 4  # > 2: under a first-axis-is-input reading, kv_einsum (2, K, D, H) could not take it
GQA = gemma_style.TransformerConfig()  # q (4, 32, 8), kv (2, 2, 32, 8), gating (2, 64, 32)
QKV = gemma_style.TransformerConfig(num_kv_heads=4, fused_qkv=True, num_layers=1,
                                    transpose_gating_einsum=False)  # qkv (3, 4, 32, 8)
GQA_MODEL = gemma_style.Transformer(GQA)  # one object: its jitted decode steps are reused


def _key(seed):
    # Cheap to compile; these keys only initialise weights.
    return jax.random.key(seed, impl="unsafe_rbg")


# Compiling dominates this file's run time, so the bigger models have one layer where a second
# would only repeat paths (gemma GQA keeps two: its decode test carries a cache per layer).
MAKERS = {
    "gemma_gqa": lambda k: gemma_style.make(k, GQA),
    "gemma_qkv": lambda k: gemma_style.make(k, QKV),
    "griffin": lambda k: griffin_style.make(k, griffin_style.GriffinConfig(num_layers=1)),
    "scan": scan_style.make,
    "nnx": nnx_style.make,
    "mlp": mlp_style.make,
}
STYLES = list(MAKERS)


# ----------------------------------------------------------------------------------------
# What each model is: every matmul weight with its roles, and its embeddings. By hand, from
# the einsum strings and module definitions (see each style's docstring).


def _per_layer(prefix, n, table):
    return {f"{prefix.format(i)}/{p}": roles for i in range(n) for p, roles in table.items()}


EXPECTED = {
    "gemma_gqa": _per_layer("params/layer_{}", 2, {
        "attn/q_einsum/w": "oio",  # (N, D, H)     BTD,NDH->BTNH
        "attn/kv_einsum/w": "ooio",  # (2, K, D, H)  BTD,CKDH->CBTKH
        "attn/attn_vec_einsum/w": "iio",  # (N, H, D)  BTNH,NHD->BTD
        "mlp/gating_einsum/w": "ooi",  # (2, F, D)     BTD,CFD->CBTF
        "mlp/linear/w": "io",  # (F, D)               BTF,FD->BTD
    }),
    "gemma_qkv": _per_layer("params/layer_{}", 1, {
        "attn/qkv_einsum/w": "ooio",  # (3, N, D, H)  BTD,SNDH->SBTNH
        "attn/attn_vec_einsum/w": "iio",
        "mlp/gating_einsum/w": "oio",  # (2, D, F)     BTD,CDF->CBTF
        "mlp/linear/w": "io",
    }),
    "griffin": _per_layer("params/blocks.{}", 1, {
        "recurrent_block/linear_x/kernel": "io",
        "recurrent_block/linear_y/kernel": "io",
        "recurrent_block/linear_out/kernel": "io",
        "recurrent_block/rg_lru/input_gate/w": "sio",  # (Nb, Bs, Bs) ...hi,hij->...hj
        "recurrent_block/rg_lru/a_gate/w": "sio",
        "mlp_block/ffw_up/w": "oio",  # (2, D, F)  ...td,cdD->c...tD
        "mlp_block/ffw_down/kernel": "io",
    }),
    "scan": {
        "params/decoder/layers/self_attention/qkv/kernel": "sio",  # (L, D, 3D), nn.scan slices L
        "params/decoder/layers/self_attention/out/kernel": "sio",
        "params/decoder/layers/mlp/wi/kernel": "sio",
        "params/decoder/layers/mlp/wo/kernel": "sio",
        "params/decoder/logits_dense/kernel": "io",
    },
    "nnx": {
        **_per_layer("blocks/{}", 2, {
            "attn/query/kernel": "ioo",  # (D, N, H)
            "attn/key/kernel": "ioo",
            "attn/value/kernel": "ioo",
            "attn/out/kernel": "iio",  # (N, H, D)
            "up/kernel": "io",
            "down/kernel": "io",
        }),
        "head/kernel": "io",
    },
    "mlp": {f"params/Dense_{i}/kernel": "io" for i in range(3)},
}

EMBEDDINGS = {
    "gemma_gqa": {"params/embedder/input_embedding"},  # lookup, then tied head BTD,VD->BTV
    "gemma_qkv": {"params/embedder/input_embedding"},
    "griffin": {"params/embedder/input_embedding"},  # lookup, then x @ table.T
    "scan": {"params/decoder/token_embedder/embedding"},
    "nnx": {"tok/embedding", "pos/embedding"},
    "mlp": set(),
}

# The standard factors, spelled out (r = 4) for the layouts issue #12 names.
LITERAL = [
    ("gemma_gqa", "params/layer_0/attn/q_einsum/w", (32, R), (R, 4, 8)),
    ("gemma_gqa", "params/layer_0/attn/attn_vec_einsum/w", (4, 8, R), (R, 32)),
    ("gemma_gqa", "params/layer_0/attn/kv_einsum/w", (32, R), (R, 2, 2, 8)),
    ("gemma_gqa", "params/layer_0/mlp/gating_einsum/w", (32, R), (R, 2, 64)),
    ("gemma_qkv", "params/layer_0/attn/qkv_einsum/w", (32, R), (R, 3, 4, 8)),
    ("gemma_qkv", "params/layer_0/mlp/gating_einsum/w", (32, R), (R, 2, 64)),
    ("griffin", "params/blocks.0/recurrent_block/rg_lru/a_gate/w", (4, 8, R), (4, R, 8)),
    ("griffin", "params/blocks.0/mlp_block/ffw_up/w", (32, R), (R, 2, 64)),
    ("scan", "params/decoder/layers/self_attention/qkv/kernel", (2, 32, R), (2, R, 96)),
    ("nnx", "blocks/1/attn/query/kernel", (32, R), (R, 4, 8)),
    ("nnx", "blocks/1/attn/out/kernel", (4, 8, R), (R, 32)),
]


# ----------------------------------------------------------------------------------------
# Helpers, independent of the code under test.


def flat(tree):
    """{path: leaf}: '/'-joined keys, NNX ``.value`` dropped, LoRA leaves kept whole."""
    tu = jax.tree_util

    def name(k):
        if isinstance(k, tu.GetAttrKey):
            return None if k.name == "value" else k.name
        return str(k.key if isinstance(k, (tu.DictKey, tu.FlattenedIndexKey)) else k.idx)

    def is_leaf(x):
        return lora_jax.is_quantized(x) or isinstance(
            x, (lora_jax.LoraWeight, lora_jax.adalora.AdaLoraWeight))

    pairs, _ = tu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(n for n in map(name, p) if n is not None): x for p, x in pairs}


def groups(shape, roles):
    """(stack dims, input dims, output dims), each in the kernel's own axis order."""
    assert len(shape) == len(roles), (shape, roles)
    return tuple(tuple(d for d, c in zip(shape, roles) if c == g) for g in "sio")


def standard_factors(shape, roles, r):
    s, i, o = groups(shape, roles)
    return s + i + (r,), s + (r,) + o, math.prod(s) * r * (math.prod(i) + math.prod(o))


def np_delta(a, b, roles, scale):
    """scale·A·B in the kernel's axis order, by np.einsum over the role letters."""
    k = "abcdefghijkl"[: len(roles)]
    s, i, o = ("".join(x for x, c in zip(k, roles) if c == g) for g in "sio")
    return scale * np.einsum(f"{s}{i}z,{s}z{o}->{k}", np.asarray(a, np.float64),
                             np.asarray(b, np.float64))


def assert_fast(rep, paths):
    """No fallback anywhere, and every listed weight is used by a fast dot_general."""
    assert not rep.fallbacks, str(rep)
    for p in paths:
        uses = rep.weights[p].uses
        assert uses, (p, str(rep))
        assert all(u.route != "fallback" and u.reason is None for u in uses), (p, uses)
        assert any(u.primitive == "dot_general" and u.route == "fast" for u in uses), (p, uses)


# ----------------------------------------------------------------------------------------
# Built once per model (a file runs in one pytest-xdist worker).


@functools.cache
def built(style):
    return MAKERS[style](_key(0))


@functools.cache
def traced(style):
    fn, params, args = built(style)
    return lora_jax.trace(fn, params, *args)


@functools.cache
def adapters(style):
    _, params, _ = built(style)
    layouts = traced(style)
    lora = jax.jit(lambda p: lora_jax.init(p, r=R, alpha=2.0 * R, key=_key(1),
                                           layouts=layouts))(params)
    return randomize_np(lora, seed=100 + STYLES.index(style))


@functools.cache
def quantized(style):
    _, params, _ = built(style)
    # The scan model's layers hold 16-48 blocks of 64 each: fewer than the 256 that one
    # double-quantized absmax group spans, so keep the absmax in float32 there (groups must
    # not straddle the layers a scan slices; see tests/test_qlora.py).
    dq = style != "scan"
    return lora_jax.quantize(params, "nf4", layouts=traced(style), double_quant=dq)


def _float_input(args):
    return jnp.issubdtype(args[0].dtype, jnp.floating)


def _proj(shape):
    return jnp.asarray(np.random.default_rng(42).standard_normal(shape), jnp.float32)


@functools.cache
def fast_grad(style):
    """jit(value_and_grad) of sum(apply(fn, strict=True)(base, lora, x, ...) * proj)."""
    fn, _, args = built(style)
    f = lora_jax.apply(fn, strict=True)

    def loss(lora, base, x, rest, proj):
        out = f(base, lora, x, *rest)
        return jnp.sum(out.astype(jnp.float32) * proj), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2) if _float_input(args) else 0,
                                      has_aux=True))


@functools.cache
def ref_grad(style):
    """The reference: the same loss through fn(merge(base, lora), ...), run in float64."""
    fn, _, args = built(style)

    def loss(lora, base, x, rest, proj):
        out = fn(lora_jax.merge(base, lora), x, *rest)
        return jnp.sum(out * proj), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2) if _float_input(args) else 0,
                                      has_aux=True))


def check_against_merged(style, base, lora, dense_base=None, gtol=1e-4):
    """apply(strict=True) values and gradients (LoRA, and a float input) == float64 merged."""
    fn, _, (x, *rest) = built(style)
    dense_base = base if dense_base is None else dense_base
    proj = _proj(jax.eval_shape(fn, dense_base, x, *rest).shape)
    (_, out), g = fast_grad(style)(lora, base, x, tuple(rest), proj)
    with jax.enable_x64(True):
        (_, out_ref), g_ref = ref_grad(style)(f64(lora), f64(dense_base), f64(x),
                                              tuple(rest), f64(proj))
    assert max_rel_err(out, out_ref) < 1e-5, "values"
    g, g_ref = (g, g_ref) if _float_input((x,)) else ((g,), (g_ref,))
    assert jax.tree.structure(g[0]) == jax.tree.structure(lora)
    assert max_rel_err(g[0], g_ref[0]) < gtol, "grad wrt LoRA factors"
    if len(g) == 2:
        assert max_rel_err(g[1], g_ref[1]) < gtol, "grad wrt the input"
    return out


# ----------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("style", STYLES)
def test_trace_finds_every_projection_with_its_roles_and_the_embeddings(style):
    layouts = traced(style)
    assert isinstance(layouts, lora_jax.Layouts) and isinstance(layouts, Mapping)
    dense = {p: lay.roles for p, lay in layouts.items() if lay.kind == "dense"}
    assert dense == EXPECTED[style]
    assert {p for p, lay in layouts.items() if lay.kind == "embedding"} == EMBEDDINGS[style]
    # Vectors, biases, griffin's conv taps (indexed, multiplied) and its (2, 1, 1, F) bias are
    # float weights that no dot_general consumes: never matmul weights, whatever their rank.
    assert not any(p.endswith(("/b", "/bias", "/scale", "conv_1d/w")) for p in dense)


@pytest.mark.parametrize("style", STYLES)
def test_init_by_use_adapts_exactly_the_projections_with_standard_factors(style):
    _, params, _ = built(style)
    pflat = flat(params)
    lora = adapters(style)
    leaves = flat(lora)
    assert set(leaves) == set(EXPECTED[style])  # every projection, and no embedding
    total = 0
    for path, roles in EXPECTED[style].items():
        leaf, shape = leaves[path], tuple(pflat[path].shape)
        a_shape, b_shape, count = standard_factors(shape, roles, R)
        assert leaf.layout == roles, path
        assert leaf.kernel_shape == shape, path
        assert (leaf.a.shape, leaf.b.shape) == (a_shape, b_shape), path
        assert leaf.a.size + leaf.b.size == count, path
        assert leaf.scale == pytest.approx(2.0)
        np.testing.assert_allclose(leaf.delta(), np_delta(leaf.a, leaf.b, roles, leaf.scale),
                                   rtol=1e-5, atol=1e-6, err_msg=path)
        total += count
    assert lora_jax.param_count(lora) == total
    # merge adds the delta in the kernel's own axis order; unmerge takes it back out.
    merged = lora_jax.merge(params, lora)
    mflat = flat(merged)
    for path, roles in EXPECTED[style].items():
        leaf = leaves[path]
        want = np.asarray(pflat[path], np.float64) + np_delta(leaf.a, leaf.b, roles, leaf.scale)
        np.testing.assert_allclose(mflat[path], want, rtol=1e-5, atol=1e-5, err_msg=path)
    assert max_rel_err(lora_jax.unmerge(merged, lora), params) < 1e-5


@pytest.mark.parametrize("style,path,a_shape,b_shape", LITERAL,
                         ids=[f"{s}:{p.split('/')[-2]}" for s, p, _, _ in LITERAL])
def test_the_standard_factors_spelled_out(style, path, a_shape, b_shape):
    leaf = flat(adapters(style))[path]
    assert (leaf.a.shape, leaf.b.shape) == (a_shape, b_shape)


def test_rank_bound_is_per_stack_index_over_the_layout():
    """r <= min(prod(in), prod(out)) per stack index: checked on shapes only (eval_shape)."""
    _, params, _ = built("gemma_gqa")
    kv = lora_jax.Rule(pattern=r".*/kv_einsum/w", roles="soio")

    def init(p, r, rules=None):
        return lora_jax.init(p, r=r, key=_key(5), layouts=traced("gemma_gqa"), rules=rules)

    # By use every gemma kernel here reads 32 -> 32 or more (kv: D=32 -> 2*K*H=32), so r=32
    # fits; as separate k and v adapters (D=32 -> K*H=16) the kv bound is 16.
    jax.eval_shape(lambda p: init(p, 32), params)
    jax.eval_shape(lambda p: init(p, 16, [kv, lora_jax.Rule(pattern=".*")]), params)
    with pytest.raises(ValueError, match="kv_einsum"):
        jax.eval_shape(lambda p: init(p, 17, [kv, lora_jax.Rule(pattern=".*")]), params)
    # Griffin's block-diagonal gates: 8 -> 8 per block, although the kernel holds 4 blocks.
    _, gparams, _ = built("griffin")
    layouts = traced("griffin")
    jax.eval_shape(lambda p: lora_jax.init(p, r=8, key=_key(5), layouts=layouts), gparams)
    with pytest.raises(ValueError, match="gate/w"):
        jax.eval_shape(lambda p: lora_jax.init(p, r=9, key=_key(5), layouts=layouts), gparams)


@pytest.mark.parametrize("style", ["gemma_gqa", "griffin"])
def test_pissa_takes_the_top_r_singular_vectors_of_the_kernel_in_its_layout(style):
    _, params, _ = built(style)
    pflat = flat(params)
    lora = jax.jit(lambda p: lora_jax.init(p, r=R, key=_key(6), layouts=traced(style),
                                           init="pissa"))(params)
    for path, roles in EXPECTED[style].items():
        w = np.asarray(pflat[path], np.float64)
        s, i, o = groups(w.shape, roles)
        order = [k for g in "sio" for k in range(w.ndim) if roles[k] == g]
        m = w.transpose(order).reshape(s + (math.prod(i), math.prod(o)))
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        best = (u[..., :R] * sv[..., None, :R]) @ vt[..., :R, :]  # per stack index
        leaf = flat(lora)[path]
        got = np.asarray(leaf.delta(), np.float64).transpose(order).reshape(best.shape)
        np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-4, err_msg=path)


# ----------------------------------------------------------------------------------------
# The fast path: strict, jit, grad; values and gradients against float64 merged autodiff


@pytest.mark.parametrize("style", STYLES)
def test_strict_apply_values_and_gradients_equal_the_merged_model(style):
    fn, params, args = built(style)
    lora = adapters(style)
    rep = lora_jax.report(fn, params, lora, *args)
    assert_fast(rep, EXPECTED[style])
    assert all(p in str(rep) for p in EXPECTED[style])
    out = jax.jit(lora_jax.apply(fn, strict=True))(params, lora, *args)  # forward only
    out2 = check_against_merged(style, params, lora)  # under jit and grad
    np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_qlora_strict_equals_the_merged_dequantized_model(style):
    fn, params, args = built(style)
    qbase = quantized(style)
    qflat = flat(qbase)
    assert all(lora_jax.is_quantized(qflat[p]) for p in EXPECTED[style])
    lora = adapters(style)
    assert_fast(lora_jax.report(fn, qbase, lora, *args), EXPECTED[style])
    check_against_merged(style, qbase, lora, dense_base=lora_jax.dequantize_tree(qbase))


# ----------------------------------------------------------------------------------------
# gemma's KV-cache decode


@pytest.mark.parametrize("fmt", [None, "nf4"], ids=["dense", "nf4"])
def test_gemma_kv_cache_decode_with_lora_equals_decode_with_merged_weights(fmt):
    _, params, (tokens,) = built("gemma_gqa")
    base = params if fmt is None else quantized("gemma_gqa")
    lora = adapters("gemma_gqa")
    model = GQA_MODEL
    prompt, forced = tokens[:, :5], tokens[:, 5:]
    merged = lora_jax.merge(lora_jax.dequantize_tree(base), lora)
    _, want = gemma_style.decode(model.apply, merged, prompt, 3, config=GQA, forced=forced)
    f = lora_jax.apply(model.apply, strict=True)  # strict: any fallback in decode raises
    _, got = gemma_style.decode(lambda lo, *a: f(base, lo, *a), lora, prompt, 3, config=GQA,
                                forced=forced)
    assert max_rel_err(got, want) < 1e-5
    # One decode step as report sees it: a one-token input against a filled cache.
    cache = gemma_style.init_cache(GQA, 2, 8)
    pos = jnp.full((2, 1), 5, jnp.int32)
    mask = jnp.arange(8)[None, None, :] <= pos[:, :, None]
    rep = lora_jax.report(model.apply, base, lora, tokens[:, 5:6], pos, cache, mask)
    assert_fast(rep, EXPECTED["gemma_gqa"])


# ----------------------------------------------------------------------------------------
# A Rule that overrides a layout: the fused axis as a stack axis (PEFT's separate k_proj and
# v_proj adapters), instead of gemma's one A shared by k and v.


@pytest.mark.parametrize("style,fused", [("gemma_gqa", "kv_einsum"), ("gemma_qkv", "qkv_einsum")])
def test_rule_makes_the_fused_axis_a_stack_of_separate_adapters(style, fused):
    fn, params, args = built(style)
    path = f"params/layer_0/attn/{fused}/w"
    rules = [lora_jax.Rule(pattern=rf".*/{fused}/w", roles="soio"), lora_jax.Rule(pattern=".*")]
    lora = jax.jit(lambda p: lora_jax.init(p, r=R, alpha=2.0 * R, key=_key(2),
                                           layouts=traced(style), rules=rules))(params)
    lora = randomize_np(lora, seed=7)
    leaves = flat(lora)
    assert set(leaves) == set(EXPECTED[style])  # the catch-all rule keeps the others
    leaf, shape = leaves[path], tuple(flat(params)[path].shape)
    c, heads, d, h = shape
    assert leaf.layout == "soio"
    assert (leaf.a.shape, leaf.b.shape) == ((c, d, R), (c, R, heads, h))
    assert leaf.a.size + leaf.b.size == c * R * (d + heads * h)
    np.testing.assert_allclose(leaf.delta(), np_delta(leaf.a, leaf.b, "soio", leaf.scale),
                               rtol=1e-5, atol=1e-6)
    # Separate adapters: slice 1 of the delta (v in kv, k in qkv) is its own factors' product.
    d_1 = np_delta(leaf.a[1:2], leaf.b[1:2], "soio", leaf.scale)[0]
    np.testing.assert_allclose(leaf.delta()[1], d_1, rtol=1e-5, atol=1e-6)
    assert leaves["params/layer_0/attn/attn_vec_einsum/w"].layout == "iio"  # others by use
    assert_fast(lora_jax.report(fn, params, lora, *args), EXPECTED[style])
    check_against_merged(style, params, lora)


# ----------------------------------------------------------------------------------------
# AdaLoRA by use: P over the input axes, Q over the output axes, E per stack index


def test_adalora_by_use_follows_the_layouts():
    # Griffin: Dense "io", a non-canonical (2, D, F) "oio" and block-diagonal "sio" stacks (E
    # per block). One model keeps the file's run time down; LoRA covers the others above.
    style = "griffin"
    fn, params, args = built(style)
    ada = jax.jit(lambda p: lora_jax.adalora.init(p, init_r=6, target_r=4, key=_key(3),
                                                  layouts=traced(style)))(params)
    ada = randomize_np(ada, seed=11)  # E is zero at init
    leaves = flat(ada)
    pflat = flat(params)
    assert set(leaves) == set(EXPECTED[style])
    for path, roles in EXPECTED[style].items():
        a_shape, b_shape, _ = standard_factors(tuple(pflat[path].shape), roles, 6)
        a, b = leaves[path].factors()
        assert (a.shape, b.shape) == (a_shape, b_shape), path
    assert_fast(lora_jax.report(fn, params, ada, *args), EXPECTED[style])
    check_against_merged(style, params, ada)


# ----------------------------------------------------------------------------------------
# A targeted embedding: looked up as A[ids]·B, used by the tied head through its transpose


def test_targeted_tied_embedding_takes_the_gather_and_the_transposed_fast_path():
    fn, params, args = built("gemma_gqa")
    table = "params/embedder/input_embedding"
    targets = [r".*_einsum/w", r".*/linear/w", r".*/input_embedding"]
    lora = jax.jit(lambda p: lora_jax.init(p, r=R, key=_key(4), layouts=traced("gemma_gqa"),
                                           targets=targets))(params)
    lora = randomize_np(lora, seed=13)
    leaf = flat(lora)[table]
    assert (leaf.a.shape, leaf.b.shape) == ((64, R), (R, 32))  # A over the vocabulary
    rep = lora_jax.report(fn, params, lora, *args)
    assert not rep.fallbacks, str(rep)
    routes = [(u.primitive, u.route) for u in rep.weights[table].uses]
    assert routes == [("gather", "gather"), ("dot_general", "fast")], routes
    out = jax.jit(lora_jax.apply(fn, strict=True))(params, lora, *args)
    ref = jax.jit(fn)(lora_jax.merge(params, lora), *args)
    assert max_rel_err(out, ref) < 1e-5
