"""Meshes, sharding rules and expert parallelism on 8 simulated CPU devices (conftest sets the device count).

The expert-parallel layer (``shard_map`` + all-to-all, emulated ragged all-to-all on CPU) is checked against
``moejax.reference`` in values and gradients; one sharded train step against the single-device step.
"""
import dataclasses
import functools

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, parallel, reference
from moejax.parallel import MeshConfig, make_mesh
from moejax.routing import Router

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny shapes compile faster unoptimised

D, E, K, T = 8, 8, 2, 64
MESHES = {
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
    "expert8": dict(data=1, expert=8),
}


def layer_config(mode: str, groups: int = 8, skewed: bool = False) -> MoEConfig:
    groups = groups if mode == "capacity" else 1       # dropless has no routing groups (a count there is an error)
    return MoEConfig(num_experts=E, hidden_dim=16, router=RouterConfig(k=K, renormalize=True, selection_bias=skewed,
                                                                        bias_update_rate=0.0),
                     dispatch=DispatchConfig(mode=mode, capacity_factor=1.0, groups=groups, gmm="padded", gmm_tile=8))


def init_layer(cfg: MoEConfig, skewed: bool):
    x = jax.random.normal(jax.random.key(0), (8, T // 8, D))
    variables = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))
    state = {}
    if skewed:   # every token's first choices are experts 0 and 1: one expert device gets all the work
        state = {"moe_state": {"router": {"selection_bias": jnp.array([10.0, 10.0] + [0.0] * (E - 2))}}}
    return x, variables["params"], state


def reference_forward(cfg: MoEConfig, params, state, x):
    tokens = x.reshape(-1, D)
    g = cfg.dispatch.groups if cfg.dispatch.mode == "capacity" else 1
    router_vars = {"params": params["router"], **({"moe_state": state["moe_state"]["router"]} if state else {})}
    routing = Router(E, cfg.router).apply(router_vars, tokens)
    cap = cfg.capacity(tokens.shape[0] // g, True) if cfg.dispatch.mode == "capacity" else None

    def one_group(xg, idx, w, v, probs):   # routing groups: each with its own capacity
        r = routing.replace(expert_index=idx, weight=w, valid=v, probs=probs)
        return reference.moe(xg, r, params["experts"], kind="mlp", activation="gelu", capacity=cap)

    split = lambda a: a.reshape(g, -1, *a.shape[1:])  # noqa: E731
    y = jax.vmap(one_group)(split(tokens), split(routing.expert_index), split(routing.weight), split(routing.valid),
                            split(routing.probs))
    return y.reshape(x.shape)


@functools.lru_cache(maxsize=None)
def reference_result(mode: str, skewed: bool):
    cfg = layer_config(mode, skewed=skewed)
    x, params, state = init_layer(cfg, skewed)
    return jax.jit(functools.partial(loss_and_grads, lambda p, xx: reference_forward(cfg, p, state, xx)))(params, x)


def loss_and_grads(fn, params, x):
    cot = jax.random.normal(jax.random.key(5), x.shape)

    def loss(p, xx):
        return jnp.sum(fn(p, xx) * cot)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def assert_layer_matches_reference(cfg: MoEConfig, want, x, params, state) -> None:
    """The layer's values and gradients under the mesh in context equal ``want``, the single-device reference's
    (:func:`reference_result`, computed outside any mesh)."""
    def layer(p, xx):
        return MoELayer(cfg).apply({"params": p, **state}, xx, deterministic=False).y

    got, got_grads = jax.jit(functools.partial(loss_and_grads, layer))(params, x)
    want, want_grads = want
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=2e-5, atol=2e-5)


CASES = [(m, mode, True) for m in MESHES for mode in ("capacity", "dropless")] + \
        [("data2_expert4", mode, False) for mode in ("capacity", "dropless")]


@pytest.mark.parametrize("mesh_name,mode,skewed", CASES,
                         ids=[f"{m}-{mode}-{'skewed' if s else 'balanced'}" for m, mode, s in CASES])
def test_expert_parallel_layer_matches_reference(mesh_name, mode, skewed):
    cfg = layer_config(mode, skewed=skewed)
    x, params, state = init_layer(cfg, skewed)
    want = reference_result(mode, skewed)
    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        assert parallel.expert_mesh() is not None
        assert_layer_matches_reference(cfg, want, x, params, state)
        stats = jax.jit(lambda p, xx: MoELayer(cfg).apply({"params": p, **state}, xx, deterministic=False).stats)(
            params, x)
    if skewed and mode == "capacity":
        assert float(stats.dropped_fraction) > 0.3            # the skew really overflows the capacity
    if mode == "dropless":
        assert float(stats.dropped_fraction) == 0.0


