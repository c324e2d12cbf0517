"""LoftQ against PEFT 0.21.2's ``loftq_init`` with bitsandbytes' NF4 (tests/data/peft_loftq.npz,
see tests/data/README.md), and OLoRA against PEFT's ``olora_init`` written out in
float64 numpy."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import loftq

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["w64x48", "w128x256"])
def test_loftq_matches_peft(name):
    d = np.load(DATA / "peft_loftq.npz")
    w = d[f"{name}/W"]  # torch (out, in); the Flax kernel is its transpose
    params = {"kernel": jnp.asarray(w.T)}
    for n in (1, 5):
        ref = f"{name}/iter{n}"
        # alpha = r: scale 1, where PEFT's unscaled factors are the approximation
        qbase, lora = loftq.init(params, r=4, alpha=4, key=jax.random.key(0), num_iter=n)
        q = np.asarray(qbase["kernel"].dequantize()).T
        leaf = lora["kernel"]
        ba = np.asarray(leaf.delta()).T
        ref_ba = d[f"{ref}/lora_B"] @ d[f"{ref}/lora_A"]
        if n == 1:  # plain NF4 of W: bitsandbytes' values exactly
            np.testing.assert_array_equal(q, d[f"{ref}/Q"])
        else:  # the SVDs round differently in torch and XLA: absmax moves by an ulp or so
            np.testing.assert_allclose(q, d[f"{ref}/Q"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ba, ref_ba, rtol=2e-3, atol=2e-3 * np.abs(ref_ba).max())
        err = np.linalg.norm(w - (q + ba))
        np.testing.assert_allclose(np.linalg.norm(w - q), d[f"{ref}/err_q"], rtol=2e-3)
        np.testing.assert_allclose(err, d[f"{ref}/err_loftq"], rtol=2e-3)
        assert err < d[f"{ref}/err_q"]
        # the factors up to a sign per rank component (singular vectors are sign-ambiguous)
        a_ref, b_ref = d[f"{ref}/lora_A"], d[f"{ref}/lora_B"]
        sign = np.sign(np.sum(np.asarray(leaf.a).T * a_ref, axis=1))
        np.testing.assert_allclose(np.asarray(leaf.a).T * sign[:, None], a_ref, atol=2e-3)
        np.testing.assert_allclose(np.asarray(leaf.b).T * sign[None, :], b_ref, atol=2e-3)


def test_loftq_scale_and_int4_and_stacked():
    w = jax.random.normal(jax.random.key(0), (2, 64, 32))
    for fmt in ("nf4", "int4"):
        plain = lora_jax.dequantize_tree(lora_jax.quantize(
            {"kernel": w}, fmt, double_quant=False, stack_axes=1))["kernel"]
        qbase, lora = loftq.init({"kernel": w}, r=4, alpha=16, key=jax.random.key(1),
                                 num_iter=3, format=fmt, stack_axes=1)
        assert lora["kernel"].scale == 4.0
        approx = lora_jax.merge(qbase, lora)["kernel"]
        for i in range(2):  # per layer: better than the quantized layer alone
            assert jnp.linalg.norm(w[i] - approx[i]) < 0.9 * jnp.linalg.norm(w[i] - plain[i])


def _olora_peft(w_t, r, scale):
    """PEFT ``LoraLayer.olora_init`` on a torch (out, in) weight, in float64 numpy."""
    q, rr = np.linalg.qr(w_t)
    lora_b, lora_a = q[:, :r], rr[:r]
    return lora_a, lora_b, w_t - scale * lora_b @ lora_a


def test_olora_matches_peft_semantics():
    w = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)  # (in, out)
    lora = lora_jax.init({"kernel": jnp.asarray(w)}, r=4, alpha=8, key=jax.random.key(0),
                         init="olora")
    base = lora_jax.unmerge({"kernel": jnp.asarray(w)}, lora)
    lora_a, lora_b, w_res = _olora_peft(w.T.astype(np.float64), 4, 2.0)
    leaf = lora["kernel"]
    # QR is unique up to a sign per column of Q (row of R): compare up to those signs
    sign = np.sign(np.sum(np.asarray(leaf.b) * lora_b.T, axis=1))
    np.testing.assert_allclose(np.asarray(leaf.a) * sign, lora_a.T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(leaf.b) * sign[:, None], lora_b.T, atol=1e-5)
    np.testing.assert_allclose(base["kernel"], w_res.T, atol=1e-5)
    np.testing.assert_allclose(lora_jax.merge(base, lora)["kernel"], w, atol=1e-5)
