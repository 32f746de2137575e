"""Bad values in every config section, applied as command-line overrides to the tiny quickstart run: each is a
ValueError whose one-line message starts with the field's dotted path, raised by ``train_and_evaluate`` before
anything is compiled (a JAX compilation listener counts them) and before a train state exists."""
from __future__ import annotations

import jax
import pytest

from moejax import cli
from moejax.training import loop, train_and_evaluate
from test_trainer_safety import small

_COMPILES: list[str] = []
_COUNTING = [False]


def _listener(event: str, duration: float, **kwargs) -> None:
    if _COUNTING[0] and event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_listener)
pytestmark = pytest.mark.usefixtures("no_compilation_cache")   # a cache hit would hide a compilation from the count

L0 = "model.layers[0]"
CASES = [
    # train
    ("train.steps", "0"), ("train.steps", "-5"), ("train.log_every", "0"), ("train.eval_every", "0"),
    ("train.checkpoint_every", "-1"), ("train.keep_checkpoints", "0"), (f"{L0}.router.load_balance_weight", "-1.0"),
    ("train.moe_k_start", "0"), ("train.eval_moe_k", "0"), ("train.consistency_weight", "nan"),
    # optimizer
    ("optimizer.name", "'adamax'"), ("optimizer.learning_rate", "inf"), ("optimizer.schedule", "'cyclic'"),
    ("optimizer.warmup_steps", "-3"), ("optimizer.b1", "1.5"), ("optimizer.grad_clip_norm", "-1.0"),
    # data
    ("data.name", "'no_such_dataset'"), ("data.batch_size", "0"), ("data.eval_batch_size", "-1"),
    ("data.seed", "-1"), ("data.batchsize", "32"),
    # model
    ("model.d_model", "0"), ("model.norm", "'batchnorm'"), ("model.activation", "'swiglu'"),
    ("model.ffn_kind", "'conv'"), ("model.dropout_rate", "1.0"), ("model.dtype", "'int8'"),
    ("model.kind", "'rnn'"), ("model.depth", "3"),
    # one MoE layer
    (f"{L0}.num_experts", "0"), (f"{L0}.hidden_dim", "-1"), (f"{L0}.expert_kind", "'conv'"),
    (f"{L0}.activation", "'relu6'"), (f"{L0}.num_shared_experts", "-1"), (f"{L0}.shared_gate", "True"),
    (f"{L0}.layer", "'dense'"), (f"{L0}.soft_slots", "2"), (f"{L0}.zero_experts", "-1"),
    (f"{L0}.zero_computation_tau", "0.5"), (f"{L0}.dtype", "'float64'"), (f"{L0}.num_expert", "4"),
    # its router
    (f"{L0}.router.k", "0"), (f"{L0}.router.k", "9"), (f"{L0}.router.kind", "'topq'"),
    (f"{L0}.router.kind", "'hash'", f"{L0}.router.renormalize"),   # the quickstart's renormalize: not hash's
    (f"{L0}.router.score", "'relu'"), (f"{L0}.router.renormalise", "True"), (f"{L0}.router.top_p", "0.5"),
    (f"{L0}.router.gumbel_noise", "-1.0"), (f"{L0}.router.gate_dropout", "1.0"),
    (f"{L0}.router.jitter_noise", "1.5"), (f"{L0}.router.num_groups", "3"), (f"{L0}.router.group_score", "'mean'"),
    (f"{L0}.router.bias_update_rate", "-1.0"), (f"{L0}.router.frozen", "'yes'"), (f"{L0}.router.logits", "'mlp'"),
    (f"{L0}.router.transforms", "('jitters',)"), (f"{L0}.router.balance_iterations", "3"),
    # its dispatch
    (f"{L0}.dispatch.mode", "'sparse'"), (f"{L0}.dispatch.capacity_impl", "'scatter'"),
    (f"{L0}.dispatch.capacity_factor", "0.0"), (f"{L0}.dispatch.eval_capacity_factor", "nan"),
    (f"{L0}.dispatch.min_capacity", "0"), (f"{L0}.dispatch.priority", "'random'"), (f"{L0}.dispatch.gmm", "'triton'"),
    (f"{L0}.dispatch.gmm_tile", "0"), (f"{L0}.dispatch.groups", "0"), (f"{L0}.dispatch.group_size", "0"),
    (f"{L0}.dispatch.expert_capacity", "0"), (f"{L0}.dispatch.drop", "True"),
    # mesh
    ("mesh.data", "0"), ("mesh.distributed", "'sometimes'"), ("mesh.num_devices", "0"), ("mesh.pipeline", "2"),
]


def test_there_are_at_least_sixty_cases_over_every_section():
    sections = {path.split(".")[0] if not path.startswith(L0) else path.split(".")[2].split("[")[0] if
                path.count(".") > 2 else "layer" for path, *_ in CASES}
    assert len(CASES) >= 60 and {"train", "optimizer", "data", "model", "layer", "router", "dispatch",
                                 "mesh"} <= sections


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_a_bad_value_is_one_line_naming_the_field_before_anything_compiles(tmp_path, data_dir, monkeypatch, case):
    path, value, named = (*case, case[0]) if len(case) == 2 else case
    def no_state(*args, **kwargs):
        raise AssertionError(f"{path}={value}: a train state was built before the error")

    monkeypatch.setattr(loop, "init_state", no_state)
    cfg = small(data_dir)
    cli.apply_overrides(cfg, [(path, value)])
    _COMPILES.clear()
    _COUNTING[0] = True
    try:
        with pytest.raises(ValueError) as err:
            train_and_evaluate(cfg, tmp_path / "run")
    finally:
        _COUNTING[0] = False
    message = str(err.value)
    assert message.startswith(named), message
    assert "\n" not in message, message
    assert not _COMPILES, f"{len(_COMPILES)} compilation(s) before the error: {message}"


def test_the_compilation_counter_counts():
    _COMPILES.clear()
    _COUNTING[0] = True
    try:
        jax.jit(lambda x: x * 3.0 + 0.5)(jax.numpy.ones((7,)))
    finally:
        _COUNTING[0] = False
    assert _COMPILES
