"""Every validation error names its field and is raised at construction."""
import dataclasses

import pytest

from moejax import DispatchConfig, MoEConfig, RouterConfig

CASES = [
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(k=5)), "router.k=5"),
    (lambda: RouterConfig(k=0), "router.k=0"),
    (lambda: RouterConfig(k=1.5), "router.k=1.5"),
    (lambda: RouterConfig(kind="sinkhorn_v2"), "router.kind='sinkhorn_v2'"),
    (lambda: RouterConfig(kind="top_p"), "router.top_p=None"),
    (lambda: RouterConfig(kind="top_p", top_p=1.5), "router.top_p=1.5"),
    (lambda: RouterConfig(kind="top_p", top_p=0.0), "router.top_p=0.0"),
    (lambda: RouterConfig(top_p=0.5), "router.top_p=0.5"),
    (lambda: RouterConfig(kind="top_p", top_p=0.5, score="sigmoid"), "router.score='sigmoid'"),
    (lambda: RouterConfig(kind="top_p", top_p=0.5, num_groups=2), "router.num_groups=2"),
    (lambda: RouterConfig(kind="hash", selection_bias=True), "router.selection_bias=True"),
    (lambda: RouterConfig(kind="hash", seed=-1), "router.seed=-1"),
    (lambda: RouterConfig(gumbel_noise=-0.5), "router.gumbel_noise=-0.5"),
    (lambda: RouterConfig(kind="random", gumbel_noise=1.0), "router.gumbel_noise=1.0"),
    (lambda: RouterConfig(gate_dropout=1.0), "router.gate_dropout=1.0"),
    (lambda: RouterConfig(kind="expert_choice", gate_dropout=0.1), "router.gate_dropout=0.1"),
    (lambda: RouterConfig(frozen=1), "router.frozen=1"),
    (lambda: RouterConfig(kind="hash", frozen=True), "router.frozen=True"),
    (lambda: RouterConfig(kind="random", gating_residual=True), "router.gating_residual=True"),
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(kind="top_p", top_p=0.5, k=5)), "router.k=5"),
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(kind="hash", k=6)), "router.k=6"),
    (lambda: RouterConfig(score="relu"), "router.score='relu'"),
    (lambda: RouterConfig(routed_scaling=0.0), "router.routed_scaling=0.0"),
    (lambda: RouterConfig(jitter_noise=1.5), "router.jitter_noise=1.5"),
    (lambda: RouterConfig(num_groups=2, top_groups=3), "router.top_groups=3"),
    (lambda: RouterConfig(group_score="mean"), "router.group_score='mean'"),
    (lambda: RouterConfig(kind="expert_choice", num_groups=2), "router.num_groups=2"),
    (lambda: RouterConfig(kind="expert_choice", selection_bias=True), "router.selection_bias=True"),
    (lambda: MoEConfig(num_experts=6, router=RouterConfig(k=1, num_groups=4)), "router.num_groups=4"),
    (lambda: MoEConfig(num_experts=8, router=RouterConfig(k=5, num_groups=4, top_groups=2)), "router.k=5"),
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(k=1, num_groups=4, top_groups=2, group_score="top2_sum")),
     "router.group_score='top2_sum'"),
    (lambda: DispatchConfig(capacity_factor=0.0), "dispatch.capacity_factor=0.0"),
    (lambda: DispatchConfig(capacity_factor=-1.0), "dispatch.capacity_factor=-1.0"),
    (lambda: DispatchConfig(eval_capacity_factor=float("nan")), "dispatch.eval_capacity_factor=nan"),
    (lambda: DispatchConfig(mode="sparse"), "dispatch.mode='sparse'"),
    (lambda: DispatchConfig(capacity_impl="scatter"), "dispatch.capacity_impl='scatter'"),
    (lambda: DispatchConfig(priority="random"), "dispatch.priority='random'"),
    (lambda: DispatchConfig(min_capacity=0), "dispatch.min_capacity=0"),
    (lambda: DispatchConfig(gmm_tile=0), "dispatch.gmm_tile=0"),
    (lambda: DispatchConfig(gmm="triton"), "dispatch.gmm='triton': must be one of"),
    (lambda: MoEConfig(num_experts=0), "num_experts=0"),
    (lambda: MoEConfig(hidden_dim=-3), "hidden_dim=-3"),
    (lambda: MoEConfig(activation="swiglu"), "activation='swiglu'"),
    (lambda: MoEConfig(expert_kind="conv"), "expert_kind='conv'"),
    (lambda: MoEConfig(num_shared_experts=-1), "num_shared_experts=-1"),
    (lambda: MoEConfig(shared_gate=True), "shared_gate=True"),
    (lambda: MoEConfig(shared_hidden_dim=0, num_shared_experts=1), "shared_hidden_dim=0"),
    (lambda: MoEConfig(dtype="int8"), "dtype='int8'"),
    (lambda: MoEConfig.from_dict({"num_experts": 4, "topk": 2}), "topk: unknown field"),
    (lambda: MoEConfig.from_dict({"router": {"kk": 2}}), "router.kk: unknown field"),
    (lambda: MoEConfig.from_dict({"router": None}), "router=None"),
    (lambda: MoEConfig.from_dict({"dispatch": 3}), "dispatch=3"),
    (lambda: DispatchConfig(expert_capacity=0), "dispatch.expert_capacity=0"),
    (lambda: DispatchConfig(expert_capacity=8, capacity_factor=2.0), "dispatch.capacity_factor=2.0"),
    (lambda: DispatchConfig(group_size=0), "dispatch.group_size=0"),
    (lambda: DispatchConfig(group_size=16, groups=2), "dispatch.group_size=16"),
    (lambda: RouterConfig(kind="hash", score="softmax"), "router.score='softmax': not a field of router.kind='hash'"),
    (lambda: RouterConfig(kind="expert_choice", renormalize=True), "router.renormalize=True: not a field"),
    (lambda: RouterConfig(kind="sinkhorn", gumbel_noise=0.5), "router.gumbel_noise=0.5: transform 'gumbel'"),
    (lambda: RouterConfig(renormalise=True), "router.renormalise: unknown field of router.kind='topk'"),
    (lambda: RouterConfig(transforms=("jitters",)), "router.transforms='jitters': unknown transform"),
    (lambda: MoEConfig(layer="soft", router=RouterConfig(jitter_noise=0.1)), "router.jitter_noise=0.1"),
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(kind="expert_choice", k=5)), "router.k=5: must be <= "),
]


