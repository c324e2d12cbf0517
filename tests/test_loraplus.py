"""LoRA+ against PEFT 0.21.2's ``create_loraplus_optimizer`` (tests/data/peft_loraplus_*: the
parameter groups, and three AdamW steps on recorded gradients)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import loraplus

DATA = pathlib.Path(__file__).parent / "data"
P = "base_model.model."
GROUP = {"groupA": "A", "groupB": "B", "groupB_no_decay": "B_no_decay", "embedding": "embedding"}


def _where():
    """PEFT name -> (path into our combined tree, transpose?)."""
    w = {}
    for m in ("fc1", "fc2"):
        w[f"{P}{m}.base_layer.bias"] = (("base", "params", m, "bias"), False)
        w[f"{P}{m}.lora_A.default.weight"] = (("lora", "params", m, "kernel", "a"), True)
        w[f"{P}{m}.lora_B.default.weight"] = (("lora", "params", m, "kernel", "b"), True)
    w[f"{P}out.weight"] = (("base", "params", "out", "kernel"), True)
    w[f"{P}out.bias"] = (("base", "params", "out", "bias"), False)
    w[f"{P}emb.lora_embedding_A.default"] = (("lora", "params", "emb", "embedding", "a"), True)
    w[f"{P}emb.lora_embedding_B.default"] = (("lora", "params", "emb", "embedding", "b"), True)
    return w


def _get(tree, path):
    for k in path:
        tree = getattr(tree, k) if not isinstance(tree, dict) else tree[k]
    return tree


def _tree(values):
    """The combined tree with PEFT's named arrays put in place (frozen leaves: random)."""
    rng = np.random.default_rng(0)
    shapes = {"emb": (20, 32), "fc1": (32, 64), "fc2": (64, 48), "out": (48, 10)}
    base = {"params": {m: ({"embedding": rng.standard_normal(s).astype(np.float32)} if m == "emb"
                           else {"kernel": rng.standard_normal(s).astype(np.float32),
                                 "bias": np.zeros(s[1], np.float32)})
                       for m, s in shapes.items()}}
    lora = lora_jax.init(base, r=4, alpha=8, key=jax.random.key(0),
                         targets=[r"params/(fc1|fc2)/kernel", r"params/emb/embedding"])
    tree = {"base": base, "lora": lora}
    flat = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    by_path = {tuple(getattr(k, "key", getattr(k, "name", None)) for k in kp): kp for kp in flat}
    new = dict(flat)
    for name, (path, t) in _where().items():
        v = values[name]
        new[by_path[path]] = jnp.asarray(v.T if t else v)
    return jax.tree_util.tree_unflatten(jax.tree.structure(tree), [new[k] for k in flat])


def test_groups_and_learning_rates_match_peft():
    ref = json.loads((DATA / "peft_loraplus_groups.json").read_text())
    tree = _tree({n: np.zeros(s["shape"][::-1] if t else s["shape"], np.float32)
                  for n, s in ref["params"].items() for t in [_where()[n][1]]})
    lab = loraplus.labels(tree, modules_to_save=r"params/out", bias="lora_only")
    lrs = {"A": 1e-3, "B": 16e-3, "B_no_decay": 16e-3, "embedding": 5e-4}
    for name, info in ref["params"].items():
        g = _get(lab, _where()[name][0])
        assert g == GROUP[info["group"]], name
        assert np.isclose(lrs[g], info["lr"]) and (info["weight_decay"] == 0.0) == (
            g == "B_no_decay"), name
    assert _get(lab, ("base", "params", "fc1", "kernel")) == "frozen"


def test_three_steps_match_peft():
    d = np.load(DATA / "peft_loraplus_steps.npz")
    names = list(d["names"])
    tree = _tree({n: d[f"init|{n}"] for n in names})
    tx = loraplus.optimizer(tree, lr=1e-3, ratio=16, weight_decay=0.1, lr_embedding=5e-4,
                            b1=0.9, b2=0.999, eps=1e-8, modules_to_save=r"params/out",
                            bias="lora_only")
    state = tx.init(tree)

    @jax.jit
    def step(tree, grads, state):
        upd, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, upd), state

    frozen = jax.tree.map(lambda x: x, tree)
    for t in range(3):
        # (the frozen leaves' "gradients" are random arrays: set_to_zero must ignore them)
        grads = _tree({n: d[f"{t}|{n}|grad"] for n in names})
        tree, state = step(tree, grads, state)
        for n in names:
            path, tr = _where()[n]
            want = d[f"{t}|{n}|after"]
            np.testing.assert_allclose(_get(tree, path), want.T if tr else want, atol=1e-6,
                                       rtol=1e-5, err_msg=f"step {t}: {n}")
    np.testing.assert_array_equal(tree["base"]["params"]["fc1"]["kernel"],
                                  frozen["base"]["params"]["fc1"]["kernel"])
