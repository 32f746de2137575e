"""Routing mechanisms wired into the models and the trainer (docs/routing_mechanisms.md): a model-level ``moe_k``
(SMoE-Dropout's inference-time k), the trainer's k schedule with one jitted step per k, ``eval_moe_k`` and
``evaluate_at_k``, THOR's two-pass consistency objective and the router-entropy ("dynamic") loss of top-p."""
import dataclasses
from typing import ClassVar
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moejax import DispatchConfig, MoEConfig, RouterConfig, reference
from moejax.models import build_model
from moejax.models.config import LMConfig, MLPConfig, ViTConfig
from moejax.routing import consistency_loss, smoe_dropout_k
from moejax.training import Checkpointer, loop, train_and_evaluate
from moejax.training.config import digits_mlp_config, train_settings
from moejax.training.objectives.consistency import Consistency
from moejax.training.steps import TrainState, make_train_step, pass_rngs, token_losses

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised

E, D = 4, 8


def spec(**router) -> MoEConfig:
    return MoEConfig(num_experts=E, hidden_dim=8, router=RouterConfig(**{"k": 1, **router}),
                     dispatch=DispatchConfig(mode="dropless"))


def init(model, x, seed=1):
    return nn.unbox(jax.jit(model.init)(jax.random.key(seed), x))


def forward(model, variables, x, **kw):
    return jax.jit(lambda v, xx: model.apply(v, xx, **kw))(variables, x)


# ------------------------------------------------------------------------------------- model-level k


def test_mlp_moe_k_of_all_experts_is_the_dense_mixture_and_k1_differs():
    model = build_model(MLPConfig(num_classes=3, d_model=D, layers=(spec(frozen=True),)))
    x = jax.random.normal(jax.random.key(0), (6, 5))
    variables = init(model, x)
    run = jax.jit(lambda v, xx, k: model.apply(v, xx, moe_k=k, capture_intermediates=True,
                                               mutable=["intermediates"]), static_argnums=2)
    (logits_e, stats_e), inter = run(variables, x, E)
    h = inter["intermediates"]["layer_0_norm"]["__call__"][0]
    y = inter["intermediates"]["layer_0"]["__call__"][0].y
    kernel = variables["moe_state"]["layer_0"]["router"]["kernel"]      # frozen: not a param
    want = reference.dense_mixture(h, jax.nn.softmax(h @ kernel, axis=-1), variables["params"]["layer_0"]["experts"],
                                   kind="mlp", activation="gelu")
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    assert float(stats_e[0].experts_per_token) == E
    (logits_1, stats_1), _ = run(variables, x, 1)
    (logits_default, _), _ = run(variables, x, None)
    np.testing.assert_array_equal(logits_1, logits_default)            # router.k is 1
    assert float(stats_1[0].experts_per_token) == 1
    assert np.abs(np.asarray(logits_1) - np.asarray(logits_e)).max() > 1e-3
    (logits_big, _), _ = run(variables, x, 100)                        # clipped to num_experts
    np.testing.assert_array_equal(logits_big, logits_e)


def test_moe_k_errors_name_the_argument():
    x = jnp.ones((4, 5))
    models = [build_model(MLPConfig(num_classes=3, d_model=D, layers=(spec(),))),
              build_model(LMConfig(vocab_size=11, d_model=D, num_layers=1, num_heads=2, moe=spec())),
              build_model(ViTConfig(num_classes=3, image_size=4, patch_size=2, channels=1, d_model=D, num_layers=1,
                                    num_heads=2, moe=spec()))]
    inputs = [x, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4, 4, 1))]
    for model, inp in zip(models, inputs):
        for moe_k in (0, -1, True, 1.5):
            # raised on entry, before any parameter is created or anything is traced
            with pytest.raises(ValueError, match=r"^moe_k="):
                model.init(jax.random.key(0), inp, moe_k=moe_k)


def test_transformer_and_vit_thread_moe_k_to_every_routed_layer():
    moe = spec(k=1)
    lm = build_model(LMConfig(vocab_size=11, d_model=D, num_layers=2, num_heads=2, moe=moe))
    lm_all = build_model(LMConfig(vocab_size=11, d_model=D, num_layers=2, num_heads=2,
                                  moe=dataclasses.replace(moe, router=RouterConfig(k=E))))
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
    variables = init(lm, tokens)
    logits, stats = forward(lm, variables, tokens, moe_k=E)
    assert logits.shape == (2, 5, 11) and [float(s.experts_per_token) for s in stats] == [E, E]
    np.testing.assert_array_equal(logits, forward(lm_all, variables, tokens)[0])   # same as router.k = E
    chain = dataclasses.replace(moe, layer="chain", chain_iterations=2)
    vit = build_model(ViTConfig(num_classes=3, image_size=4, patch_size=2, channels=1, d_model=D, num_layers=2,
                                num_heads=2, moe=chain, moe_every=2))
    images = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    variables = init(vit, images)
    logits, stats = forward(vit, variables, images, moe_k=2)
    assert logits.shape == (2, 3)
    # block 0 is dense; the chain layer of block 1 routes 2 experts in each of its 2 iterations
    assert float(stats[1].experts_per_token) == 2 * 2