@pytest.mark.parametrize("make,message", CASES, ids=[c[1] for c in CASES])
def test_validation_error_names_field(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message), str(err.value)


def test_unknown_gmm_rejected_by_name():
    from moejax.dispatch import get_gmm
    with pytest.raises(ValueError, match="dispatch.gmm='triton'"):
        get_gmm("triton")


def test_from_dict_round_trip():
    cfg = MoEConfig(num_experts=16, hidden_dim=32, router=RouterConfig(k=4, renormalize=True),
                    dispatch=DispatchConfig(mode="capacity", capacity_factor=1.0))
    assert MoEConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_from_dict_accepts_typed_sub_configs():
    cfg = MoEConfig.from_dict({"num_experts": 4, "router": RouterConfig(k=3)})
    assert cfg.router.k == 3


def test_from_config_dict():
    import ml_collections
    cd = ml_collections.ConfigDict({"num_experts": 4, "router": {"k": 1}, "dispatch": {"mode": "capacity"}})
    cfg = MoEConfig.from_dict(cd)
    assert cfg.router.k == 1 and cfg.dispatch.mode == "capacity"


@pytest.mark.parametrize("cf,tokens,expected", [(1.0, 64, 16), (1.25, 64, 20), (None, 64, 64), (0.01, 64, 1),
                                                (100.0, 64, 64)])
def test_capacity_formula(cf, tokens, expected):
    cfg = MoEConfig(num_experts=8, router=RouterConfig(k=2), dispatch=DispatchConfig(capacity_factor=cf))
    assert cfg.capacity(tokens, train=True) == expected


def test_absolute_expert_capacity_replaces_the_factors():
    cfg = MoEConfig(num_experts=8, router=RouterConfig(k=2), dispatch=DispatchConfig(expert_capacity=5))
    assert cfg.capacity(64, train=True) == cfg.capacity(64, train=False) == 5
    assert cfg.capacity(3, train=True) == 3                                        # at most the tokens of a group


def test_routing_groups_by_count_or_by_size():
    by_size = DispatchConfig(mode="capacity", group_size=16)
    assert by_size.num_groups(64) == 4 and DispatchConfig(mode="capacity", groups=4).num_groups(64) == 4
    assert DispatchConfig(mode="dropless", group_size=16).num_groups(64) == 1      # dropless: no groups
    with pytest.raises(ValueError, match=r"^dispatch\.group_size=16: must divide the 40 tokens"):
        by_size.num_groups(40)


def test_router_config_round_trips_through_flat_and_nested_mappings():
    cfg = RouterConfig(kind="topk", k=3, renormalize=True, num_groups=4, top_groups=2, selection_bias=True,
                       gate_dropout=0.1, transforms=("group_limit",))
    assert [t.name for t in cfg.transforms] == ["group_limit", "selection_bias", "gate_dropout"]
    assert RouterConfig(**cfg.to_dict()) == cfg
    assert RouterConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    assert dataclasses.replace(cfg, k=2).k == 2 and dataclasses.replace(cfg, gate_dropout=0.0).gate_dropout == 0.0
    assert "gate_dropout" not in [t.name for t in dataclasses.replace(cfg, gate_dropout=0.0).transforms]
    assert cfg.replace(kind="sinkhorn", num_groups=1, top_groups=None, selection_bias=False).options.name == "sinkhorn"
    assert cfg.jitter_noise == 0.0 and cfg.score == "softmax"                      # absent transform: its default
    with pytest.raises(AttributeError):
        cfg.balance_iterations                                                     # a field of another kind


def test_eval_capacity_factor_used_in_eval():
    cfg = MoEConfig(num_experts=8, router=RouterConfig(k=2),
                    dispatch=DispatchConfig(capacity_factor=1.0, eval_capacity_factor=2.0))
    assert cfg.capacity(64, train=True) == 16 and cfg.capacity(64, train=False) == 32


@pytest.mark.parametrize("make,suggestion", [
    (lambda: MoEConfig.from_dict({"num_expert": 4}), "did you mean 'num_experts'"),
    (lambda: MoEConfig.from_dict({"dispatch": {"capacityfactor": 2.0}}), "did you mean 'capacity_factor'"),
    (lambda: MoEConfig.from_dict({"router": {"gumble_noise": 0.5}}), "did you mean 'gumbel_noise'"),
])
def test_unknown_fields_suggest_the_closest_names(make, suggestion):
    with pytest.raises(ValueError, match=suggestion):
        make()
