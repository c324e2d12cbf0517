"""Bad input to stacks of adapters: ids that name no slot, one id per row, names that collide,
mixed dtypes, combine weights and per-slot learning rates. Each case raises a clear error, and
ids that cannot be checked (traced under jit) never reach another adapter: those rows get the
base alone, compared row by row with the model on the base and on each adapter's merged
weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import multi
from lora_jax.leaves import is_lowrank
from lora_jax.leaves import leaves as leaf_map

RNG = np.random.default_rng(21)
PARAMS = {"up": {"kernel": jnp.asarray(RNG.standard_normal((6, 8)), jnp.float32)},
          "down": {"kernel": jnp.asarray(RNG.standard_normal((8, 5)), jnp.float32)}}


def mlp(p, x):
    return jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


def adapter(r, seed, dtype=jnp.float32):
    """A LoRA tree with fresh non-zero A and B (NumPy draws, cast to ``dtype``)."""
    lora = lora_jax.init(PARAMS, r=r, alpha=2.0 * r, key=jax.random.key(seed))
    draw = np.random.default_rng(seed)
    return jax.tree.map(lambda w: w.replace(
        a=jnp.asarray(draw.standard_normal(w.a.shape), dtype),
        b=jnp.asarray(0.5 * draw.standard_normal(w.b.shape), dtype)), lora, is_leaf=is_lowrank)


ADS = {"x": adapter(2, 1), "y": adapter(3, 2), "z": adapter(1, 3)}
STACK = lora_jax.stack(ADS)
F = lora_jax.apply(mlp)


def rows(n, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, 6)), jnp.float32)


def merged64(lora):
    """``{name: W0 + scale·A·B}`` in float64, from the adapter's own factors."""
    out = {k: np.asarray(PARAMS[k]["kernel"], np.float64) for k in PARAMS}
    for path, leaf in leaf_map(lora).items():
        a, b = (np.asarray(f, np.float64) for f in (leaf.a, leaf.b))
        out[path.split("/")[0]] = out[path.split("/")[0]] + float(leaf.scale) * a @ b
    return out


def expected(ads, ids, x):
    """Row ``i``: the model on adapter ``ids[i]``'s merged weights (float64), or on the base
    alone where ``ids[i]`` names no adapter of ``ads`` (a list, in slot order)."""
    out = []
    for i, row in zip(ids, np.asarray(x, np.float64)):
        w = merged64({} if not 0 <= i < len(ads) else ads[i])
        out.append(np.tanh(row @ w["up"]) @ w["down"])
    return np.stack(out)


# --- concrete ids -----------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[0, 1, 5], [0, 1, 3], [0, 1, -2]])
def test_list_ids_outside_the_stack_raise_naming_id_row_and_k(ids):
    with pytest.raises(IndexError, match=re.escape(f"[{ids[2]}] (at rows [2])") + ".*K=3"):
        F(PARAMS, STACK, rows(3, 0), adapter_ids=ids)


@pytest.mark.parametrize("make", [np.array, jnp.array], ids=["numpy", "jax"])
def test_array_ids_are_range_checked(make):
    two = lora_jax.stack({"x": ADS["x"], "y": ADS["y"]})
    with pytest.raises(IndexError, match=re.escape("[7] (at rows [1])") + ".*K=2.*'x', 'y'"):
        F(PARAMS, two, rows(2, 1), adapter_ids=make([1, 7]))
    with pytest.raises(IndexError, match=re.escape("[-3] (at rows [0])")):
        multi.adapter_ids(two, make([-3, 0]))
    # uint64 ids above int32 are refused before the cast, not wrapped round to a slot
    with pytest.raises(IndexError, match=re.escape(f"[{2**32}]")):
        multi.adapter_ids(two, np.array([0, 2**32], np.uint64))


def test_non_integer_ids_are_refused_naming_the_dtype():
    x = rows(2, 2)
    with pytest.raises(TypeError, match="row 0 is 0.7 of type float"):
        F(PARAMS, STACK, x, adapter_ids=[0.7, 1.2])
    with pytest.raises(TypeError, match=r"float32\[2\]"):
        F(PARAMS, STACK, x, adapter_ids=jnp.array([0.7, 1.2]))
    with pytest.raises(TypeError, match="row 1 is True of type bool"):
        F(PARAMS, STACK, x, adapter_ids=[0, True])
    with pytest.raises(TypeError, match=r"bool\[2\]"):
        F(PARAMS, STACK, x, adapter_ids=np.array([False, True]))
    with pytest.raises(TypeError, match=r"float32\[2\]"):  # traced: the dtype is still known
        jax.jit(lambda i: F(PARAMS, STACK, x, adapter_ids=i))(jnp.array([0.0, 1.0]))