TOKEN_MESHES = {"data8": dict(data=8), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


@pytest.mark.parametrize("mesh_name", sorted(TOKEN_MESHES))
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_token_parallel_layer_matches_reference(monkeypatch, mesh_name, mode):
    # Tokens split, experts not: each device dispatches its own tokens to all experts under shard_map (what an
    # accelerator mesh runs; on CPU XLA's own partitioning stays, so the platform is faked here). Same function,
    # values and gradients, as the reference; capacity routing groups are whole on each device.
    from moejax.dispatch import dispatchers
    from moejax.parallel import expert_parallel
    monkeypatch.setattr(expert_parallel, "current_platform", lambda platform=None: "tpu")
    cfg = layer_config(mode, skewed=True)
    x, params, state = init_layer(cfg, True)
    want = reference_result(mode, True)
    mesh = make_mesh(MeshConfig(**TOKEN_MESHES[mesh_name]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        assert parallel.expert_mesh() is None
        assert isinstance(dispatchers.from_config(cfg.dispatch, 4, cfg.dispatch.groups), expert_parallel.TokenParallel)
        assert_layer_matches_reference(cfg, want, x, params, state)


def test_emulated_ragged_all_to_all_matches_its_definition():
    n = 4
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("expert",))
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 4, size=(n, n)).astype(np.int32)          # sizes[src, dst]
    rows = 12
    operand = rng.normal(size=(n, rows, 2)).astype(np.float32)
    in_off = np.cumsum(sizes, 1) - sizes
    out_off = (np.cumsum(sizes, 0) - sizes)                              # receiver offsets, by source order
    want = np.zeros((n, n * rows, 2), np.float32)
    for src in range(n):
        for dst in range(n):
            want[dst, out_off[src, dst]:out_off[src, dst] + sizes[src, dst]] = \
                operand[src, in_off[src, dst]:in_off[src, dst] + sizes[src, dst]]

    def body(op, io, ss, oo, rs):
        return parallel.ragged_all_to_all_emulated(op[0], jnp.zeros((n * rows, 2)), io[0], ss[0], oo[0], rs[0],
                                                    "expert")[None]

    spec = jax.sharding.PartitionSpec("expert")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))
    got = fn(operand, in_off, sizes, out_off, sizes.T.copy())
    np.testing.assert_array_equal(np.asarray(got), want)


def test_mesh_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^mesh\.expert=0"):
        MeshConfig(expert=0)
    with pytest.raises(ValueError, match=r"^mesh\.fsdp=-1: at most one"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"^mesh: data\*fsdp\*expert\*tensor = 2\*1\*3\*1"):
        MeshConfig(data=2, expert=3).shape(8)
    with pytest.raises(ValueError, match=r"^mesh\.bogus: unknown field"):
        MeshConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"^mesh\.rules\[0\]"):
        MeshConfig(rules=(("embed", "nope"),))
    assert MeshConfig(expert=4).shape(8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


def test_expert_count_not_divisible_by_the_expert_axis_is_rejected():
    cfg = dataclasses.replace(layer_config("dropless"), num_experts=6)
    x = jnp.zeros((8, 8, D))
    with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
        with pytest.raises(ValueError, match=r"^num_experts=6: must be divisible"):
            jax.eval_shape(lambda: MoELayer(cfg).init(jax.random.key(0), x))


def test_capacity_groups_must_cover_the_token_shards():
    cfg = layer_config("capacity", groups=2)
    x = jnp.zeros((8, 8, D))
    with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
        with pytest.raises(ValueError, match=r"^dispatch\.groups=2: .* set dispatch\.groups=8"):
            jax.eval_shape(lambda: MoELayer(cfg).init(jax.random.key(0), x))


def test_parameters_are_sharded_by_the_rules():
    cfg = layer_config("dropless")
    x = jnp.zeros((8, 8, D))
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    abstract = jax.eval_shape(lambda: MoELayer(cfg).init(jax.random.key(0), x))
    sh = parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES)
    P = jax.sharding.PartitionSpec
    assert sh["params"]["experts"]["w_in"].spec == P("expert", "fsdp", "tensor")
    assert sh["params"]["experts"]["w_out"].spec == P("expert", "tensor", "fsdp")
    assert sh["params"]["router"]["kernel"].spec == P("fsdp", "expert")
