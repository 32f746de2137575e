"""The grouped matmul operation: its backend type and its registry.

``gmm(lhs[M, K], rhs[E, K, N], group_sizes[E]) -> out[M, N]``: rows ``[s_e, s_e + group_sizes[e])`` of ``lhs``
(``s_e`` the exclusive prefix sum) are multiplied by ``rhs[e]``. Rows at or past ``sum(group_sizes)`` belong to no
group and come out as zeros; so do their gradients, and an empty group's weight gradient is exactly zero.
Accumulation is in float32; the result has ``lhs``'s dtype. ``tests/gmm_contract.py`` is this contract as a test
class, subclassed per backend in ``tests/test_gmm_backends.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from moejax.dispatch.backends.registry import ANY, Backend, Operation


DEFAULT_TILE = 64    # the row tile ``dispatch.gmm_tile='auto'`` gives a backend that has no layout rule of its own


@dataclasses.dataclass(frozen=True)
class GmmBackend(Backend):
    """A grouped matmul backend.

    fn: ``(lhs, rhs, group_sizes[, tile=][, interpret=]) -> out``; takes_tile: ``fn`` (and ``fused_ffn``) take the
    row tile ``tile=`` (``dispatch.gmm_tile``; ``'auto'`` gives them ``DEFAULT_TILE``); fused_ffn: ``(x[M, D], stacked
    params, group_sizes, expert_fn[, tile=][, slab=]) -> y``, the same layout running a whole expert FFN at once (the
    MoE layer's experts then use it); tile_levels: ``fused_ffn`` takes ``tile='auto'`` (its own measured rule) or a
    decreasing sequence of tiles, and ``slab=`` (``dispatch.bulk_slab``); ``fn`` then gets the smallest tile of a
    sequence. A backend without it refuses a sequence.
    """

    fn: Callable[..., jax.Array]
    takes_tile: bool = dataclasses.field(default=False, kw_only=True)
    fused_ffn: Callable[..., jax.Array] | None = dataclasses.field(default=None, kw_only=True)
    tile_levels: bool = dataclasses.field(default=False, kw_only=True)

    def _one_tile(self, tile: Any) -> int:
        if tile == "auto":
            return DEFAULT_TILE
        if isinstance(tile, (tuple, list)):
            if not self.tile_levels:
                raise ValueError(f"dispatch.gmm_tile={tuple(tile)}: a sequence of tiles is understood only by a grouped "
                                 f"matmul with tile levels (dispatch.gmm='bulk'), not {self.name!r}; give one int")
            return int(tile[-1])
        return tile

    def _kwargs(self, platform: str, tile: Any) -> dict:
        return {**self._interpret_kwargs(platform), **({"tile": self._one_tile(tile)} if self.takes_tile else {})}

    def bind(self, platform: str, tile: Any = 128) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """``fn`` as a plain ``(lhs, rhs, group_sizes) -> out`` for ``platform`` with row tile ``tile``."""
        kwargs = self._kwargs(platform, tile)
        return functools.partial(self.fn, **kwargs) if kwargs else self.fn

    def bind_fused(self, platform: str, tile: Any = 128, slab: float | str = "auto") -> Callable[..., jax.Array] | None:
        """``fused_ffn`` bound like :meth:`bind` (with tile levels: ``tile`` and ``slab`` as given), or None if the
        backend has none."""
        if self.fused_ffn is None:
            return None
        if self.tile_levels:
            kwargs = {**self._interpret_kwargs(platform), "tile": tuple(tile) if isinstance(tile, list) else tile,
                      "slab": slab}
        else:
            kwargs = self._kwargs(platform, tile)
        return functools.partial(self.fused_ffn, **kwargs) if kwargs else self.fused_ffn


# Aliases: ``auto`` is the measured default per platform (benchmarks/results/): bulk on CPU, where ragged_dot is a
# dense matmul over all experts; on GPU (after tokamax, when installed) moejax's Triton kernel, never ragged_dot,
# which XLA lowers to a dense product over all experts on NVIDIA for the jax versions supported
# (marin-community/marin#7012: ~23 vs ~1,500 TFLOP/s on B200); the Triton kernel compiles for sm_90 (forward and
# both gradients, moejax.aot, tests/test_aot.py) and does only the routed work; ragged_dot on TPU, where XLA has a
# grouped lowering; blocked anywhere else. ``pallas`` is the Pallas kernel of the platform (Mosaic interpreted on CPU).
GMM = Operation(
    "dispatch.gmm", "grouped matmul",
    aliases={"auto": {"cpu": ("bulk", "blocked"), "gpu": ("pallas_triton", "blocked"), "tpu": ("ragged_dot", "blocked"),
                      ANY: ("blocked",)},
             "pallas": {"tpu": ("pallas_mosaic",), "gpu": ("pallas_triton",), "cpu": ("pallas_mosaic",)}},
    hint="'auto'")


def register_gmm_backend(backend: GmmBackend, *, prefer_for: tuple[str, ...] = ()) -> GmmBackend:
    """Makes ``backend`` selectable as ``dispatch.gmm=backend.name``; ``prefer_for``: platforms where ``auto`` tries
    it first (e.g. an optional kernel library, after measuring it faster there). Returns the backend."""
    return GMM.register(backend, prefer_for=prefer_for)


def select_gmm(name: str, platform: str | None = None) -> GmmBackend:
    """The grouped matmul backend for ``dispatch.gmm=name`` on ``platform`` (default: jax's backend), logged once."""
    return GMM.select(name, platform)
