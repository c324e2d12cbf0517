"""``lora_jax.multi.combine`` against PEFT's ``add_weighted_adapter`` (tests/data/peft_weighted.npz)
and routed mixed batches against PEFT's ``adapter_names=`` (tests/data/peft_mixed_batch.npz)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import multi

DATA = pathlib.Path(__file__).parent / "data"
W = np.load(DATA / "peft_weighted.npz")
MB = np.load(DATA / "peft_mixed_batch.npz")


def mlp(p, x):
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    h = jax.nn.gelu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], approximate=False)
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def base_of(d):
    return {m: {"kernel": jnp.asarray(d[f"base/{m}.weight"]).T,
                "bias": jnp.asarray(d[f"base/{m}.bias"])} for m in ("fc1", "fc2", "out")}


def adapter_of(d, prefix):
    """A PEFT adapter (``lora_A`` (r, in), ``lora_B`` (out, r), ``scaling``) as a LoRA tree."""
    out = {}
    for m in ("fc1", "fc2"):
        a, b = d[f"{prefix}/{m}/lora_A"], d[f"{prefix}/{m}/lora_B"]
        r = a.shape[0]
        out[m] = {"kernel": lora_jax.LoraWeight(a=jnp.asarray(a.T), b=jnp.asarray(b.T),
                                                alpha=float(d[f"{prefix}/{m}/scaling"]) * r)}
    return out


SRC = {n: adapter_of(W, f"src/{n}") for n in "abc"}
F = jax.jit(lora_jax.apply(mlp))


def test_sources_reproduce_peft():
    for n in "abc":
        np.testing.assert_allclose(F(base_of(W), SRC[n], W["x"]), W[f"src/{n}/y"], atol=2e-5)


@pytest.mark.parametrize("method", ["linear", "cat", "ties", "magnitude_prune"])
def test_deterministic_methods_match_peft_factors(method):
    names = [str(x) for x in W[f"{method}/adapters"]]
    got = multi.combine({n: SRC[n] for n in names}, W["weights"], method, density=0.5)
    for m in ("fc1", "fc2"):
        leaf = got[m]["kernel"]
        assert leaf.scale == pytest.approx(float(W[f"{method}/{m}/scaling"]))
        np.testing.assert_allclose(leaf.a, W[f"{method}/{m}/lora_A"].T, atol=1e-6)
        np.testing.assert_allclose(leaf.b, W[f"{method}/{m}/lora_B"].T, atol=1e-6)
    np.testing.assert_allclose(F(base_of(W), got, W["x"]), W[f"{method}/y"], atol=2e-5)


def test_svd_matches_peft_product_and_output():
    got = multi.combine({n: SRC[n] for n in "ab"}, W["weights"], "svd", svd_rank=3)
    for m in ("fc1", "fc2"):
        leaf = got[m]["kernel"]
        assert leaf.r == 3
        want = W[f"svd/{m}/lora_A"].T @ W[f"svd/{m}/lora_B"].T  # (in, out) = (B·A)ᵀ
        np.testing.assert_allclose(leaf.a @ leaf.b, want, atol=1e-5)
    np.testing.assert_allclose(F(base_of(W), got, W["x"]), W["svd/y"], atol=2e-5)


def test_dare_linear_entries_are_peft_candidates():
    """PEFT's masks come from torch's RNG: each entry must be one of the values a mask can
    give, 0, ω_a·T_a/d, ω_c·T_c/d or their sum (README), and both kinds must occur."""
    d = 0.5
    got = multi.combine({n: SRC[n] for n in "ac"}, W["weights"], "dare_linear", density=d,
                        key=jax.random.key(0))
    seen = set()
    for m in ("fc1", "fc2"):
        for field, pick in (("a", 0), ("b", 1)):
            ta, tc = (SRC[n][m]["kernel"].factors()[pick] for n in "ac")
            sa, sc = (W["weights"][i] * float(SRC[n][m]["kernel"].scale)
                      for i, n in enumerate("ac"))
            wa = np.sqrt(abs(sa)) * (np.sign(sa) if field == "a" else 1)
            wc = np.sqrt(abs(sc)) * (np.sign(sc) if field == "a" else 1)
            cand = np.stack([np.zeros_like(ta), wa * ta / d, wc * tc / d,
                             (wa * ta + wc * tc) / d])
            val = np.asarray(getattr(got[m]["kernel"], field))
            err = np.abs(cand - val[None])
            assert err.min(0).max() < 1e-5
            seen |= set(np.argmin(err, 0).ravel().tolist())
        # dare_ties runs with the same key and gives finite factors of the same shapes
    assert seen == {0, 1, 2, 3}
    t = multi.combine({n: SRC[n] for n in "ac"}, W["weights"], "dare_ties", density=d,
                      key=jax.random.key(0))
    assert all(np.isfinite(t[m]["kernel"].a).all() for m in ("fc1", "fc2"))


def test_unequal_ranks_refused_like_peft():
    for method in ("linear", "ties"):
        with pytest.raises(ValueError, match="equal rank.*'fc1/kernel'"):
            multi.combine({n: SRC[n] for n in "ab"}, W["weights"], method, density=0.5)
    with pytest.raises(ValueError, match="needs key"):
        multi.combine({n: SRC[n] for n in "ac"}, W["weights"], "dare_ties", density=0.5)


def test_combine_takes_a_stack():
    s = lora_jax.stack({n: SRC[n] for n in "ab"})
    got = multi.combine(s, W["weights"], "cat")
    np.testing.assert_allclose(F(base_of(W), got, W["x"]), W["cat/y"], atol=2e-5)


def test_mixed_batch_matches_peft():
    ads = {n: adapter_of(MB, n) for n in "ab"}
    s = lora_jax.stack(ads)  # b (r=2) padded to a's r=4
    names = [str(x) for x in MB["adapter_names"]]
    for routing in multi.ROUTINGS:
        f = lora_jax.apply(mlp)
        y = jax.jit(lambda s, x, ids, routing=routing: f(base_of(MB), s, x, adapter_ids=ids,
                                                         routing=routing))(
            s, MB["x"], multi.adapter_ids(s, names))
        np.testing.assert_allclose(y, MB["y_mixed"], atol=2e-5)
    np.testing.assert_allclose(F(base_of(MB), ads["b"], MB["x"]), MB["y_b"], atol=2e-5)


def test_routed_dropout_draws_per_row_masks():
    p = base_of(MB)
    ads = [lora_jax.init(p, r=4, key=jax.random.key(i), dropout=0.5, targets=["fc1/kernel"])
           for i in range(2)]
    ads = [jax.tree.map(lambda w: w.replace(b=jnp.ones_like(w.b)), a,
                        is_leaf=lambda x: isinstance(x, lora_jax.LoraWeight)) for a in ads]
    s = lora_jax.stack(ads)
    x = jnp.tile(jnp.asarray(MB["x"][:1]), (4, 1))  # four equal rows
    f = jax.jit(lambda s, key: lora_jax.apply(mlp)(p, s, x, adapter_ids=jnp.zeros(4, jnp.int32),
                                                   lora_rng=key))
    y = f(s, jax.random.key(3))
    assert not np.allclose(y[0], y[1])  # each row its own dropout mask
    np.testing.assert_allclose(y, f(s, jax.random.key(3)))  # and the same for the same key


def test_routing_follows_traced_einsum_layouts():
    """Gemma-style kernels (input axis in the middle, several output axes; a fused kv with a
    stack axis kept free) route per example like Dense ones."""
    k = jax.random.split(jax.random.key(7), 4)
    p = {"q": {"w": jax.random.normal(k[0], (2, 8, 4))},      # BTD,NDH->BTNH   roles oio
         "kv": {"w": jax.random.normal(k[1], (2, 2, 8, 4))},  # BTD,CKDH->CBTKH roles ooio
         "o": {"w": jax.random.normal(k[2], (2, 4, 8))}}      # BTNH,NHD->BTD   roles iio

    def fn(p, x):
        q = jnp.einsum("btd,ndh->btnh", x, p["q"]["w"])
        kv = jnp.einsum("btd,ckdh->cbtkh", x, p["kv"]["w"])
        return jnp.einsum("btnh,nhd->btd", q * kv[0] + kv[1], p["o"]["w"])

    x = jax.random.normal(k[3], (3, 5, 8))
    lay = lora_jax.trace(fn, p, x)
    ads = [jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(i), w.b.shape)),
                        lora_jax.init(p, r=r, key=jax.random.key(i), layouts=lay),
                        is_leaf=lambda w: isinstance(w, lora_jax.LoraWeight))
           for i, r in enumerate((2, 3))]
    s = lora_jax.stack(ads)
    y = jax.jit(lambda s: lora_jax.apply(fn, strict=True)(p, s, x, adapter_ids=jnp.array(
        [1, -1, 0])))(s)
    for i, j in enumerate((1, None, 0)):
        want = fn(p if j is None else lora_jax.merge(p, ads[j]), x[i:i + 1])[0]
        np.testing.assert_allclose(y[i], want, atol=1e-4, rtol=1e-5)