def test_unknown_names_raise_listing_the_stack():
    with pytest.raises(KeyError, match=r"no adapter 'q' \(rows \[1, 3\].*'x', 'y', 'z'"):
        F(PARAMS, STACK, rows(4, 3), adapter_ids=["x", "q", "__base__", "q"])
    # names as a NumPy string array are looked up the same way
    ids = multi.adapter_ids(STACK, np.array(["z", "__base__", "x"]))
    assert ids.tolist() == [2, -1, 0]


@pytest.mark.parametrize("single", [0, "x", np.int64(0), jnp.array(0)],
                         ids=["int", "name", "numpy", "jax"])
def test_a_single_id_is_refused_not_iterated(single):
    one = lora_jax.stack({"x": ADS["x"]})
    with pytest.raises(TypeError, match="one id per row|single id"):
        F(PARAMS, one, rows(2, 4), adapter_ids=single)


def test_id_count_must_match_the_batch():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6)), jnp.float32)
    wide = lambda p, x: mlp(p, x[:, :6])  # noqa: E731  (8 features, 6 used)
    x8 = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r"8 adapter_ids, but argument .* of shape \(2, 8\) "
                                         r"has 2 rows on its leading axis"):
        lora_jax.apply(wide)(PARAMS, STACK, x8, adapter_ids=[0] * 8)
    with pytest.raises(ValueError, match=r"no argument has a leading axis of size 3"):
        F(PARAMS, STACK, x, adapter_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"shape \(2, 6\) \(size: 2\), but there are 3 "
                                         "adapter_ids"):
        F(PARAMS, STACK, x, adapter_ids=[0, 1, 2], batch_axes=((0,), {}))


# --- traced ids: out-of-range rows get the base alone ---------------------------------

@pytest.mark.parametrize("mode", ["fast", "merged"])
@pytest.mark.parametrize("routing", multi.ROUTINGS)
def test_traced_out_of_range_ids_give_the_base_alone(routing, mode):
    ids = jnp.array([0, 3, 1, -2, 2, 9, -1], jnp.int32)  # K = 3
    x = rows(7, 7)
    f = jax.jit(lambda s, x, i: lora_jax.apply(mlp, mode=mode)(PARAMS, s, x, adapter_ids=i,
                                                               routing=routing))
    y = f(STACK, x, ids)
    want = expected(list(ADS.values()), ids.tolist(), x)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("routing", multi.ROUTINGS)
def test_traced_ids_after_remove_and_add_change_k(routing):
    f = jax.jit(lambda s, x, i: F(PARAMS, s, x, adapter_ids=i, routing=routing))
    x = rows(4, 8)
    ids = jnp.array([0, 1, 2, -1], jnp.int32)
    small = multi.remove(STACK, "y")  # K = 2: x, z; id 2 was "z", now names no slot
    np.testing.assert_allclose(f(small, x, ids), expected([ADS["x"], ADS["z"]], ids.tolist(), x),
                               atol=2e-5, rtol=2e-5)
    grown = multi.add(small, "w", adapter(2, 4))  # K = 3 again: id 2 is "w"
    np.testing.assert_allclose(
        f(grown, x, ids), expected([ADS["x"], ADS["z"], adapter(2, 4)], ids.tolist(), x),
        atol=2e-5, rtol=2e-5)


def test_traced_out_of_range_id_gives_no_gradient_to_any_adapter():
    loss = lambda s, i: jnp.sum(F(PARAMS, s, rows(2, 9), adapter_ids=i) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(STACK, jnp.array([5, -4], jnp.int32))  # ids traced
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf))


# --- generate -----------------------------------------------------------------------------

