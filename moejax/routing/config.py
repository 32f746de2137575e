"""``RouterConfig``: the chosen router kind, its own options, and an ordered tuple of transforms.

Two ways to write one, equivalent:

* flat, as in an ``ml_collections`` config or on the command line: ``RouterConfig(kind="sinkhorn", k=2,
  balance_iterations=30, jitter_noise=0.01)``. Every field is either common to all kinds (``kind``, ``k``,
  ``scorer``), a field of the chosen kind's options class, of the chosen scorer, or of a registered transform; the
  transforms whose fields are given (and do something) are applied in registration order unless
  ``transforms=("group_limit", "selection_bias", ...)`` names an order;
* typed: ``RouterConfig(kind="topk", options=TopK(renormalize=True), scorer="attention",
  scorer_options=Attention(), transforms=(Jitter(0.01),))``.

``logits`` is the old name of ``scorer`` (``logits='attention'``): configs and workdirs that use it keep working,
and ``config.logits`` reads the scorer's name.

``dataclasses.replace(config, field=value)`` takes flat fields too. A field that belongs to another kind, a
transform the kind cannot take, or an unknown field is a one-line ``ValueError`` naming ``router.<field>`` and the
kind. Reading ``config.<field>`` returns the option or transform
field (a transform that is absent reads as its defaults), so ``config.renormalize`` or ``config.gate_dropout``
work for every kind.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from moejax.errors import unknown_field
from moejax.routing import plugin
from moejax.routing.plugin import RouterKind, Transform, fail
from moejax.routing.scorer import SCORERS, Scorer
import moejax.routing.scorers  # noqa: F401  (registers the built-in scorers)
import moejax.routing.aux_losses  # noqa: F401  (registers the built-in losses)
from moejax.routing.loss import LOSSES, Loss, loss_of_field
_CAPABILITY = {plugin.LEARNED: "routes on learned logits",
               plugin.TOKEN_CHOICE: "is token-choice",
               plugin.SELECTION_LOGITS: "orders experts by (noisy) logits",
               plugin.SELECTION_SCORES: "chooses experts by top-k of scores"}


@dataclasses.dataclass(frozen=True, init=False)
class RouterConfig:
    """How tokens choose experts (or experts choose tokens).

    Attributes:
      kind: a registered router kind (:func:`moejax.routing.plugin.router_kinds`; docs/routing_mechanisms.md).
      k: experts per token (the maximum for dynamic-k kinds; for ``expert_choice`` the average, so that
        ``C = ceil(capacity_factor * T * k / E)`` holds for both).
      scorer: how a learned router scores experts, a registered :class:`~moejax.routing.scorer.Scorer`: ``linear``
        (``x W``), ``attention`` (Yuan 2.0-M32), a paper's own.
      scorer_options: the scorer's own config (an instance of its class).
      options: the kind's own config (an instance of the kind's class, e.g. ``TopK``).
      transforms: the transforms in the order they apply.
      losses: one instance of every registered loss (:mod:`moejax.routing.loss`), each with its weight
        (``load_balance_weight=0.01``, ``z_loss_weight=0.001``, ``importance_weight=0``, ``router_entropy_weight=0``
        by default); those with weight 0 are not computed (:attr:`active_losses`).
    """

    kind: str
    k: int
    scorer: str
    scorer_options: Scorer
    options: RouterKind
    transforms: tuple[Transform, ...]
    losses: tuple[Loss, ...]

    def __init__(self, kind: str = "topk", k: int = 2, scorer: str = "linear", *,
                 scorer_options: Scorer | Mapping[str, Any] | None = None,
                 options: RouterKind | Mapping[str, Any] | None = None,
                 transforms: Sequence[Transform | str | Mapping[str, Any]] | None = None,
                 losses: Sequence[Loss | Mapping[str, Any]] | None = None, **fields: Any) -> None:
        kind_cls = plugin.router_kind(kind)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            fail("k", k, "must be an integer >= 1")
        scorer_field = "scorer"
        if "logits" in fields:         # the old name; it wins over a scorer that dataclasses.replace passes along
            scorer, scorer_field = fields.pop("logits"), "logits"
        scorer_cls = _scorer_class(scorer, scorer_field)
        if isinstance(scorer_options, Mapping):
            fields = {**scorer_options, **fields}
            scorer_options = None
        if isinstance(options, Mapping):
            fields = {**options, **fields}
            options = None
        explicit, listed = _listed_transforms(transforms, fields)
        given_losses = _given_losses(losses, fields)
        own, by_transform, scorer_own, by_loss = _split_fields(kind_cls, scorer_cls, fields)
        if scorer_options is None or type(scorer_options) is not scorer_cls:
            # a replaced scorer name starts from the new scorer's defaults
            scorer_options = scorer_cls(**scorer_own)
        elif scorer_own:
            scorer_options = dataclasses.replace(scorer_options, **scorer_own)
        if options is None:
            options = kind_cls(**own)
        elif not isinstance(options, kind_cls):
            fail("options", options, f"must be a {kind_cls.__name__} for router.kind={kind!r}")
        elif own:      # e.g. dataclasses.replace(config, renormalize=True)
            options = dataclasses.replace(options, **own)
        options.check_router(k)
        chain = _build_transforms(explicit, listed, by_transform)
        for t in chain:
            missing = sorted(t.requires - kind_cls.offers)
            if missing:
                name = _naming_field(t, fields)
                needs = _CAPABILITY.get(missing[0], missing[0])
                fail(name, getattr(t, name), f"transform {t.name!r} needs a router kind that {needs}; "
                                             f"router.kind={kind!r} does not")
        if scorer_cls.name != "linear" and plugin.LEARNED not in kind_cls.offers:
            fail(scorer_field, scorer_cls.name, f"kind={kind!r} has no learned router")
        loss_chain = []
        for name, cls in LOSSES.items():
            base = given_losses.get(name)
            changes = by_loss.get(name, {})
            loss_chain.append(cls(**changes) if base is None else dataclasses.replace(base, **changes))
        for name, value in (("kind", kind), ("k", k), ("scorer", scorer_cls.name), ("scorer_options", scorer_options),
                            ("options", options), ("transforms", tuple(chain)), ("losses", tuple(loss_chain))):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("options", "transforms", "scorer", "scorer_options", "losses"):
            raise AttributeError(name)
        for loss in self.__dict__.get("losses", ()):
            if name in plugin.field_names(type(loss)):
                return getattr(loss, name)
        if name == "logits":         # the old name of the scorer
            return self.__dict__["scorer"]
        for part in (self.__dict__.get("options"), self.__dict__.get("scorer_options")):
            if part is not None and name in plugin.field_names(type(part)):
                return getattr(part, name)
        owner = plugin.transform_of_field(name)
        if owner is not None:
            for t in self.__dict__.get("transforms", ()):
                if isinstance(t, owner):
                    return getattr(t, name)
            return next(f for f in dataclasses.fields(owner) if f.name == name).default
        raise AttributeError(f"RouterConfig of kind {self.__dict__.get('kind')!r} has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Flat fields (what an ``ml_collections`` config writes); ``RouterConfig(**d)`` rebuilds the config."""
        d: dict[str, Any] = {"kind": self.kind, "k": self.k, "scorer": self.scorer}
        d.update(dataclasses.asdict(self.scorer_options))
        d.update(dataclasses.asdict(self.options))
        for t in self.transforms:
            d.update(dataclasses.asdict(t))
        for loss in self.losses:
            d.update(dataclasses.asdict(loss))
        names = [t.name for t in self.transforms]
        if names != [n for n in plugin.transforms() if n in names]:
            d["transforms"] = names
        return d

    @property
    def active_losses(self) -> tuple[Loss, ...]:
        """The losses with a non-zero weight, in registration order."""
        return tuple(loss for loss in self.losses if loss.weight != 0)

    def replace(self, **changes: Any) -> "RouterConfig":
        """A copy with flat fields changed (a new ``kind`` starts from that kind's default options)."""
        d = self.to_dict()
        if "kind" in changes and changes["kind"] != self.kind:
            for name in plugin.field_names(type(self.options)):
                d.pop(name, None)
        if "logits" in changes:
            changes = {**changes, "scorer": changes.pop("logits")}
        if changes.get("scorer", self.scorer) != self.scorer:
            for name in plugin.field_names(type(self.scorer_options)):
                d.pop(name, None)
        return RouterConfig(**{**d, **changes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RouterConfig":
        """From a flat mapping, or the nested one ``dataclasses.asdict`` writes (``options``, ``transforms``)."""
        if not hasattr(d, "items"):
            raise ValueError(f"router={d!r}: must be a RouterConfig or a mapping of its fields")
        return cls(**dict(d.items()))


def _listed_transforms(transforms: Sequence[Any] | None, fields: dict[str, Any]
                       ) -> tuple[dict[str, Transform], list[str]]:
    """Transforms given explicitly (instances) and the order named by ``transforms=``; mappings and names
    contribute their fields to ``fields`` (in place)."""
    explicit: dict[str, Transform] = {}
    order: list[str] = []
    if transforms is None:
        return explicit, order
    if isinstance(transforms, (str, Mapping)) or not isinstance(transforms, Sequence):
        fail("transforms", transforms, "must be a sequence of transform names, Transform configs or mappings")
    for item in transforms:
        if isinstance(item, Transform):
            name = item.name
            explicit[name] = item
        elif isinstance(item, Mapping):
            owners = {plugin.transform_of_field(n) for n in item}
            if len(owners) != 1 or None in owners:
                fail("transforms", dict(item), "a mapping entry must hold the fields of exactly one transform")
            name = owners.pop().name
            fields.update(item)
        else:
            name = plugin.transform(item).name
        if name in order:
            fail("transforms", list(transforms), f"transform {name!r} is listed twice")
        order.append(name)
    return explicit, order


def _scorer_class(scorer: Any, field: str) -> type[Scorer]:
    try:
        return SCORERS.get(scorer)
    except ValueError as e:
        raise ValueError(str(e).replace("router.scorer=", f"router.{field}=", 1)) from None


def _given_losses(losses: Sequence[Any] | None, fields: dict[str, Any]) -> dict[str, Loss]:
    """Losses given explicitly (instances, by name); mappings contribute their fields to ``fields`` (in place)."""
    if losses is None:
        return {}
    if isinstance(losses, (str, Mapping)) or not isinstance(losses, Sequence):
        fail("losses", losses, "must be a sequence of Loss configs or mappings of their fields")
    given: dict[str, Loss] = {}
    for item in losses:
        if isinstance(item, Loss):
            given[item.name] = item
        elif isinstance(item, Mapping):
            fields.update(item)
        else:
            fail("losses", item, "must be a Loss config or a mapping of its fields")
    return given


def _split_fields(kind_cls: type[RouterKind], scorer_cls: type[Scorer], fields: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]]]:
    own_names = plugin.field_names(kind_cls)
    scorer_names = plugin.field_names(scorer_cls)
    own: dict[str, Any] = {}
    scorer_own: dict[str, Any] = {}
    by_transform: dict[str, dict[str, Any]] = {}
    by_loss: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        if name in own_names:
            own[name] = value
            continue
        if name in scorer_names:
            scorer_own[name] = value
            continue
        owner = plugin.transform_of_field(name)
        if owner is not None:
            by_transform.setdefault(owner.name, {})[name] = value
            continue
        loss = loss_of_field(name)
        if loss is not None:
            by_loss.setdefault(loss.name, {})[name] = value
            continue
        kinds = [n for n in plugin.router_kinds() if name in plugin.field_names(plugin.router_kind(n))]
        scorers = [n for n in SCORERS.names() if name in plugin.field_names(SCORERS.get(n))]
        known = sorted({*own_names, *scorer_names, *plugin.COMMON_FIELDS,
                        *(f for t in plugin.transforms().values() for f in plugin.field_names(t)),
                        *(f for c in LOSSES.values() for f in plugin.field_names(c))})
        if kinds:
            fail(name, value, f"not a field of router.kind={kind_cls.name!r} (it belongs to kind(s) {kinds}); "
                              f"this kind's own fields: {list(own_names)}")
        if scorers:
            fail(name, value, f"not a field of router.scorer={scorer_cls.name!r} (it belongs to scorer(s) "
                              f"{scorers}); this scorer's own fields: {list(scorer_names)}")
        raise unknown_field(f"router.{name}", known, f"router.kind={kind_cls.name!r}")
    return own, by_transform, scorer_own, by_loss


def _build_transforms(explicit: dict[str, Transform], order: list[str],
                      by_transform: dict[str, dict[str, Any]]) -> list[Transform]:
    chain: list[Transform] = []
    for name, cls in plugin.transforms().items():
        if name in order:
            continue
        if name in by_transform:
            t = cls(**by_transform[name])
            if not t.is_identity():
                chain.append(t)
    listed = []
    for name in order:
        if name in explicit:      # e.g. dataclasses.replace(config, gate_dropout=0.2) keeps the transform's place
            listed.append(dataclasses.replace(explicit[name], **by_transform.get(name, {})))
        else:
            listed.append(plugin.transform(name)(**by_transform.get(name, {})))
    return [t for t in listed if not t.is_identity()] + chain


def _naming_field(t: Transform, given: Mapping[str, Any]) -> str:
    names = plugin.field_names(type(t))
    return next((n for n in names if n in given), names[0])
