"""The paper presets of ``moejax.presets``: the DeepSeekMoE arithmetic against a GShard top-K baseline."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from moejax import presets
from moejax.config import DispatchConfig, MoEConfig, RouterConfig
from moejax.layers.moe import MoELayer
from moejax.models import build_model, count_params, expert_params, param_counts

D = 32
LAYERS = 2


def _lm(moe: MoEConfig | None, dense_hidden_dim: int | None = None):
    return build_model({"kind": "transformer_lm", "d_model": D, "num_layers": LAYERS, "num_heads": 2,
                        "moe": moe, "dense_hidden_dim": dense_hidden_dim, "vocab_size": 64})


def _counts(moe: MoEConfig):
    return param_counts(_lm(moe), jax.ShapeDtypeStruct((2, 8), jnp.int32))


def test_deepseekmoe_fields_follow_the_paper_arithmetic():
    # The paper's 2B validation setting: 16 experts top-2 -> 63 routed quarter-width experts, top-7, 1 shared.
    cfg = presets.deepseekmoe(16, 64, 2, segments=4, shared=1)
    assert (cfg.num_experts, cfg.hidden_dim, cfg.router.k) == (63, 16, 7)
    assert (cfg.num_shared_experts, cfg.shared_hidden_dim, cfg.shared_width) == (1, 16, 16)
    assert cfg.router.kind == "topk" and cfg.router.renormalize is False
    fine_only = presets.deepseekmoe(8, 64, 2, segments=4, shared=0)
    assert (fine_only.num_experts, fine_only.hidden_dim, fine_only.router.k, fine_only.num_shared_experts) == \
        (32, 16, 8, 0)
    g = presets.gshard_top2(8, 64)
    assert (g.num_experts, g.hidden_dim, g.router.k, g.router.renormalize, g.num_shared_experts) == \
        (8, 64, 2, True, 0)


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("n,k,m,ks", [(8, 2, 4, 1), (8, 2, 4, 0), (4, 1, 2, 1), (16, 2, 4, 2), (8, 2, 1, 0)])
def test_deepseekmoe_total_and_active_params_equal_gshard_without_biases(kind, n, k, m, ks):
    fields = dict(expert_kind=kind, activation="silu" if kind == "glu" else "gelu", use_bias=False)
    base = presets.gshard_top2(n, 64, k=k, **fields)
    ds = presets.deepseekmoe(n, 64, k, segments=m, shared=ks, **fields)
    cb, cd = _counts(base), _counts(ds)
    # Only the router differs: D weights per routed expert, in each of the LAYERS MoE blocks.
    router_extra = LAYERS * D * (ds.num_experts - base.num_experts)
    assert cd.total - cb.total == router_extra
    assert cd.active - cb.active == router_extra
    # Per-token expert work (FLOPs are 2 x these weights): activated routed experts plus the shared FFN.
    shared = count_params(jax.eval_shape(lambda: _shared_params(ds)))
    assert ds.router.k * expert_params(ds, D) + shared == base.router.k * expert_params(base, D)
    assert ds.num_experts * expert_params(ds, D) + shared == base.num_experts * expert_params(base, D)


def _shared_params(cfg: MoEConfig):
    variables = nn.unbox(MoELayer(cfg).init(jax.random.key(0), jnp.zeros((4, D))))
    return variables["params"].get("shared", {})


def test_deepseekmoe_with_biases_differs_by_the_documented_bias_count():
    n, k, m, ks = 8, 2, 4, 1
    base = presets.gshard_top2(n, 64, k=k, use_bias=True)
    ds = presets.deepseekmoe(n, 64, k, segments=m, shared=ks, use_bias=True)
    cb, cd = _counts(base), _counts(ds)
    router_extra = D * (ds.num_experts - base.num_experts)
    assert cd.total - cb.total == LAYERS * (router_extra + ((m - 1) * n - ks + 1) * D)
    assert cd.active - cb.active == LAYERS * (router_extra + ((m - 1) * k - ks + 1) * D)


def test_presets_layer_counts_match_init():
    """Counting the initialised layer's parameters agrees with the arithmetic in the docstring."""
    ds = presets.deepseekmoe(8, 64, 2, segments=4, shared=1, expert_kind="glu", activation="silu", use_bias=False)
    params = jax.eval_shape(lambda: nn.unbox(MoELayer(ds).init(jax.random.key(0), jnp.zeros((4, D)))))["params"]
    assert params["experts"]["w_gate"].shape == (31, D, 16)
    assert params["shared"]["w_up"].shape == (D, 16)
    assert count_params(params) == D * 31 + 3 * D * 64 * 8  # router + N F hidden units of 3 D weights each


def test_preset_passes_other_fields_through_and_runs():
    dispatch = DispatchConfig(mode="capacity", capacity_factor=2.0)
    router = RouterConfig(k=1, score="sigmoid", jitter_noise=0.1)
    ds = presets.deepseekmoe(4, 32, 2, segments=2, shared=1, dispatch=dispatch, router=router, use_bias=False)
    assert ds.dispatch == dispatch
    assert (ds.router.score, ds.router.jitter_noise, ds.router.k) == ("sigmoid", 0.1, 3)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    layer = MoELayer(ds)
    variables = jax.jit(lambda x: nn.unbox(layer.init(jax.random.key(0), x)))(x)
    out = jax.jit(layer.apply)(variables, x)
    y, stats = out.y, out.stats
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.sum(stats.expert_load)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("call,field", [
    (lambda: presets.deepseekmoe(8, 64, 2, segments=3), "segments=3"),
    (lambda: presets.deepseekmoe(8, 64, 2, segments=0), "segments=0"),
    (lambda: presets.deepseekmoe(8, 64, 2, segments=4, shared=8), "shared=8"),
    (lambda: presets.deepseekmoe(8, 64, 2, segments=4, shared=-1), "shared=-1"),
    (lambda: presets.deepseekmoe(8, 64, 9), "k=9"),
    (lambda: presets.deepseekmoe(0, 64, 1), "num_experts=0"),
    (lambda: presets.deepseekmoe(8, 64, 2, num_shared_experts=2), "num_shared_experts=2"),
    (lambda: presets.gshard_top2(8, 64, hidden_dim=3), None),  # duplicate keyword: a TypeError
    (lambda: presets.gshard_top2(1, 64), "k=2"),
    (lambda: presets.gshard_top2(8, 64, router={"k": 2}), "router="),
    (lambda: presets.gshard_top2(8, 64, activation="nope"), "activation="),
])
def test_preset_errors_name_the_argument(call, field):
    if field is None:
        with pytest.raises(TypeError):
            call()
        return
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(field)
