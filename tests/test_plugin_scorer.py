"""The scorer contract, shown end to end with a scorer written outside ``moejax/`` (``tests/plugins/cosine_scorer.py``):
selected by name from flat fields, a mapping and ``replace``; its declared parameters (with the ``'expert'`` axis
first, unlike a linear kernel) are what the router creates; its logits and gradients are its definition's; its FLOPs
per token are what XLA counts; expert surgery slices its per-expert parameters and leaves the shared one alone."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, sweep
from moejax.models.build import build_model
from moejax.models.config import MLPConfig
from moejax.routing.scorer import SCORERS
from moejax.surgery import model as sm
from moejax.surgery import merge as merge_lib
from moejax.training import flops

cosine = sweep.load_sibling(__file__, "moejax_tests", "plugins/cosine_scorer")   # registers scorer 'cosine'


def layer(**router) -> MoEConfig:
    return MoEConfig(num_experts=4, hidden_dim=8, router=RouterConfig(k=2, scorer="cosine", **router),
                     dispatch=DispatchConfig(mode="dropless", gmm="bulk"))


def test_selected_by_name_with_its_own_fields_and_errors_naming_them():
    cfg = RouterConfig(k=2, scorer="cosine", cosine_dim=8)
    assert cfg.scorer == "cosine" and cfg.cosine_dim == 8 and cfg.scorer_options == cosine.Cosine(cosine_dim=8)
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg == RouterConfig.from_dict(dataclasses.asdict(cfg))
    assert cfg.replace(cosine_temperature=0.5).scorer_options == cosine.Cosine(8, 0.5)
    assert cfg.replace(scorer="linear").to_dict()["scorer"] == "linear"
    assert RouterConfig(logits="attention").scorer == "attention"            # the old field name still works
    with pytest.raises(ValueError, match=r"^router\.scorer='cosin': unknown scorer \(did you mean 'cosine'\?\)"):
        RouterConfig(scorer="cosin")
    with pytest.raises(ValueError, match=r"^router\.cosine_dim=8: not a field of router\.scorer='linear' "
                                         r"\(it belongs to scorer\(s\) \['cosine'\]\)"):
        RouterConfig(cosine_dim=8)
    with pytest.raises(ValueError, match=r"^router\.cosine_temperature=0: must be a finite number > 0"):
        RouterConfig(scorer="cosine", cosine_temperature=0)
    with pytest.raises(ValueError, match=r"^router\.scorer='cosine': kind='hash' has no learned router"):
        RouterConfig(kind="hash", k=1, scorer="cosine")
    assert "cosine" in SCORERS.names() and {"linear", "attention"} <= set(SCORERS.names())


def test_parameters_logits_and_gradients_are_the_definitions():
    cfg = layer(cosine_dim=3, cosine_temperature=0.25)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    boxed = jax.eval_shape(MoELayer(cfg).init, jax.random.key(1), x)["params"]["router"]
    assert {k: (v.value.shape, v.names) for k, v in boxed.items()} == {
        "projection": ((6, 3), ("embed", None)), "expert_embedding": ((4, 3), ("expert", None))}
    params = meta.unbox(MoELayer(cfg).init(jax.random.key(1), x))["params"]
    out = MoELayer(cfg).apply({"params": params}, x)
    w, emb = np.asarray(params["router"]["projection"], np.float64), np.asarray(params["router"]["expert_embedding"])
    h = np.asarray(x, np.float64).reshape(-1, 6) @ w
    want = (h / np.linalg.norm(h, axis=-1, keepdims=True)) @ (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).T
    np.testing.assert_allclose(out.logits.reshape(-1, 4), want / 0.25, rtol=1e-4, atol=1e-4)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(MoELayer(cfg).apply({"params": p}, x).y)))(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["router"]))


def test_flops_per_token_are_what_xla_counts():
    cfg = layer(cosine_dim=16)
    scorer = cfg.router.scorer_options
    d, e, t = 64, cfg.num_routed, 512
    specs = scorer.params(d, e)
    args = [jax.ShapeDtypeStruct((t, d), jnp.float32)] + [jax.ShapeDtypeStruct(s.shape, jnp.float32)
                                                           for s in specs.values()]
    cost = jax.jit(lambda x, *p: scorer.logits(x, dict(zip(specs, p)))).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert float(cost["flops"]) == pytest.approx(t * scorer.flops_per_token(d, e), rel=0.08)
    assert flops.moe_flops(cfg, d).router == scorer.flops_per_token(d, e)


def _random_model() -> tuple[sm.SurgeryModel, np.ndarray]:
    cfg = MLPConfig(num_classes=3, d_model=8, layers=(layer(cosine_dim=4, selection_bias=True),))
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    shapes = meta.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), x))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    return sm.SurgeryModel(cfg, variables), x


def _logits(model: sm.SurgeryModel, x: np.ndarray) -> np.ndarray:
    return np.asarray(build_model(model.config).apply(model.variables, x)[0])


def test_surgery_slices_the_expert_axis_and_keeps_the_shared_projection():
    model, x = _random_model()
    old = model.variables["params"]["layer_0"]["router"]
    order = np.array([2, 0, 3, 1])
    permuted = sm.select_experts(model, {0: order})          # the same function: experts renamed
    new = permuted.variables["params"]["layer_0"]["router"]
    np.testing.assert_array_equal(new["expert_embedding"], np.asarray(old["expert_embedding"])[order])
    np.testing.assert_array_equal(new["projection"], old["projection"])
    np.testing.assert_allclose(_logits(permuted, x), _logits(model, x), rtol=1e-5, atol=1e-5)
    pruned = sm.select_experts(model, {0: [0, 3]})
    assert pruned.variables["params"]["layer_0"]["router"]["expert_embedding"].shape == (2, 4)
    assert pruned.variables["moe_state"]["layer_0"]["router"]["selection_bias"].shape == (2,)
    assert _logits(pruned, x).shape == (16, 3)
    # Merging as the merge command does: group g keeps its leader's router entries. One group per expert: unchanged.
    ref = sm.resolve_layer(model, 0)
    result = merge_lib.merge_layer(sm.layer_experts(model, ref), None, np.ones(4) / 4, np.eye(4), 4,
                                   method="average")
    router, _ = sm.subset_arrays(model, ref, np.asarray(result.leaders))
    merged = sm.replace_experts(model, {0: sm.LayerUpdate(result.experts, None, None, router)})
    np.testing.assert_allclose(_logits(merged, x), _logits(model, x), rtol=1e-5, atol=1e-5)
