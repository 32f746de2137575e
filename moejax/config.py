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

from moejax.errors import unknown_field
from moejax.routing import plugin as _plugin
from moejax.routing.config import RouterConfig

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "sigmoid", "identity")
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
        :mod:`moejax.dispatch.bulk_ffn`): ``auto`` (``bulk`` on CPU; ``tokamax`` when installed, else ``ragged_dot``, on GPU/TPU) or a
        name registered in :mod:`moejax.dispatch.gmm` (``bulk``, ``padded``, ``blocked``, ``pallas``,
        ``pallas_triton``, ``ragged_dot``, ``tokamax``, ``reference``).
      gmm_tile: row tile of the ``bulk`` (its overflow blocks) / ``padded`` / ``blocked`` / ``pallas`` grouped
        matmuls: ``'auto'`` (default: ``bulk``'s measured layout rule, :func:`moejax.dispatch.bulk_ffn.layout_rule`;
        64 for the others), an int, or for ``bulk`` a strictly decreasing sequence of overflow tile levels (see
        ``benchmarks/results/`` for measured tiles).
      bulk_slab: ``bulk`` only: slab rows per expert as a fraction of ``M / E`` in (0, 1]; ``'auto'`` (default): the
        rule's when ``gmm_tile='auto'``, else 1 (the whole ``M / E``).
      groups: ``G``, capacity mode: the ``T`` routed tokens are split into ``G`` equal, consecutive groups,
        each with its own buffers of capacity ``C = ceil(cf * (T/G) * K / E)`` (GShard/V-MoE routing
        groups). Under expert parallelism each device holds whole groups, so ``G`` must be a multiple of the
        number of token shards; a single-device run with the same ``G`` computes exactly the same thing.
        Dropless dispatch drops nothing and has no routing groups: there, a ``groups`` other than 1 is an error
        (it would be ignored).
      group_size: capacity mode: routing groups given by their size instead (``G = T / group_size``), e.g. the
        sequence length for one group per sequence; exclusive with ``groups``. A count that happens to divide
        ``T`` can silently build groups that straddle sequences; a size cannot. Dropless dispatch ignores it.
      expert_capacity: an absolute expert capacity ``C`` (per routing group), used in training and evaluation
        instead of the capacity factors (which must then be left at their defaults or None); clipped to the
        tokens of a group.
    """

    mode: DispatchMode = "dropless"
    capacity_impl: CapacityImpl = "index"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 1
    priority: Priority = "position"
    gmm: str = "auto"
    gmm_tile: int | tuple[int, ...] | str = "auto"
    bulk_slab: float | str = "auto"
    groups: int = 1
    group_size: int | None = None
    expert_capacity: int | None = None

    def __post_init__(self) -> None:
        from moejax.dispatch import dispatchers, gmm   # the registries; dispatch does not import this module
        _check_choice("dispatch.mode", self.mode, tuple(sorted(dispatchers.MODES)))
        _check_choice("dispatch.capacity_impl", self.capacity_impl, ("einsum", "index", "pallas", "pallas_triton"))
        _check_capacity_factor("dispatch.capacity_factor", self.capacity_factor)
        _check_capacity_factor("dispatch.eval_capacity_factor", self.eval_capacity_factor)
        _check_positive_int("dispatch.min_capacity", self.min_capacity)
        _check_choice("dispatch.priority", self.priority, ("position", "score"))
        if not isinstance(self.gmm, str) or not self.gmm:
            _fail("dispatch.gmm", self.gmm, "must be a non-empty string")
        _check_choice("dispatch.gmm", self.gmm, tuple(gmm.available()))
        from moejax.dispatch.bulk_ffn import check_slab, check_tile
        if isinstance(self.gmm_tile, list):
            object.__setattr__(self, "gmm_tile", tuple(self.gmm_tile))
        check_tile(self.gmm_tile, "dispatch.gmm_tile")
        check_slab(self.bulk_slab, "dispatch.bulk_slab")
        _check_positive_int("dispatch.groups", self.groups)
        if self.group_size is not None:
            _check_positive_int("dispatch.group_size", self.group_size)
            if self.groups != 1:
                _fail("dispatch.group_size", self.group_size, f"give routing groups by count (dispatch.groups="
                                                              f"{self.groups}) or by size, not both")
        if self.mode == "dropless" and self.groups != 1:
            # Dropless has no capacity buffers to split into groups (Dropless.from_config drops the count).
            _fail("dispatch.groups", self.groups, "ignored by dispatch.mode='dropless' (routing groups split the "
                                                  "capacity buffers, and dropless has none); set dispatch.mode="
                                                  "'capacity' or leave dispatch.groups=1")
        if self.expert_capacity is not None:
            _check_positive_int("dispatch.expert_capacity", self.expert_capacity)
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in ("capacity_factor", "eval_capacity_factor"):
                value = getattr(self, name)
                if value is not None and value != defaults[name]:
                    _fail(f"dispatch.{name}", value, f"dispatch.expert_capacity={self.expert_capacity} sets C; "
                                                     f"leave the capacity factors at their defaults or None")

    def num_groups(self, num_tokens: int, shape: tuple[int, ...] | None = None) -> int:
        """``G`` for ``num_tokens`` routed tokens (1 in dropless mode); a one-line error when it does not divide
        them."""
        if self.mode != "capacity":
            return 1
        if self.group_size is not None:
            if num_tokens % self.group_size:
                raise ValueError(f"dispatch.group_size={self.group_size}: must divide the {num_tokens} tokens routed "
                                 f"together (x shape {shape})")
            return num_tokens // self.group_size
        if num_tokens % self.groups:
            raise ValueError(f"dispatch.groups={self.groups}: must divide the {num_tokens} tokens routed together "
                             f"(x shape {shape})")
        return self.groups


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
        e = self.num_routed
        routed = "num_experts" if e == self.num_experts else "num_routed (FFN + zero-computation experts)"
        layer = _plugin.LayerFacts(num_routed=e, routed_name=routed, k=self.router.k,
                                   capacity_factors=(self.dispatch.capacity_factor, self.dispatch.eval_capacity_factor))
        for part in (self.router.options, *self.router.transforms):
            part.check_layer(layer)

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
            if self.router.kind != "topk":
                _fail("router.kind", self.router.kind, f"layer={self.layer!r} has its own soft router; "
                                                       f"leave router.kind at its default")
            if self.router.transforms:
                t = self.router.transforms[0]
                name = _plugin.field_names(type(t))[0]
                _fail(f"router.{name}", getattr(t, name), f"layer={self.layer!r} has its own soft router; "
                                                          f"router transforms do not apply")
            if self.num_shared_experts:
                _fail("num_shared_experts", self.num_shared_experts, "applies to layer='sparse' or 'chain' only")
        zc = self.num_zero_computation
        if zc:
            name = next(n for n in ("zero_experts", "copy_experts", "constant_experts") if getattr(self, n))
            if self.layer not in ("sparse", "chain"):
                _fail(name, getattr(self, name), f"zero-computation experts need layer='sparse' or 'chain', "
                                                 f"not {self.layer!r}")
            if _plugin.TOKEN_CHOICE not in self.router.options.offers:
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
        """Expert capacity ``C`` for ``num_tokens`` tokens: ``ceil(cf * T * K / E)`` (or ``dispatch.expert_capacity``),
        in ``[min_capacity, T]``.

        With zero-computation experts ``E`` is ``num_routed``: balanced routing over all router outputs sends
        ``T * K / num_routed`` copies to each FFN expert.
        """
        if self.dispatch.expert_capacity is not None:
            return int(min(max(self.dispatch.expert_capacity, self.dispatch.min_capacity), num_tokens))
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
        if "router" in kwargs and not isinstance(kwargs["router"], RouterConfig):
            kwargs["router"] = RouterConfig.from_dict(kwargs["router"])     # a mapping, or a one-line error
        if "dispatch" in kwargs and not isinstance(kwargs["dispatch"], DispatchConfig):
            if not hasattr(kwargs["dispatch"], "items"):
                _fail("dispatch", kwargs["dispatch"], "must be a DispatchConfig or a mapping of its fields")
            kwargs["dispatch"] = DispatchConfig(**_typed_kwargs(DispatchConfig, dict(kwargs["dispatch"].items()),
                                                                "dispatch."))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested fields (router flat, see :meth:`RouterConfig.to_dict`); ``from_dict`` rebuilds the config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["router"] = self.router.to_dict()
        d["dispatch"] = dataclasses.asdict(self.dispatch)
        return d


def _typed_kwargs(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise unknown_field(f"{prefix}{unknown[0]}", names, cls.__name__)
    return dict(d)