def test_generate_checks_ids_before_its_loop():
    from lora_jax.models import llama as L
    from lora_jax.multi.generate import generate

    model = L.Llama(L.LlamaConfig(vocab=16, d=8, layers=1, heads=2, kv_heads=1, ffn=16,
                                  max_len=8))
    v = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    s = lora_jax.stack({"a": lora_jax.init(v, r=1, key=jax.random.key(1)),
                        "b": lora_jax.init(v, r=2, key=jax.random.key(2))})
    tok = jnp.asarray(np.random.default_rng(10).integers(0, 16, (2, 3)), jnp.int32)
    with pytest.raises(IndexError, match=re.escape("[7] (at rows [1])") + ".*K=2"):
        generate(model, v, s, tok, 2, adapter_ids=jnp.array([1, 7]))
    with pytest.raises(TypeError, match="float"):
        generate(model, v, s, tok, 2, adapter_ids=[0.7, 1.2])
    with pytest.raises(ValueError, match=r"3 adapter_ids for 2 rows of tokens \(2, 3\)"):
        generate(model, v, s, tok, 2, adapter_ids=["a", "b", "a"])
    with pytest.raises(TypeError, match="one id per row"):
        generate(model, v, s, tok, 2, adapter_ids="a")


# --- stacks -------------------------------------------------------------------------------

def test_stack_names_must_differ_as_strings():
    with pytest.raises(ValueError, match=r"names 1 and '1' are both '1'"):
        lora_jax.stack({1: ADS["x"], "1": ADS["y"]})
    ints = lora_jax.stack([ADS["x"], ADS["y"]])  # names "0", "1"
    with pytest.raises(ValueError, match="add: the stack already has '1'"):
        multi.add(ints, 1, ADS["z"])


def test_f32_adapter_after_bf16_one_keeps_its_values():
    low = adapter(2, 11, jnp.bfloat16)
    full = adapter(3, 12, jnp.float32)
    s = lora_jax.stack({"low": low, "full": full})
    assert all(leaf.a.dtype == jnp.float32 for leaf in jax.tree.leaves(s, is_leaf=is_lowrank))
    x = rows(3, 13)
    for routing in multi.ROUTINGS:
        y = F(PARAMS, s, x, adapter_ids=["full", "low", "full"], routing=routing)
        want = expected([low, full], [1, 0, 1], x)
        np.testing.assert_allclose(y, want, atol=1e-6, rtol=1e-6)


def test_replace_refuses_rounding_and_add_promotes():
    low = lora_jax.stack({"a": adapter(2, 14, jnp.bfloat16), "b": adapter(2, 15, jnp.bfloat16)})
    full = adapter(2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"replace: 'b'.* float32, which the stack's bfloat16"):
        multi.replace(low, "b", full)
    grown = multi.add(low, "c", full)
    x = rows(2, 17)
    np.testing.assert_allclose(F(PARAMS, grown, x, adapter_ids=["c", "c"]),
                               expected([full], [0, 0], x), atol=1e-6, rtol=1e-6)


def test_multi_load_of_a_single_adapter_says_so(tmp_path):
    from lora_jax import checkpoint

    checkpoint.save_adapter(tmp_path / "one", ADS["x"])
    with pytest.raises(ValueError, match="holds a single adapter, not a stack.*load_adapter"):
        multi.load(tmp_path / "one")


# --- combine and per-slot optimizers ------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_combine_refuses_non_finite_weights(bad):
    with pytest.raises(ValueError, match=f"weight of adapter 'y' is {bad}"):
        multi.combine(ADS, [0.5, bad, 0.2], "cat")


def test_combine_refuses_bad_counts_ranks_and_densities():
    with pytest.raises(ValueError, match=r"2 weights for 3 adapters \['x', 'y', 'z'\]"):
        multi.combine(ADS, [0.5, 0.5], "svd")
    with pytest.raises(TypeError, match="weight of adapter 'x' is 'a', not a number"):
        multi.combine(ADS, ["a", 0.5, 0.5], "svd")
    for rank in (0, -2):
        with pytest.raises(ValueError, match=f"svd_rank must be a positive int, got {rank}"):
            multi.combine(ADS, [0.5, 0.3, 0.2], "svd", svd_rank=rank)
    for rank in (2.0, True):
        with pytest.raises(TypeError, match="svd_rank must be a positive int"):
            multi.combine(ADS, [0.5, 0.3, 0.2], "svd", svd_rank=rank)  # type: ignore[arg-type]
    same = {n: adapter(2, i) for i, n in enumerate("pq")}
    for density in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density must be in"):
            multi.combine(same, [0.5, 0.5], "ties", density=density)