# -------------------------------------------------------------------------------- train step objectives


def _state(model, tx, x):
    variables = dict(init(model, x))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), moe_state=variables,
                      rng=jax.random.key_data(jax.random.key(7)))


def _batch(n=16, features=5, classes=3):
    x = jax.random.normal(jax.random.key(3), (n, features))
    return {"inputs": x, "labels": jax.random.randint(jax.random.key(4), (n,), 0, classes)}


def test_thor_objective_is_both_cross_entropies_plus_weighted_consistency():
    model = build_model(MLPConfig(num_classes=3, d_model=D, layers=(spec(kind="random", load_balance_weight=0.0,
                                                                         z_loss_weight=0.0),)))
    tx = optax.sgd(0.1)
    batch = _batch()
    state = _state(model, tx, batch["inputs"])
    alpha = 0.7
    _, metrics = jax.jit(make_train_step(model, tx, "classification", objective=Consistency(alpha)))(state, batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    run = jax.jit(lambda params, rngs: model.apply({"params": params}, batch["inputs"], deterministic=False,
                                                   rngs=rngs)[0])
    outs = [run(state.params, pass_rngs(rng, i)) for i in (0, 1)]
    ces = [token_losses(o, batch["labels"])[0].mean() for o in outs]
    cr = consistency_loss(outs[0], outs[1])
    assert float(cr) > 1e-4                          # two random routings really differ
    np.testing.assert_allclose(metrics["consistency"], cr, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ces[0] + ces[1] + alpha * cr, rtol=1e-5)   # summed, not averaged
    np.testing.assert_allclose(metrics["ce"], (ces[0] + ces[1]) / 2, rtol=1e-5)
    # Without the regulariser: one pass, with the RNGs of pass 0.
    _, single = jax.jit(make_train_step(model, tx, "classification"))(state, batch)
    assert "consistency" not in single
    np.testing.assert_allclose(single["loss"], ces[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"^train\.consistency_weight=-1\.0: must be a finite number >= 0"):
        Consistency(-1.0)


def test_router_entropy_loss_adds_weight_times_the_summed_entropy_and_changes_the_update():
    w = 0.5

    def model_with(weight):
        layer = spec(kind="top_p", top_p=0.5, k=E, load_balance_weight=0.0, z_loss_weight=0.0,
                     router_entropy_weight=weight)
        return build_model(MLPConfig(num_classes=3, d_model=D, layers=(layer, layer)))

    tx = optax.sgd(1.0)
    batch = _batch()
    state = _state(model_with(0.0), tx, batch["inputs"])
    new_0, m0 = jax.jit(make_train_step(model_with(0.0), tx, "classification"))(state, batch)
    new_w, mw = jax.jit(make_train_step(model_with(w), tx, "classification"))(state, batch)
    entropy = sum(float(e) for e in mw["router_entropy"])
    assert "loss/router_entropy" not in m0 and not any(k.startswith("loss/") for k in m0)
    assert entropy > 0 and float(mw["loss/router_entropy"]) == pytest.approx(w * entropy, rel=1e-6)
    np.testing.assert_allclose(mw["loss"] - m0["loss"], w * entropy, rtol=1e-5)
    k0 = new_0.params["layer_0"]["router"]["kernel"]
    kw = new_w.params["layer_0"]["router"]["kernel"]
    assert np.abs(np.asarray(k0) - np.asarray(kw)).max() > 1e-6     # the loss has a gradient on the router


# ------------------------------------------------------------------------------------ trainer: k schedule


def test_train_settings_validate_the_mechanism_fields():
    def settings(**train):
        cfg = digits_mlp_config([{"num_experts": E, "hidden_dim": 8}], steps=4)
        cfg.train.update(train)
        return train_settings(cfg)

    assert settings()["moe_k_start"] is None and settings()["consistency_weight"] == 0.0
    for train, message in [({"moe_k_start": 1}, r"^train\.moe_k_end: the k schedule needs both"),
                           ({"moe_k_end": 2}, r"^train\.moe_k_start: the k schedule needs both"),
                           ({"moe_k_start": 3, "moe_k_end": 2}, r"^train\.moe_k_end=2: must be >= "),
                           ({"moe_k_start": 0, "moe_k_end": 2}, r"^train\.moe_k_start=0"),
                           ({"eval_moe_k": 0}, r"^train\.eval_moe_k=0"),
                           ({"consistency_weight": -0.1}, r"^train\.consistency_weight=-0\.1"),
                           ({"router_entropy_weight": -1.0}, r"^train\.router_entropy_weight=-1\.0")]:
        with pytest.raises(ValueError, match=message):
            settings(**train)


def smoe_config(data_dir: str) -> ml_collections.ConfigDict:
    layer = {"num_experts": E, "hidden_dim": 8, "router": {"k": 1, "frozen": True, "renormalize": True},
             "dispatch": {"mode": "dropless"}}
    cfg = digits_mlp_config([layer], steps=4)
    cfg.data.data_dir = data_dir
    cfg.data.eval_batch_size = 64
    cfg.model.d_model = 16
    cfg.optimizer.schedule = "constant"
    cfg.train.update({"moe_k_start": 1, "moe_k_end": 2, "eval_moe_k": 2, "log_every": 1, "eval_every": 1000,
                      "checkpoint_every": 2, "keep_checkpoints": 3, "eval_steps": 1, "tensorboard": False,
                      "async_checkpoints": False})
    return cfg


def _params(workdir):
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return [np.asarray(x) for x in jax.tree_util.tree_leaves(ckpt.restore_raw()["params"])]
    finally:
        ckpt.close()


def test_k_schedule_jits_once_per_k_resumes_exactly_and_evaluates_at_any_k(tmp_path, data_dir, monkeypatch):
    built = []
    real_make = loop.make_train_step

    def counting(*args, **kwargs):
        built.append(kwargs.get("moe_k"))
        return real_make(*args, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", counting)
    straight = train_and_evaluate(smoe_config(data_dir), tmp_path / "straight")
    assert built == [1, 2]                               # steps 0-3 use k = 1, 1, 2, 2: two compilations
    train = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    ks = [r["moe_k"] for r in train if r["split"] == "train"]
    assert ks == [smoe_dropout_k(s, 4, 1, 2) for s in range(4)] == [1, 1, 2, 2]

    # Resume from the step-2 checkpoint (as after a crash at step 3): it restarts at k = 2 and ends identical.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    ckpt = Checkpointer(tmp_path / "resumed", async_save=False)
    assert ckpt.steps() == [2, 4]
    ckpt.close()
    shutil.rmtree(ckpt.directory / "4")
    built.clear()
    resumed = train_and_evaluate(smoe_config(data_dir), tmp_path / "resumed")
    assert built == [2]
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed["loss"] == straight["loss"]

    # Inference-k sweep over the checkpoint: k = 2 is the run's own final evaluation (train.eval_moe_k = 2).
    sweep = loop.evaluate_at_k(smoe_config(data_dir), tmp_path / "straight", [1, 2, E])
    assert sweep[2]["loss"] == pytest.approx(straight["loss"], rel=1e-6)
    assert sweep[2]["step"] == 4 and sweep[E]["moe_k"] == E
    assert len({round(sweep[k]["loss"], 6) for k in (1, 2, E)}) == 3
    with pytest.raises(ValueError, match=r"^ks: 0 "):
        loop.evaluate_at_k(smoe_config(data_dir), tmp_path / "straight", [0])
    with pytest.raises(FileNotFoundError, match="^workdir: no checkpoint"):
        loop.evaluate_at_k(smoe_config(data_dir), tmp_path / "empty", [1])


def test_objectives_and_k_schedules_are_plugins_chosen_by_their_fields():
    from moejax.training.plugin import OBJECTIVES, Objective, register_objective

    @register_objective
    @dataclasses.dataclass(frozen=True)
    class Scaled(Objective):          # a paper's objective, from outside the library: a scaled single-pass loss
        name: ClassVar[str] = "scaled_test_objective"
        scaled_factor: float = 1.0

        def is_identity(self) -> bool:
            return self.scaled_factor == 1.0

        def combine(self, runs):
            return self.scaled_factor * runs[0].loss, {"scaled_factor": jnp.float32(self.scaled_factor)}

    try:
        _check_scaled_objective(Scaled)
    finally:
        OBJECTIVES.remove(Scaled.name)        # other tests' train sections must not grow its field


def _check_scaled_objective(Scaled) -> None:
    cfg = digits_mlp_config([{"num_experts": E, "hidden_dim": 8}], steps=4)
    s = train_settings(cfg)
    assert s["objective"].name == "standard" and s["k_schedule"] is None
    cfg.train.update({"scaled_factor": 3.0, "moe_k_start": 1, "moe_k_end": 2})
    s = train_settings(cfg)
    assert s["objective"] == Scaled(3.0) and s["k_schedule"].name == "smoe_dropout"
    cfg.train.consistency_weight = 0.5
    with pytest.raises(ValueError, match=r"^train: the fields of training objectives \['consistency', "
                                         r"'scaled_test_objective'\] are all set; choose one"):
        train_settings(cfg)
    model = build_model(MLPConfig(num_classes=3, d_model=D, layers=(spec(),)))
    tx = optax.sgd(0.1)
    batch = _batch()
    state = _state(model, tx, batch["inputs"])
    _, plain = jax.jit(make_train_step(model, tx, "classification"))(state, batch)
    _, scaled = jax.jit(make_train_step(model, tx, "classification", objective=Scaled(3.0)))(state, batch)
    np.testing.assert_allclose(scaled["loss"], 3.0 * plain["loss"], rtol=1e-6)
