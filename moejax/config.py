"""Typed, validated configuration for the MoE layer.

Every dataclass validates itself in ``__post_init__``; cross-field checks (``k`` against the number of
experts, expert groups against ``num_experts``) live in :class:`MoEConfig`. Errors are ``ValueError``s
whose message starts with the dotted name of the offending field, e.g. ``router.k``, and are raised at
construction, long before anything is traced or compiled.

``MoEConfig.from_dict`` builds the typed config from a plain dict or an ``ml_collections.ConfigDict``
and rejects unknown keys by name, so a typo in an experiment config fails loudly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "sigmoid", "identity")
RouterKind = Literal["topk", "expert_choice", "top_p", "hash", "random", "sinkhorn", "base", "sparse_ot", "threshold"]
ROUTER_KINDS = ("topk", "expert_choice", "top_p", "hash", "random", "sinkhorn", "base", "sparse_ot", "threshold")
TOKEN_CHOICE_KINDS = ("topk", "top_p", "hash", "random", "sinkhorn", "base", "sparse_ot", "threshold")
# Kinds that choose experts from a balanced plan over the whole routed group (moejax/routing/balanced.py).
BALANCED_KINDS = ("sinkhorn", "base", "sparse_ot")
ROUTER_LOGITS = ("linear", "attention")
THRESHOLD_MODES = ("probability", "percentile")
ScoreFn = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]
DispatchMode = Literal["capacity", "dropless"]
CapacityImpl = Literal["einsum", "index", "pallas", "pallas_triton"]
Priority = Literal["position", "score"]
ExpertKind = Literal["mlp", "glu"]


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"{field}={value!r}: {why}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, f"must be one of {list(choices)}")


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "must be an integer >= 1")


def _check_capacity_factor(field: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(field, value, "must be a finite number > 0, or None for no capacity limit")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens choose experts (or experts choose tokens).

    Attributes:
      kind: ``topk`` (token choice), ``expert_choice`` (each expert takes its top-C tokens), ``top_p``
        (dynamic top-p), ``hash`` (fixed token-id hash) or ``random`` (a uniformly random expert per
        token, in training and inference: THOR's stochastic experts), ``sinkhorn`` (S-BASE: top-k of a
        Sinkhorn-balanced plan), ``base`` (BASE layers: balanced linear assignment, exactly ``T/E`` tokens
        per expert, ``k=1``), ``sparse_ot`` (capacity-bounded OT, at most ``C`` tokens per expert) or
        ``threshold`` (DynaMoE: every expert whose score reaches a threshold, 1 to ``k`` per token);
        see docs/routing_mechanisms.md.
      k: experts per token for ``topk``, ``hash`` and ``random``, the maximum for ``top_p``; for
        ``expert_choice`` the average number of experts per token (the paper's ``c``), so that ``C = ceil(capacity_factor * T * k / E)`` holds for both.
      score: ``softmax`` over all experts, or per-expert ``sigmoid`` (DeepSeek-V3).
      renormalize: renormalise the selected weights to sum to one (Mixtral/Qwen) or keep the raw
        scores (Switch/GShard).
      routed_scaling: multiplies the combine weights (DeepSeek-V3's routed scaling factor).
      jitter_noise: multiplicative uniform noise ``U(1-eps, 1+eps)`` on the router input in training
        (Switch Transformer); 0 disables it.
      selection_bias: keep a per-expert bias (collection ``moe_state``) that is added to the scores
        for selection only, never to the weights (DeepSeek-V3 auxiliary-loss-free balancing).
      bias_update_rate: the bias update speed ``gamma``: in training, when ``moe_state`` is mutable, the
        router applies ``b_e += gamma * sign(mean load - load_e)`` after routing each batch.
      num_groups, top_groups, group_score: group-limited routing; experts are split into
        ``num_groups`` equal groups, each group is scored by the ``max`` of its scores or the sum of
        its top two (``top2_sum``), and only the ``top_groups`` best groups may be chosen.
      top_p: for ``kind='top_p'`` (Huang et al. 2024, dynamic routing): each token takes the smallest
        set of experts, by descending probability, whose cumulative probability reaches ``top_p``, at
        most ``k`` of them. Required for that kind, in ``(0, 1]``.
      seed: seed of the fixed hash of ``kind='hash'`` (Roller et al. 2021) and of the random draw of
        ``kind='random'`` when no ``'jitter'`` RNG is given (e.g. evaluation).
      gumbel_noise: scale of Gumbel noise added to the logits *for selection only* in training
        (Gumbel-top-k: sampling experts without replacement from the router distribution); 0 disables.
      gate_dropout: in training, each chosen (token, expert) gate is dropped with this probability and
        the kept ones are scaled by ``1 / (1 - rate)`` (SiRA's expert dropout); 0 disables.
      frozen: the router kernel is randomly initialised and never trained (SMoE-Dropout): it lives in
        ``moe_state/router/kernel`` instead of ``params``, so neither gradients nor weight decay touch it.
      gating_residual: add the previous layer's router logits to this layer's (MoE++); the layer takes
        them as ``router_logits`` and returns its own when called with ``return_logits=True``.
      logits: how the router scores experts: ``linear`` (``x W``) or ``attention`` (Yuan 2.0-M32's attention
        router: per-expert query/key/value scalars, ``softmax(q k^T) v``); any routing kind with a learned
        router composes with either.
      balance_iterations: Sinkhorn iterations of ``sinkhorn`` and ``sparse_ot``.
      balance_temperature: the plan is computed on ``exp(logits / temperature)`` (``sinkhorn``,
        ``sparse_ot``); lower is closer to the unregularised assignment.
      balance_in_eval: use the balanced plan in evaluation too. Default False: in evaluation the balanced
        kinds route greedily (top-k of the ordinary scores), as BASE does at inference, so that a token's
        experts do not depend on the rest of its batch.
      threshold, threshold_mode: for ``kind='threshold'`` (required there): ``probability`` — experts with
        score ``>= threshold`` (in ``(0, 1]``) are active; ``percentile`` — the threshold is the
        ``threshold``-th percentile (in ``(0, 100)``) of the group's scores.
    """

    kind: RouterKind = "topk"
    k: int = 2
    score: ScoreFn = "softmax"
    renormalize: bool = False
    routed_scaling: float = 1.0
    jitter_noise: float = 0.0
    selection_bias: bool = False
    bias_update_rate: float = 0.001
    num_groups: int = 1
    top_groups: int | None = None
    group_score: GroupScore = "max"
    top_p: float | None = None
    seed: int = 0
    gumbel_noise: float = 0.0
    gate_dropout: float = 0.0
    frozen: bool = False
    gating_residual: bool = False
    logits: str = "linear"
    balance_iterations: int = 20
    balance_temperature: float = 1.0
    balance_in_eval: bool = False
    threshold: float | None = None
    threshold_mode: str = "probability"

    def __post_init__(self) -> None:
        _check_choice("router.kind", self.kind, ROUTER_KINDS)
        _check_positive_int("router.k", self.k)
        _check_choice("router.score", self.score, ("softmax", "sigmoid"))
        if not isinstance(self.renormalize, bool):
            _fail("router.renormalize", self.renormalize, "must be a bool")
        if not math.isfinite(self.routed_scaling) or self.routed_scaling <= 0:
            _fail("router.routed_scaling", self.routed_scaling, "must be a finite number > 0")
        if not 0.0 <= self.jitter_noise < 1.0:
            _fail("router.jitter_noise", self.jitter_noise, "must be in [0, 1)")
        if not math.isfinite(self.bias_update_rate) or self.bias_update_rate < 0:
            _fail("router.bias_update_rate", self.bias_update_rate, "must be a finite number >= 0")
        _check_positive_int("router.num_groups", self.num_groups)
        if self.top_groups is not None:
            _check_positive_int("router.top_groups", self.top_groups)
            if self.top_groups > self.num_groups:
                _fail("router.top_groups", self.top_groups, f"must be <= router.num_groups={self.num_groups}")
        _check_choice("router.group_score", self.group_score, ("max", "top2_sum"))
        if self.kind == "expert_choice":
            if self.num_groups != 1 or self.top_groups is not None:
                _fail("router.num_groups", self.num_groups, "group-limited routing applies to kind='topk' only")
            if self.selection_bias:
                _fail("router.selection_bias", self.selection_bias, "applies to kind='topk' only")
        self._check_mechanisms()
        self._check_balanced_and_threshold()

    def _check_mechanisms(self) -> None:
        """The fields of the routing mechanisms beyond plain top-k (docs/routing_mechanisms.md)."""
        if self.kind in ("top_p", "hash", "random") + BALANCED_KINDS + ("threshold",):
            if self.num_groups != 1 or self.top_groups is not None:
                _fail("router.num_groups", self.num_groups, "group-limited routing applies to kind='topk' only")
            if self.selection_bias:
                _fail("router.selection_bias", self.selection_bias, "applies to kind='topk' only")
        if self.kind == "top_p":
            if self.top_p is None:
                _fail("router.top_p", self.top_p, "required for router.kind='top_p'")
            if self.score != "softmax":
                _fail("router.score", self.score, "kind='top_p' needs 'softmax' probabilities")
        if self.top_p is not None:
            if self.kind != "top_p":
                _fail("router.top_p", self.top_p, "applies to kind='top_p' only")
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                    or not 0.0 < self.top_p <= 1.0:
                _fail("router.top_p", self.top_p, "must be in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("router.seed", self.seed, "must be an integer >= 0")
        if not isinstance(self.gumbel_noise, (int, float)) or not math.isfinite(self.gumbel_noise) \
                or self.gumbel_noise < 0:
            _fail("router.gumbel_noise", self.gumbel_noise, "must be a finite number >= 0")
        if self.gumbel_noise > 0 and self.kind not in ("topk", "top_p"):
            _fail("router.gumbel_noise", self.gumbel_noise, "applies to kind='topk' or 'top_p' only")
        if not isinstance(self.gate_dropout, (int, float)) or not 0.0 <= self.gate_dropout < 1.0:
            _fail("router.gate_dropout", self.gate_dropout, "must be in [0, 1)")
        if self.gate_dropout > 0 and self.kind == "expert_choice":
            _fail("router.gate_dropout", self.gate_dropout, "applies to token-choice kinds only")
        for name in ("frozen", "gating_residual"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"router.{name}", getattr(self, name), "must be a bool")
        if self.kind in ("hash", "random") and (self.frozen or self.gating_residual):
            name = "frozen" if self.frozen else "gating_residual"
            _fail(f"router.{name}", True, f"kind={self.kind!r} has no learned router")

    def _check_balanced_and_threshold(self) -> None:
        """Fields of the balanced routers, the attention router and threshold routing."""
        _check_choice("router.logits", self.logits, ROUTER_LOGITS)
        if self.logits != "linear" and self.kind in ("hash", "random"):
            _fail("router.logits", self.logits, f"kind={self.kind!r} has no learned router")
        _check_positive_int("router.balance_iterations", self.balance_iterations)
        t = self.balance_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            _fail("router.balance_temperature", t, "must be a finite number > 0")
        if not isinstance(self.balance_in_eval, bool):
            _fail("router.balance_in_eval", self.balance_in_eval, "must be a bool")
        if self.kind == "base" and self.k != 1:
            _fail("router.k", self.k, "kind='base' assigns exactly one expert per token (k=1)")
        _check_choice("router.threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        if self.kind == "threshold" and self.threshold is None:
            _fail("router.threshold", self.threshold, "required for router.kind='threshold'")
        if self.threshold is not None:
            if self.kind != "threshold":
                _fail("router.threshold", self.threshold, "applies to kind='threshold' only")
            th = self.threshold
            if isinstance(th, bool) or not isinstance(th, (int, float)) or not math.isfinite(th):
                _fail("router.threshold", th, "must be a number")
            if self.threshold_mode == "probability" and not 0.0 < th <= 1.0:
                _fail("router.threshold", th, "must be in (0, 1] for threshold_mode='probability'")
            if self.threshold_mode == "percentile" and not 0.0 < th < 100.0:
                _fail("router.threshold", th, "must be in (0, 100) for threshold_mode='percentile'")


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How tokens move to experts and back.

    Attributes:
      mode: ``capacity`` (fixed ``[E, C, D]`` buffers, overflow dropped) or ``dropless``
        (sort by expert, grouped matmul over contiguous groups).
      capacity_impl: ``einsum`` (one-hot dispatch/combine tensors), ``index`` (scatter/gather), ``pallas``
        (the Pallas row-gather kernels of ``moejax.kernels``: Mosaic on TPU, Triton on GPU, interpret mode on
        CPU) or ``pallas_triton`` (the Triton kernels; interpret mode on CPU); identical results.
      capacity_factor, eval_capacity_factor: ``C = ceil(cf * T * K / E)`` in training and in
        evaluation; ``None`` means no limit (``C = T``, nothing can be dropped).
      min_capacity: lower bound on ``C``.
      priority: which token copies keep their slot when an expert overflows: ``position`` (all first
        choices before second choices, then by token order) or ``score`` (batch-prioritised routing:
        first choices before second choices, then by descending router weight).
      gmm: grouped matmul used by ``dropless`` (``bulk`` also runs whole expert FFNs in its layout, see
        :mod:`moejax.dispatch.bulk_ffn`): ``auto`` (``bulk`` on CPU, ``ragged_dot`` on GPU/TPU) or a
        name registered in :mod:`moejax.dispatch.gmm` (``bulk``, ``padded``, ``blocked``, ``pallas``,
        ``pallas_triton``, ``ragged_dot``, ``reference``).
      gmm_tile: row tile of the ``bulk`` (its overflow blocks) / ``padded`` / ``blocked`` / ``pallas`` grouped
        matmuls (see ``benchmarks/results/`` for measured tiles).
      groups: ``G``, capacity mode: the ``T`` routed tokens are split into ``G`` equal, consecutive groups,
        each with its own buffers of capacity ``C = ceil(cf * (T/G) * K / E)`` (GShard/V-MoE routing
        groups). Under expert parallelism each device holds whole groups, so ``G`` must be a multiple of the
        number of token shards; a single-device run with the same ``G`` computes exactly the same thing.
        Dropless dispatch drops nothing and ignores it.
    """

    mode: DispatchMode = "dropless"
    capacity_impl: CapacityImpl = "index"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 1
    priority: Priority = "position"
    gmm: str = "auto"
    gmm_tile: int = 64
    groups: int = 1

    def __post_init__(self) -> None:
        _check_choice("dispatch.mode", self.mode, ("capacity", "dropless"))
        _check_choice("dispatch.capacity_impl", self.capacity_impl, ("einsum", "index", "pallas", "pallas_triton"))
        _check_capacity_factor("dispatch.capacity_factor", self.capacity_factor)
        _check_capacity_factor("dispatch.eval_capacity_factor", self.eval_capacity_factor)
        _check_positive_int("dispatch.min_capacity", self.min_capacity)
        _check_choice("dispatch.priority", self.priority, ("position", "score"))
        if not isinstance(self.gmm, str) or not self.gmm:
            _fail("dispatch.gmm", self.gmm, "must be a non-empty string")
        _check_positive_int("dispatch.gmm_tile", self.gmm_tile)
        _check_positive_int("dispatch.groups", self.groups)


LayerKind = Literal["sparse", "soft", "smear", "chain"]
LAYER_KINDS = ("sparse", "soft", "smear", "chain")
SMEAR_GRANULARITIES = ("example", "token")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE layer: ``num_experts`` routed experts of width ``hidden_dim`` plus optional shared ones.

    Attributes:
      num_experts: ``E``.
      hidden_dim: ``F``, the hidden width of one routed expert. Fine-grained experts are simply more,
        narrower experts.
      expert_kind: ``mlp`` (``act(x W_in + b) W_out``) or ``glu`` (``(act(x W_gate) * x W_up) W_down``;
        SwiGLU with ``silu``, GeGLU with ``gelu``).
      activation: one of ``ACTIVATIONS``.
      use_bias: biases in the expert (and shared expert) projections.
      num_shared_experts, shared_hidden_dim: shared experts applied to every token; they are
        computed as one FFN of width ``num_shared_experts * shared_hidden_dim`` (mathematically the
        sum of the individual experts). ``shared_hidden_dim`` defaults to ``hidden_dim``.
      shared_gate: multiply the shared output by ``sigmoid(x w)`` per token (Qwen2-MoE).
      router, dispatch: see :class:`RouterConfig` and :class:`DispatchConfig`.
      dtype, param_dtype: computation and parameter dtypes (names understood by ``jnp.dtype``).
      layer: which layer the spec builds (docs/routing_mechanisms.md): ``sparse`` (:class:`~moejax.layers.MoELayer`,
        router -> dispatch -> experts), ``soft`` (Soft MoE, :class:`~moejax.layers.SoftMoELayer`), ``smear``
        (merged experts, :class:`~moejax.layers.SMEARLayer`) or ``chain`` (Chain-of-Experts,
        :class:`~moejax.layers.ChainOfExpertsLayer`). ``soft`` and ``smear`` have their own soft routers: they
        use neither ``router`` (beyond its default) nor ``dispatch``, nor shared or zero-computation experts.
      soft_slots: ``layer='soft'`` only: slots per expert ``S`` in each routed group (default 1).
      soft_normalize: ``layer='soft'``: l2-normalise the tokens and the slot parameters before their dot
        product, times a learned scalar scale (the paper's normalisation); False uses plain ``X Phi``.
      smear_granularity: ``layer='smear'`` only: ``example`` (default; one merged expert per example, routed
        on the mean of its tokens) or ``token`` (one merged expert per token).
      chain_iterations: ``layer='chain'`` only: number of routing iterations ``I`` (default 2).
      zero_experts, copy_experts, constant_experts: MoE++ zero-computation experts routed by the same router
        as the FFN experts (``layer='sparse'`` or ``'chain'``, token-choice routers): the router has
        ``num_routed = num_experts + zero_experts + copy_experts + constant_experts`` outputs in that order;
        a copy sent to one of them never reaches the dispatch buffers.
      zero_computation_tau: MoE++'s heterogeneous load balancing: the load-balance terms of the
        zero-computation experts are weighted by ``tau`` (1.0: the ordinary loss over all routed experts).
    """

    num_experts: int = 8
    hidden_dim: int = 256
    expert_kind: ExpertKind = "mlp"
    activation: str = "gelu"
    use_bias: bool = True
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_gate: bool = False
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    dispatch: DispatchConfig = dataclasses.field(default_factory=DispatchConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    layer: LayerKind = "sparse"
    soft_slots: int | None = None
    soft_normalize: bool = True
    smear_granularity: str | None = None
    chain_iterations: int | None = None
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    zero_computation_tau: float = 1.0

    def __post_init__(self) -> None:
        _check_positive_int("num_experts", self.num_experts)
        _check_positive_int("hidden_dim", self.hidden_dim)
        _check_choice("expert_kind", self.expert_kind, ("mlp", "glu"))
        _check_choice("activation", self.activation, ACTIVATIONS)
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        if self.shared_hidden_dim is not None:
            _check_positive_int("shared_hidden_dim", self.shared_hidden_dim)
        if self.shared_gate and self.num_shared_experts == 0:
            _fail("shared_gate", self.shared_gate, "needs num_shared_experts >= 1")
        if not isinstance(self.router, RouterConfig):
            _fail("router", self.router, "must be a RouterConfig")
        if not isinstance(self.dispatch, DispatchConfig):
            _fail("dispatch", self.dispatch, "must be a DispatchConfig")
        for field in ("dtype", "param_dtype"):
            _check_choice(field, getattr(self, field), ("float32", "bfloat16", "float16"))
        self._check_layer()
        if self.layer in ("soft", "smear"):
            return  # their own soft routers: router.k, expert groups and capacities do not apply
        e, r = self.num_routed, self.router
        routed = "num_experts" if e == self.num_experts else "num_routed (FFN + zero-computation experts)"
        if r.kind in TOKEN_CHOICE_KINDS and r.k > e:
            _fail("router.k", r.k, f"must be <= {routed}={e}")
        if e % r.num_groups:
            _fail("router.num_groups", r.num_groups, f"must divide {routed}={e}")
        if r.top_groups is not None and r.k > r.top_groups * (e // r.num_groups):
            _fail("router.k", r.k, f"must be <= router.top_groups * experts per group = "
                                   f"{r.top_groups * (e // r.num_groups)}")
        if r.group_score == "top2_sum" and r.num_groups > 1 and e // r.num_groups < 2:
            _fail("router.group_score", r.group_score, "top2_sum needs at least 2 experts per group")
        if r.kind == "sparse_ot":   # the capped plan needs E * C >= T * k, i.e. a capacity factor >= 1
            for name in ("capacity_factor",) + (("eval_capacity_factor",) if r.balance_in_eval else ()):
                cf = getattr(self.dispatch, name)
                if cf is not None and cf < 1:
                    _fail(f"dispatch.{name}", cf, "router.kind='sparse_ot' needs a capacity factor >= 1 (or None)")

    def _check_layer(self) -> None:
        """The layer kind, its sub-fields and the MoE++ zero-computation experts."""
        _check_choice("layer", self.layer, LAYER_KINDS)
        own = {"soft_slots": "soft", "smear_granularity": "smear", "chain_iterations": "chain"}
        for name, kind in own.items():
            if getattr(self, name) is not None and self.layer != kind:
                _fail(name, getattr(self, name), f"applies to layer={kind!r} only (layer={self.layer!r})")
        if self.soft_slots is not None:
            _check_positive_int("soft_slots", self.soft_slots)
        if not isinstance(self.soft_normalize, bool):
            _fail("soft_normalize", self.soft_normalize, "must be a bool")
        if self.smear_granularity is not None:
            _check_choice("smear_granularity", self.smear_granularity, SMEAR_GRANULARITIES)
        if self.chain_iterations is not None:
            _check_positive_int("chain_iterations", self.chain_iterations)
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        tau = self.zero_computation_tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
            _fail("zero_computation_tau", tau, "must be a finite number >= 0")
        if self.layer in ("soft", "smear"):
            default = RouterConfig()
            for name in ("kind", "gating_residual", "selection_bias", "frozen"):
                if getattr(self.router, name) != getattr(default, name):
                    _fail(f"router.{name}", getattr(self.router, name),
                          f"layer={self.layer!r} has its own soft router; leave router.{name} at its default")
            if self.num_shared_experts:
                _fail("num_shared_experts", self.num_shared_experts, "applies to layer='sparse' or 'chain' only")
        zc = self.num_zero_computation
        if zc:
            name = next(n for n in ("zero_experts", "copy_experts", "constant_experts") if getattr(self, n))
            if self.layer not in ("sparse", "chain"):
                _fail(name, getattr(self, name), f"zero-computation experts need layer='sparse' or 'chain', "
                                                 f"not {self.layer!r}")
            if self.router.kind not in TOKEN_CHOICE_KINDS:
                _fail(name, getattr(self, name), f"zero-computation experts need a token-choice router, "
                                                 f"not router.kind={self.router.kind!r}")
        elif self.zero_computation_tau != 1.0:
            _fail("zero_computation_tau", self.zero_computation_tau, "needs zero-computation experts")

    @property
    def num_zero_computation(self) -> int:
        """Number of MoE++ zero-computation experts (zero + copy + constant)."""
        return self.zero_experts + self.copy_experts + self.constant_experts

    @property
    def num_routed(self) -> int:
        """Number of router outputs: the FFN experts followed by the zero-computation experts."""
        return self.num_experts + self.num_zero_computation

    @property
    def resolved_soft_slots(self) -> int:
        return 1 if self.soft_slots is None else self.soft_slots

    @property
    def resolved_smear_granularity(self) -> str:
        return "example" if self.smear_granularity is None else self.smear_granularity

    @property
    def resolved_chain_iterations(self) -> int:
        return 2 if self.chain_iterations is None else self.chain_iterations

    @property
    def shared_width(self) -> int:
        """Total hidden width of the shared FFN (0 without shared experts)."""
        return self.num_shared_experts * (self.shared_hidden_dim or self.hidden_dim)

    def capacity(self, num_tokens: int, train: bool) -> int:
        """Expert capacity ``C`` for ``num_tokens`` tokens: ``ceil(cf * T * K / E)``, in ``[min_capacity, T]``.

        With zero-computation experts ``E`` is ``num_routed``: balanced routing over all router outputs sends
        ``T * K / num_routed`` copies to each FFN expert.
        """
        cf = self.dispatch.capacity_factor if train else self.dispatch.eval_capacity_factor
        if cf is None:
            return num_tokens
        c = math.ceil(cf * num_tokens * self.router.k / self.num_routed)
        return int(min(max(c, self.dispatch.min_capacity), num_tokens))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        """Builds a config from a (nested) mapping such as an ``ml_collections.ConfigDict``."""
        if not hasattr(d, "items"):
            _fail("MoEConfig", d, "must be a mapping of MoEConfig fields")
        kwargs = _typed_kwargs(cls, dict(d.items()), prefix="")
        for name, sub in (("router", RouterConfig), ("dispatch", DispatchConfig)):
            if name not in kwargs or isinstance(kwargs[name], sub):
                continue
            if not hasattr(kwargs[name], "items"):
                _fail(name, kwargs[name], f"must be a {sub.__name__} or a mapping of its fields")
            kwargs[name] = sub(**_typed_kwargs(sub, dict(kwargs[name].items()), f"{name}."))
        return cls(**kwargs)


def _typed_kwargs(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field of {cls.__name__}; known fields: {sorted(names)}")
    return dict(d)