def test_per_slot_rates_must_match_the_stack():
    two = lora_jax.stack({"x": ADS["x"], "y": ADS["y"]})
    with pytest.raises(ValueError, match=r"3 learning rates for a stack of K=2 adapters"):
        multi.adam(jnp.array([1e-3, 1e-2, 1e-1])).init(two)
    tx = multi.scale_by_slot(jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"3 factors for a stack of K=2"):
        tx.update(two, tx.init({}))
    with pytest.raises(ValueError, match=r"finite and >= 0; slots \[1\] have \[-0.01\]"):
        multi.adam([1e-3, -1e-2])
    with pytest.raises(ValueError, match=r"finite; slots \[0\] have \[nan\]"):
        multi.scale_by_slot([float("nan"), 1.0])
    with pytest.raises(TypeError, match=r"one number per slot.*float32\[\]"):
        multi.adam(jnp.float32(1e-3))
    # the right count still trains each slot with its own rate
    tx = multi.adam(jnp.array([0.0, 1e-2]))
    grads = jax.tree.map(jnp.ones_like, two)
    updates, _ = tx.update(grads, tx.init(two), two)
    new = optax.apply_updates(two, updates)
    leaf_old = jax.tree.leaves(two, is_leaf=is_lowrank)[0]
    leaf_new = jax.tree.leaves(new, is_leaf=is_lowrank)[0]
    np.testing.assert_array_equal(leaf_new.a[0], leaf_old.a[0])
    assert not np.allclose(leaf_new.a[1], leaf_old.a[1])


def test_checkify_raises_on_traced_out_of_range_ids():
    from jax.experimental import checkify

    f = jax.jit(checkify.checkify(lambda s, x, i: F(PARAMS, s, x, adapter_ids=i)))
    x = rows(3, 18)
    err, _ = f(STACK, x, jnp.array([0, 1, 2], jnp.int32))
    err.throw()  # in range: no error
    err, y = f(STACK, x, jnp.array([0, 4, -1], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"\[ 0  4 -1\] has ids outside \[-1, 3\)"):
        err.throw()
    np.testing.assert_allclose(y, expected(list(ADS.values()), [0, 4, -1], x), atol=2e-5,
                               rtol=2e-5)


def test_routing_keywords_need_adapter_ids_and_a_known_routing():
    x = rows(2, 19)
    with pytest.raises(TypeError, match="batch_axes= and routing= .* need adapter_ids="):
        F(PARAMS, ADS["x"], x, routing="onehot")  # would be ignored: one adapter for all rows
    with pytest.raises(TypeError, match="need adapter_ids="):
        F(PARAMS, ADS["x"], x, batch_axes=((0,), {}))
    with pytest.raises(ValueError, match=r"routing must be one of \('gather', 'onehot', "
                                         r"'grouped'\), got 'Gather'"):
        F(PARAMS, STACK, x, adapter_ids=[0, 1], routing="Gather")


def test_wide_traced_ids_do_not_wrap_round_to_a_slot():
    with jax.enable_x64(True):
        ids = jnp.array([2**32 + 1, 1, -(2**32) + 2], jnp.int64)  # int32 casts: 1, 1, 2
        got = jax.jit(lambda i: multi.adapter_ids(STACK, i))(ids)
    assert got.tolist() == [-1, 1, -1]


def test_load_peft_of_one_adapter_folder_says_so(tmp_path):
    from lora_jax import peft

    peft.save(tmp_path / "one", ADS["x"])
    with pytest.raises(FileNotFoundError, match="is one PEFT adapter folder.*peft.load"):
        multi.load_peft(tmp_path / "one", PARAMS)


@pytest.mark.parametrize("names", [["x", "x"], ["x"], [1, 2]])
def test_stack_checkpoint_with_edited_names_is_refused(tmp_path, names):
    """A stack read from a file whose slot names were edited (duplicated, too few, not
    strings) would serve requests by the wrong names: refused where it is read."""
    import json
    import shutil

    rng = np.random.default_rng(5)
    params = {"params": {"fc": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}}}
    stack = lora_jax.stack({"x": lora_jax.init(params, r=2, key=jax.random.key(0)),
                            "y": lora_jax.init(params, r=2, key=jax.random.key(1))})
    folder = tmp_path / "stack"
    lora_jax.checkpoint.save_adapter(folder, stack)
    back = lora_jax.checkpoint.load_adapter(folder)  # unedited: loads, names kept
    assert back["params"]["fc"]["kernel"].names == ("x", "y")
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    meta = copy / "adapter" / "metadata"
    info = json.loads(meta.read_text())
    info["leaves"][0]["static"]["names"] = {"tuple": names}
    meta.write_text(json.dumps(info))
    with pytest.raises(lora_jax.checkpoint.CheckpointError,
                       match=r"'params/fc/kernel': a stack of 2 adapters needs 2 unique string "
                             r"names, got \("):
        lora_jax.checkpoint.load_adapter(copy)
