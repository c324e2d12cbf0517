"""Bad and degenerate inputs of the init schemes, DoRA and LoRA+ (issue 21, items 3-5).

Each bad input raises an error naming the argument or path and what was expected. DoRA on a
kernel with an all-zero output column (‖V‖ = 0) is compared, fast path against the merged
computation and against a float64 NumPy reference, with the column dropped for the rest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import adalora, dora, init_schemes, loraplus

K = jax.random.key


def _params(seed=0, shape=(6, 5)):
    rng = np.random.default_rng(seed)
    return {"d": {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)}}


# ---- init schemes


@pytest.mark.parametrize("bad, err, msg", [
    ("svd", ValueError, r"init: unknown init scheme 'svd'; registered: \['default'"),
    (3, TypeError, r"init: init must be a string naming an init scheme, got 3 \(int\)"),
    ("loftq", ValueError, r"init: init='loftq' builds the base .*lora_jax\.loftq\.init"),
])
def test_init_refuses_bad_scheme_names(bad, err, msg):
    with pytest.raises(err, match=msg):
        lora_jax.init(_params(), 2, key=K(0), init=bad)


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_decomposing_init_refuses_a_quantized_kernel(name):
    q = lora_jax.quantize(_params(shape=(16, 8)), "int8")
    with pytest.raises(ValueError, match=f"init={name!r} decomposes the dense kernel, but "
                                         "'d/kernel' is quantized"):
        lora_jax.init(q, 2, key=K(0), init=name)


@pytest.mark.parametrize("name", ["gaussian", "pissa", "olora", "loftq"])
def test_adalora_init_names_the_unsupported_scheme(name):
    with pytest.raises(ValueError, match=f"adalora.init: init={name!r} is not supported by "
                                         r"AdaLoRA .*supports \['default', 'zeros'\]"):
        adalora.init(_params(), 3, 2, key=K(0), init=name)


def test_register_refuses_bad_schemes():
    scheme = init_schemes.InitScheme
    with pytest.raises(TypeError, match="expected an InitScheme, got a str"):
        init_schemes.register("mine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'default' is registered already"):
        init_schemes.register(scheme("default", lambda k, s, d: (None, None)))
    with pytest.raises(ValueError, match="'mine' needs factors or a builder"):
        init_schemes.register(scheme("mine", None))
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        init_schemes.register(scheme("", lambda k, s, d: (None, None)))
    assert "mine" not in init_schemes.names()


# ---- LoRA+


def _tree():
    return lora_jax.init(_params(), 2, key=K(0))


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(ratio=0), ValueError, r"loraplus.optimizer: ratio must be a finite number > 0.*got 0"),
    (dict(ratio=-4.0), ValueError, r"ratio must be a finite number > 0.*got -4.0"),
    (dict(ratio=float("nan")), ValueError, r"loraplus.optimizer: ratio must be a finite number, "
                                           "got nan"),
    (dict(ratio=float("inf")), ValueError, r"ratio must be a finite number, got inf"),
    (dict(ratio="16"), TypeError, r"ratio must be a number, got '16' \(str\)"),
    (dict(ratio=True), TypeError, r"ratio must be a number, got the bool|ratio must be a number"),
    (dict(lr=0.0), ValueError, r"loraplus.optimizer: lr must be a finite number > 0.*got 0"),
    (dict(lr=-1e-3), ValueError, r"lr must be a finite number > 0.*got -0.001"),
    (dict(lr=float("nan")), ValueError, r"loraplus.optimizer: lr must be a finite number"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a finite number >= 0, got -0.1"),
    (dict(weight_decay=float("inf")), ValueError, r"weight_decay must be a finite number"),
    (dict(lr_embedding=-1e-6), ValueError, r"lr_embedding must be a finite number >= 0"),
])
def test_loraplus_refuses_bad_numbers(kwargs, err, msg):
    args = dict(lr=1e-3, **kwargs) if "lr" not in kwargs else kwargs
    with pytest.raises(err, match=msg):
        loraplus.optimizer(_tree(), **args)


def test_loraplus_still_takes_a_schedule_and_good_numbers():
    tree = _tree()
    tx = loraplus.optimizer(tree, lr=lambda c: 1e-3, ratio=4, weight_decay=0.0,
                            lr_embedding=0.0)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    leaf = updates["d"]["kernel"]
    # adam's first step is -lr·sign(g): B moves ratio times as far as A
    np.testing.assert_allclose(np.asarray(leaf.a), -1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(leaf.b), -4e-3, rtol=1e-4)


# ---- dora.unmerge's norms


def _dora_tree():
    base = _params(1)
    lora = lora_jax.init(base, 2, key=K(1), dora=True, init="gaussian")
    return base, lora, lora_jax.merge(base, lora), dora.norms(base, lora)


def test_dora_unmerge_names_a_norm_of_the_wrong_shape():
    _, lora, merged, norms = _dora_tree()
    with pytest.raises(ValueError, match=r"dora.unmerge: norms\['d/kernel'\] has shape \(4,\), "
                                         r"expected \(5,\)"):
        dora.unmerge(merged, lora, {"d/kernel": norms["d/kernel"][:4]})
    with pytest.raises(ValueError, match=r"norms\['d/kernel'\] has shape \(1, 5\), expected "
                                         r"\(5,\)"):
        dora.unmerge(merged, lora, {"d/kernel": norms["d/kernel"][None]})


def test_dora_unmerge_names_missing_and_extra_norms():
    _, lora, merged, norms = _dora_tree()
    with pytest.raises(ValueError, match=r"dora.unmerge: no norm for 'd/kernel'"):
        dora.unmerge(merged, lora, {})
    with pytest.raises(ValueError, match=r"dora.unmerge: norms has 'e/kernel', which is not a "
                                         "DoRA adapter"):
        dora.unmerge(merged, lora, {**norms, "e/kernel": norms["d/kernel"]})
    with pytest.raises(TypeError, match="dora.unmerge: norms must be the dict"):
        dora.unmerge(merged, lora, [norms["d/kernel"]])  # type: ignore[arg-type]


# ---- DoRA with an all-zero output column (‖V‖ = 0)

ZERO = 2  # the output unit whose kernel column and B column are zero
EPS = dora.NORM_EPS


def _zero_column_case(m_zero: float | None = None):
    """A (6, 5) kernel with column ZERO all zero, a DoRA adapter with random A and B except
    B[:, ZERO] = 0 (so V's column is zero), m from init (0 there) or ``m_zero``."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w[:, ZERO] = 0.0
    base = {"d": {"kernel": jnp.asarray(w)}}
    leaf = lora_jax.init(base, 2, key=K(2), dora=True)["d"]["kernel"]
    a = rng.standard_normal(leaf.a.shape).astype(np.float32)
    b = (0.5 * rng.standard_normal(leaf.b.shape)).astype(np.float32)
    b[:, ZERO] = 0.0
    m = np.asarray(leaf.m) * (1 + 0.3 * rng.standard_normal(5)).astype(np.float32)
    assert m[ZERO] == 0.0  # init: the magnitude of a zero column is zero
    if m_zero is not None:
        m[ZERO] = m_zero
    leaf = leaf.replace(a=jnp.asarray(a), b=jnp.asarray(b), m=jnp.asarray(m))
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    return base, {"d": {"kernel": leaf}}, x, dy


def _reference(w, a, b, m, scale, x):
    """float64: y = x·(m·V/max(‖V‖, eps)) with V = W + s·A·B."""
    v = np.asarray(w, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    norm = np.maximum(np.sqrt(np.sum(v * v, axis=0)), EPS)
    return np.asarray(x, np.float64) @ (v * (np.asarray(m, np.float64) / norm))


def _fast_and_merged(base, lora, x, dy):
    fn = lambda p, x: x @ p["d"]["kernel"]  # noqa: E731
    fast = lora_jax.apply(fn, strict=True)
    w = base["d"]["kernel"]

    def loss_fast(lora):
        return jnp.sum(fast(base, lora, x) * dy)

    def loss_merged(lora):  # the merged-weight computation: x·W'
        return jnp.sum(x @ lora["d"]["kernel"].merged(w) * dy)

    return (fast(base, lora, x), jax.grad(loss_fast)(lora),
            x @ lora["d"]["kernel"].merged(w), jax.grad(loss_merged)(lora))


def _fields(g):
    leaf = g["d"]["kernel"]
    return {"a": np.asarray(leaf.a), "b": np.asarray(leaf.b), "m": np.asarray(leaf.m)}


@pytest.mark.parametrize("m_zero", [None, 1.5])
def test_dora_zero_column_is_finite_and_the_fast_path_equals_the_merged(m_zero):
    base, lora, x, dy = _zero_column_case(m_zero)
    leaf = lora["d"]["kernel"]
    y_fast, g_fast, y_merged, g_merged = _fast_and_merged(base, lora, x, dy)
    ref = _reference(base["d"]["kernel"], leaf.a, leaf.b, leaf.m, leaf.scale, x)
    scale = np.max(np.abs(ref))
    y_merge = x @ lora_jax.merge(base, lora)["d"]["kernel"]  # lora_jax.merge's kernel
    for y in (y_fast, y_merged, y_merge):
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=2e-6 * scale)
    np.testing.assert_array_equal(np.asarray(y_fast)[:, ZERO], 0.0)
    gf, gm = _fields(g_fast), _fields(g_merged)
    for name in gf:
        assert np.all(np.isfinite(gf[name])), name
        np.testing.assert_allclose(gf[name], gm[name], rtol=1e-4,
                                   atol=1e-5 * np.max(np.abs(gm[name])), err_msg=name)


def test_dora_zero_column_leaves_the_other_columns_as_without_it():
    # The same adapter with the zero column dropped: a plain DoRA case, no norm near zero.
    base, lora, x, dy = _zero_column_case()
    keep = np.asarray([j for j in range(5) if j != ZERO])
    leaf = lora["d"]["kernel"]
    small_base = {"d": {"kernel": base["d"]["kernel"][:, keep]}}
    small = {"d": {"kernel": leaf.replace(b=leaf.b[:, keep], m=leaf.m[keep])}}
    y, g, _, _ = _fast_and_merged(base, lora, x, dy)
    y_small, g_small, _, _ = _fast_and_merged(small_base, small, x, dy[:, keep])
    np.testing.assert_allclose(np.asarray(y)[:, keep], y_small, rtol=1e-5, atol=1e-6)
    full, part = _fields(g), _fields(g_small)
    np.testing.assert_allclose(full["a"], part["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["b"][:, keep], part["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["m"][keep], part["m"], rtol=1e-5, atol=1e-6)
    # the zero unit: no update reaches it while m = 0 (it stays off), and nothing is NaN
    np.testing.assert_array_equal(full["b"][:, ZERO], 0.0)
    np.testing.assert_array_equal(full["m"][ZERO], 0.0)


def test_dora_norms_and_unmerge_with_a_zero_column():
    base, lora, _, _ = _zero_column_case()
    norms = dora.norms(base, lora)
    assert float(norms["d/kernel"][ZERO]) == 0.0
    back = dora.unmerge(lora_jax.merge(base, lora), lora, norms)
    assert np.all(np.isfinite(np.asarray(back["d"]["kernel"])))
    np.testing.assert_allclose(back["d"]["kernel"], base["d"]["kernel"], atol=1e-5)


def test_dora_unmerge_refuses_a_unit_it_cannot_recover():
    # m = 0 over a non-zero V: the merged column is zero and says nothing about V.
    base, lora, _, _ = _zero_column_case()
    leaf = lora["d"]["kernel"]
    lora = {"d": {"kernel": leaf.replace(m=leaf.m.at[0].set(0.0))}}
    with pytest.raises(ValueError, match=r"dora.unmerge: 'd/kernel' has 1 output unit\(s\) with "
                                         "magnitude m = 0 and a non-zero"):
        dora.unmerge(lora_jax.merge(base, lora), lora, dora.norms(base, lora))


def test_nnx_set_adapters_names_an_adapter_of_another_base():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(5, 4, rngs=nnx.Rngs(1)))
    lm = lora_jax.nnx.LoRA(model, 2, rngs=nnx.Rngs(2), init="pissa")
    plain = lora_jax.init(nnx.state(model, nnx.Param), 2, key=K(0))
    with pytest.raises(ValueError, match="its base is \"the model's own\", this module's "
                                         "'pissa'"):
        lm.set_adapters(plain)
