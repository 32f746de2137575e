"""Dispatchers: one small strategy per way of moving tokens to their experts and back.

A :class:`Dispatcher` is called as ``dispatcher(x[T, D], routing, experts) -> (y[T, D], DispatchInfo)``, where
``experts`` computes the expert FFNs on tokens grouped by expert (``experts(x_grouped, grouping)``; an
:class:`~moejax.experts.ExpertFFN` in the layer, any such callable in tests). The built-in ones:

* :class:`Capacity`: ``[E, C, D]`` buffers (in ``G`` routing groups), overflow dropped;
* :class:`Dropless`: copies sorted by expert, a grouped matmul over contiguous groups, un-sorted; with the
  grouped matmul's whole-FFN form (``fused_ffn``, e.g. ``bulk``) the experts run in that layout at once.

Expert parallelism wraps a dispatcher: :class:`moejax.parallel.expert_parallel.ExpertParallel` runs the wrapped
dispatcher's own :meth:`sharded` form under ``shard_map`` (all-to-all over the ``expert`` axis). A dispatcher is
built from config by the class registered for ``dispatch.mode`` (:data:`MODES`, :func:`from_config`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import jax

from moejax.dispatch import capacity as capacity_lib
from moejax.dispatch import dropless
from moejax.dispatch.gmm import GroupedMatmul, get_fused_ffn, get_gmm
from moejax.dispatch.info import DispatchInfo, expert_choice_info, token_choice_info
from moejax.experts.ffn import Padded, Ragged
from moejax.registry import Registry
from moejax.routing.types import AnyRouting, ExpertChoiceRouting, Routing

ExpertFn = Callable[[jax.Array, Any], jax.Array]


class Dispatcher(Protocol):
    mode: ClassVar[str]

    def __call__(self, x: jax.Array, routing: AnyRouting, experts: ExpertFn) -> tuple[jax.Array, DispatchInfo]:
        """x: [T, D] -> (y [T, D], what dispatch measured)."""
        ...


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Fixed-capacity buffers: ``C = capacity`` slots per expert and routing group, overflow dropped.

    capacity: ``C`` for token choice (expert choice carries its own); impl: ``dispatch.capacity_impl``; priority:
    ``position`` or ``score``; groups: ``G`` routing groups of ``T/G`` consecutive tokens, each with its own
    buffers (token choice); the experts see ``[E, G*C, D]``.
    """

    mode: ClassVar[str] = "capacity"
    capacity: int | None = None
    impl: str = "index"
    priority: str = "position"
    groups: int = 1

    def _check(self, routing: AnyRouting) -> None:
        if isinstance(routing, Routing):
            if self.capacity is None:
                raise ValueError("capacity: token-choice capacity dispatch needs the expert capacity C")
            if self.capacity < 1:
                raise ValueError(f"capacity={self.capacity}: must be >= 1")
        elif self.groups > 1:
            raise ValueError(f"dispatch.groups={self.groups}: routing groups apply to token-choice routers only")

    def __call__(self, x: jax.Array, routing: AnyRouting, experts: ExpertFn) -> tuple[jax.Array, DispatchInfo]:
        self._check(routing)
        if self.groups > 1:
            return self._grouped(x, routing, experts)
        plan = capacity_lib.make_plan(routing, self.capacity, self.priority)
        y = experts(capacity_lib.dispatch(plan, x, self.impl), Padded())
        out = capacity_lib.combine(plan, y, self.impl)
        if isinstance(routing, ExpertChoiceRouting):
            return out, expert_choice_info(routing)
        return out, token_choice_info(routing, plan.kept, plan.capacity)

    def _grouped(self, x: jax.Array, routing: Routing, experts: ExpertFn) -> tuple[jax.Array, DispatchInfo]:
        """Buffers [G, E, C, D]; the experts see [E, G*C, D]."""
        t, d = x.shape
        g, c, impl = self.groups, self.capacity, self.impl
        plan = capacity_lib.plan_groups(routing, g, c, self.priority)
        buf = jax.vmap(lambda p, xg: capacity_lib.dispatch(p, xg, impl))(plan, x.reshape(g, t // g, d))
        e = routing.num_experts
        y = experts(buf.transpose(1, 0, 2, 3).reshape(e, g * c, d), Padded())
        y = y.reshape(e, g, c, -1).transpose(1, 0, 2, 3)
        out = jax.vmap(lambda p, yg: capacity_lib.combine(p, yg, impl))(plan, y).reshape(t, -1)
        return out, token_choice_info(routing, plan.kept.reshape(t, -1), c)

    def sharded(self, x: jax.Array, routing: Routing, experts: Any, mesh: Any) -> tuple[jax.Array, DispatchInfo]:
        """The same under expert parallelism (:func:`moejax.parallel.expert_parallel.capacity_apply`)."""
        from moejax.parallel import expert_parallel   # the parallel package builds on dispatch, not the reverse
        self._check(routing)
        plan = capacity_lib.plan_groups(routing, self.groups, self.capacity, self.priority)
        y = expert_parallel.capacity_apply(x, plan, experts, mesh, impl=self.impl)
        return y, token_choice_info(routing, plan.kept.reshape(routing.num_tokens, -1), self.capacity)

    @classmethod
    def from_config(cls, dispatch: Any, capacity: int, groups: int) -> "Capacity":
        return cls(capacity=capacity, impl=dispatch.capacity_impl, priority=dispatch.priority, groups=groups)


@dataclasses.dataclass(frozen=True)
class Dropless:
    """Every copy reaches its expert: sort by expert, grouped matmul ``gmm`` (default ``auto``), un-sort.

    fused_ffn: the grouped matmul's whole-FFN form of the same layout (:func:`moejax.dispatch.get_fused_ffn`), which
    the experts then use instead of one ``gmm`` per matmul; None: the ``gmm`` alone. ``gmm=None`` takes ``auto``
    with its fused form.
    """

    mode: ClassVar[str] = "dropless"
    gmm: GroupedMatmul | None = None
    fused_ffn: Callable[..., jax.Array] | None = None

    def _kernels(self) -> tuple[GroupedMatmul, Callable[..., jax.Array] | None]:
        if self.gmm is None:
            return get_gmm("auto"), self.fused_ffn or get_fused_ffn("auto")
        return self.gmm, self.fused_ffn

    def __call__(self, x: jax.Array, routing: AnyRouting, experts: ExpertFn) -> tuple[jax.Array, DispatchInfo]:
        plan = dropless.make_plan(routing)
        gmm, fused = self._kernels()
        y = experts(dropless.dispatch(plan, x), Ragged(plan.group_sizes, gmm, fused))
        out = dropless.combine(plan, y)
        if isinstance(routing, ExpertChoiceRouting):
            return out, expert_choice_info(routing)
        return out, token_choice_info(routing, routing.valid, routing.num_tokens)

    def sharded(self, x: jax.Array, routing: Routing, experts: Any, mesh: Any) -> tuple[jax.Array, DispatchInfo]:
        """The same under expert parallelism, with ragged all-to-alls; the local experts use the ``gmm``."""
        from moejax.parallel import expert_parallel   # the parallel package builds on dispatch, not the reverse
        y = expert_parallel.dropless_apply(x, routing, experts, mesh, gmm=self._kernels()[0])
        return y, token_choice_info(routing, routing.valid, routing.num_tokens)

    @classmethod
    def from_config(cls, dispatch: Any, capacity: int, groups: int) -> "Dropless":
        del capacity, groups    # nothing is dropped; routing groups only matter for capacity buffers
        return cls(gmm=get_gmm(dispatch.gmm, tile=dispatch.gmm_tile),
                   fused_ffn=get_fused_ffn(dispatch.gmm, tile=dispatch.gmm_tile, slab=dispatch.bulk_slab))


MODES: Registry[Any] = Registry("dispatch mode", "dispatch.mode", name_of=lambda cls: cls.mode)
MODES.add(Capacity)
MODES.add(Dropless)


def register_mode(cls: Any) -> Any:
    """Makes a dispatcher class (``mode``, ``__call__``, ``sharded``, ``from_config``) selectable as
    ``dispatch.mode``."""
    return MODES.add(cls)


def from_config(dispatch: Any, capacity: int, groups: int = 1) -> Dispatcher:
    """The dispatcher of ``dispatch`` (a :class:`~moejax.config.DispatchConfig`) with capacity ``C`` per routing
    group and ``G = groups``; wrapped in :class:`~moejax.parallel.expert_parallel.ExpertParallel` when the current
    mesh has an ``expert`` axis larger than 1, else in :class:`~moejax.parallel.expert_parallel.TokenParallel` when
    it splits the tokens over several devices."""
    from moejax.parallel import expert_parallel
    local = MODES.get(dispatch.mode).from_config(dispatch, capacity, groups)    # the mode: checked by DispatchConfig
    mesh = expert_parallel.expert_mesh()
    if mesh is not None:
        return expert_parallel.ExpertParallel(local, mesh)
    mesh = expert_parallel.token_mesh()
    return local if mesh is None else expert_parallel.TokenParallel(local, mesh)
