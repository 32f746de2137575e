"""The plug-in contract of routing: router kinds and composable transforms, registered by name.

A **router kind** is a frozen, self-validating dataclass whose fields are that kind's own options (validated in
``__post_init__`` with errors named ``router.<field>``) and whose :meth:`RouterKind.route` is the routing rule::

    @register_router
    @dataclasses.dataclass(frozen=True)
    class TempTopK(RouterKind):
        name: ClassVar[str] = "temp_topk"
        temperature: float = 1.0

        def route(self, logits, call):           # logits: float32[T, E] (None for kinds that learn nothing)
            return top_k_routing(logits / self.temperature, call.k)

A **transform** composes with any kind that offers the hook points it needs (``requires``): it changes the
router input (jitter), declares the router kernel (frozen routers), changes the logits (gating residual), the
logits or scores that *select* experts (Gumbel noise, selection bias, group limit), or the finished routing
(gate dropout). A router config is the chosen kind, its options, and an ordered tuple of transforms
(:class:`moejax.routing.config.RouterConfig`). Registering is importing the module that defines the class, so an
experiment directory registers its own kinds from its own files (``experiments/*/``) without editing ``moejax/``.

Capabilities a kind offers (``RouterKind.offers``) and transforms require:
  ``learned``            the kind routes on learned logits ``x W`` (a router kernel exists);
  ``token_choice``       it returns a token-choice :class:`~moejax.routing.Routing` ``[T, K]``;
  ``selection_logits``   it calls :meth:`RouteCall.selection_logits` on the logits that order the experts;
  ``selection_scores``   it calls :meth:`RouteCall.selection_scores` on the scores that choose the experts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax

from moejax.registry import Registry
from moejax.routing.types import AnyRouting, Routing

LEARNED, TOKEN_CHOICE, SELECTION_LOGITS, SELECTION_SCORES = "learned", "token_choice", "selection_logits", \
    "selection_scores"


def fail(field: str, value: Any, why: str) -> None:
    """Raises the project's config error: ``router.<field>=<value!r>: <why>``."""
    raise ValueError(f"router.{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class LayerFacts:
    """What a router kind or transform may check against the layer it serves (at config time).

    num_routed: router outputs (FFN + zero-computation experts); routed_name: how errors name that number;
    k: ``router.k``; capacity_factors: the dispatch's (training, evaluation) capacity factors (None: unlimited).
    """

    num_routed: int
    routed_name: str
    k: int
    capacity_factors: tuple[float | None, float | None]


@dataclasses.dataclass(frozen=True)
class RouteCall:
    """Everything a routing rule may use besides the logits, for one call of the router.

    Attributes:
      module: the :class:`~moejax.routing.Router` (for ``make_rng('jitter')``, variables in ``moe_state``).
      train: True when not ``deterministic`` (training-only randomness, training capacity factor).
      k: experts per token for this call (``router.k`` or the layer's static override).
      capacity: the expert capacity ``C`` of this call (None where the dispatch has none).
      num_experts: ``E`` router outputs; num_tokens: ``T``.
      token_ids: int[T] or None (hash routers).
      prev_logits: float32[T, E] the previous MoE layer's router logits or None (gating residual).
      transforms: the router's transforms, in order.

    A transform that keeps state between its hooks keeps it in the module's variables (:func:`expert_state`,
    ``call.module.get_variable``), not in the call.
    """

    module: Any
    train: bool
    k: int
    capacity: int | None
    num_experts: int
    num_tokens: int
    token_ids: jax.Array | None
    prev_logits: jax.Array | None
    transforms: tuple["Transform", ...]

    def selection_logits(self, logits: jax.Array) -> jax.Array:
        """float32[T, E]: the logits that order the experts after every transform's selection-logit hook."""
        for t in self.transforms:
            logits = t.on_selection_logits(logits, self)
        return logits

    def selection_scores(self, scores: jax.Array) -> jax.Array:
        """float32[T, E]: the scores that choose the experts after every transform's selection-score hook."""
        for t in self.transforms:
            scores = t.on_selection_scores(scores, self)
        return scores

    def rng(self) -> jax.Array:
        """A fresh key from the ``'jitter'`` stream (training randomness of routers)."""
        return self.module.make_rng("jitter")


class RouterKind:
    """Base of router-kind config dataclasses; subclasses set ``name`` and implement :meth:`route`.

    Class attributes: ``name`` (the ``router.kind`` string), ``offers`` (capabilities, see the module doc),
    ``dynamic_k`` (a token may use fewer than ``k`` experts: parameter counts report a mean), ``needs_capacity``
    (``route`` reads ``call.capacity``).
    """

    name: ClassVar[str] = ""
    offers: ClassVar[frozenset[str]] = frozenset({LEARNED, TOKEN_CHOICE})
    dynamic_k: ClassVar[bool] = False

    def route(self, logits: jax.Array | None, call: RouteCall) -> AnyRouting:
        """logits float32[T, E] (None unless ``learned``) -> the routing of the ``T`` tokens."""
        raise NotImplementedError

    def check_router(self, k: int) -> None:
        """Cross-checks against the router's common fields (``router.k``); raise via :func:`fail`."""

    def check_layer(self, layer: LayerFacts) -> None:
        """Cross-checks against the layer (``k`` against the number of experts, capacity); raise via :func:`fail`.

        By default ``k <= num_routed`` (for expert choice ``k`` is the mean number of experts per token, which cannot
        exceed them either)."""
        if layer.k > layer.num_routed:
            fail("k", layer.k, f"must be <= {layer.routed_name}={layer.num_routed}")


class Transform:
    """Base of transform config dataclasses: every hook is the identity unless overridden.

    Class attributes: ``name``; ``requires`` (capabilities the kind must offer); ``enabled_by`` (the field whose
    non-default value turns the transform on when a router config is given as flat fields).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

    def on_input(self, x: jax.Array, call: RouteCall) -> jax.Array:
        """x: float32[T, D] the router input, before the logits are computed."""
        return x

    def make_kernel(self, module: Any, name: str, init: Callable, shape: tuple[int, ...], dtype: Any
                    ) -> jax.Array | None:
        """A router projection ``name`` declared by the transform instead of as a param (None: not handled)."""
        return None

    def on_logits(self, logits: jax.Array, call: RouteCall) -> jax.Array:
        return logits

    def on_selection_logits(self, logits: jax.Array, call: RouteCall) -> jax.Array:
        return logits

    def on_selection_scores(self, scores: jax.Array, call: RouteCall) -> jax.Array:
        return scores

    def on_routing(self, routing: Routing, call: RouteCall) -> Routing:
        return routing

    def check_layer(self, layer: LayerFacts) -> None:
        return None

    def is_identity(self) -> bool:
        """True when the transform's fields make it do nothing (then a flat config leaves it out)."""
        return False


KINDS: Registry[type[RouterKind]] = Registry("router kind", "router.kind")
TRANSFORMS: Registry[type[Transform]] = Registry("transform", "router.transforms")
# ``logits`` is the old name of ``scorer`` (configs and workdirs written before scorers were plug-ins).
COMMON_FIELDS = ("kind", "k", "scorer", "logits", "transforms", "losses")


def expert_state(call: RouteCall, name: str, field: str, what: str) -> Any:
    """The router's non-gradient float32[E] variable ``moe_state/<name>`` (zeros at init), for transforms that keep
    per-expert state there (selection bias, steering offsets). Applying without the collection is an error naming
    it: a missing variable would silently route as if it were zero."""
    import jax.numpy as jnp
    module = call.module
    if not module.is_initializing() and not module.has_variable("moe_state", name):
        raise ValueError(f"moe_state: router.{field}=True keeps its {what} in the 'moe_state' collection; pass the "
                         f"variables' 'moe_state' to apply() (e.g. {{'params': ..., 'moe_state': ...}})")
    return module.variable("moe_state", name, jnp.zeros, (call.num_experts,), jnp.float32)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def check_new_fields(cls: type, owner: str, replacing: str) -> None:
    """Refuses a plug-in whose field names are taken, so that every flat router field has one owner: the router's
    common fields, any transform or loss, and the kinds or scorers (one of each is chosen per router, so two
    kinds, or two scorers, may share a field name; a kind and a scorer may not). ``replacing``: the name being
    (re-)registered, whose own earlier definition does not count."""
    from moejax.routing.loss import LOSSES
    from moejax.routing.scorer import SCORERS
    mine = _registry_of(cls)
    taken = {n: "the router itself" for n in COMMON_FIELDS}
    for registry in (KINDS, TRANSFORMS, SCORERS, LOSSES):
        if registry is mine and registry in (KINDS, SCORERS):
            continue
        for name, other in registry.items():
            if registry is mine and name == replacing:
                continue
            for n in field_names(other):
                taken.setdefault(n, f"{registry.what} {name!r}")
    for n in field_names(cls):
        if n in taken:
            raise ValueError(f"{owner}: field {n!r} is already a field of {taken[n]}; choose another name")


def _registry_of(cls: type) -> Registry:
    from moejax.routing.loss import LOSSES, Loss
    from moejax.routing.scorer import SCORERS
    if issubclass(cls, Loss):
        return LOSSES
    return KINDS if issubclass(cls, RouterKind) else TRANSFORMS if issubclass(cls, Transform) else SCORERS


def register_router(cls: type[RouterKind]) -> type[RouterKind]:
    """Class decorator: makes a frozen dataclass subclass of :class:`RouterKind` selectable as ``router.kind``."""
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, RouterKind) and cls.name):
        raise TypeError(f"register_router: {cls!r} must be a dataclass subclass of RouterKind with a name")
    check_new_fields(cls, f"router kind {cls.name!r}", replacing=cls.name)
    return KINDS.add(cls)


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator: registers a frozen dataclass subclass of :class:`Transform` under ``cls.name``."""
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Transform) and cls.name):
        raise TypeError(f"register_transform: {cls!r} must be a dataclass subclass of Transform with a name")
    check_new_fields(cls, f"transform {cls.name!r}", replacing=cls.name)
    return TRANSFORMS.add(cls)


def router_kind(name: Any) -> type[RouterKind]:
    """The registered kind class ``router.kind=name``; a one-line error naming the registered kinds."""
    return KINDS.get(name)


def transform(name: Any) -> type[Transform]:
    return TRANSFORMS.get(name)


def router_kinds() -> list[str]:
    return KINDS.names()


def transforms() -> dict[str, type[Transform]]:
    """Registered transforms in registration order (the order a flat config applies them in)."""
    return dict(TRANSFORMS.items())


def transform_of_field(name: str) -> type[Transform] | None:
    for t in TRANSFORMS.values():
        if name in field_names(t):
            return t
    return None
