"""moejax.training.gradients: per-minibatch gradients of the trainer's objective, and their noise statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.config import DispatchConfig, MoEConfig, RouterConfig
from moejax.models import build_model
from moejax.training.gradients import (capture_gradients, default_groups, gradient_noise, minibatch_gradients,
                                       path_name)
from moejax.training.steps import TrainState, make_train_step

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised


def _model_and_state():
    moe = MoEConfig(num_experts=3, hidden_dim=8, router=RouterConfig(kind="threshold", k=2, threshold=0.3),
                    dispatch=DispatchConfig(mode="capacity", capacity_factor=None))
    model = build_model({"kind": "mlp", "d_model": 8, "layers": [moe], "residual": True, "norm": "layernorm"},
                        num_classes=4, input_shape=(5,))
    x = jnp.zeros((6, 5))
    params = nn.unbox(model.init(jax.random.key(0), x, deterministic=True)["params"])
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=None, moe_state={},
                       rng=jax.random.key_data(jax.random.key(2)))
    return model, state


def _batch(seed):
    rng = np.random.RandomState(seed)
    return {"inputs": rng.randn(6, 5).astype(np.float32), "labels": rng.randint(0, 4, 6).astype(np.int32)}


def test_minibatch_gradients_equal_an_sgd_steps_update():
    """The captured gradient is what the trainer's step applies: an SGD(lr=1) step moves params by -g."""
    model, state = _model_and_state()
    batches = [_batch(0), _batch(1)]
    grads, metrics = minibatch_gradients(model, "classification", state, batches)
    sgd = optax.sgd(1.0)
    step = jax.jit(make_train_step(model, sgd, "classification"))
    for g, m, b in zip(grads, metrics, batches):
        batch = {k: jnp.asarray(v) for k, v in b.items()}
        new, ref_metrics = step(state.replace(opt_state=sgd.init(state.params)), batch)
        moved = jax.tree_util.tree_map(lambda a, c: a - c, state.params, new.params)
        for x, y in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(g)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
        assert float(m["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
        assert 1.0 <= float(m["experts_per_token"][0]) <= 2.0
    assert not np.allclose(np.asarray(grads[0]["head"]["kernel"]), np.asarray(grads[1]["head"]["kernel"]))


def test_capture_gradients_keeps_parameters():
    tx = capture_gradients()
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.asarray([1.0, 2.0, 3.0])}, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    np.testing.assert_array_equal(np.asarray(state["w"]), [1.0, 2.0, 3.0])


def test_gradient_noise_hand_computed():
    # Two groups; router gradients (1, 0) and (3, 0): mean (2, 0), ||g_i - mean||^2 = 1 each.
    grads = [{"layer_0": {"router": {"kernel": jnp.asarray([1.0, 0.0])}, "experts": {"w_in": jnp.asarray([2.0])}}},
             {"layer_0": {"router": {"kernel": jnp.asarray([3.0, 0.0])}, "experts": {"w_in": jnp.asarray([2.0])}}}]
    out = gradient_noise(grads)
    assert out["router"]["mean_sq_norm"] == pytest.approx(4.0)
    assert out["router"]["trace"] == pytest.approx(2.0)      # (1 + 1) / (N - 1)
    assert out["router"]["noise"] == pytest.approx(0.25)     # mean(1, 1) / 4
    assert out["experts"]["noise"] == 0.0 and out["experts"]["num_params"] == 1
    assert out["all"]["mean_sq_norm"] == pytest.approx(8.0) and out["all"]["noise"] == pytest.approx(1.0 / 8.0)
    assert out["all"]["num_params"] == 3
    with pytest.raises(ValueError, match="^grads"):
        gradient_noise(grads[:1])


def test_default_groups_by_path():
    tree = {"layer_1": {"router": {"kernel": 0}, "experts": {"w_out": 0}}, "head": {"kernel": 0}}
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert sorted(map(default_groups, names)) == ["experts", "other", "router"]
    assert "layer_1/router/kernel" in names
