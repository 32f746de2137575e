"""The config-facing grouped matmul API: ``dispatch.gmm=name`` -> a ``gmm(lhs, rhs, group_sizes)`` function.

Thin wrappers over the selection of :mod:`moejax.dispatch.backends.gmm` (one file per backend, each declaring its
platforms; the contract is in :mod:`moejax.dispatch.backends.gmm.base`): :func:`get_gmm` and :func:`get_fused_ffn`
select the backend for jax's current platform (logged once) and bind its row tile and, for the Pallas kernels,
interpret mode (on CPU). Names: ``auto`` (``bulk`` on CPU; ``tokamax`` if installed, then ``pallas_triton`` on GPU, ``ragged_dot`` on TPU;
``blocked`` elsewhere), ``tokamax``,
``bulk``, ``padded``, ``blocked``, ``pallas`` (the Pallas kernel of the platform: Mosaic on TPU, Triton on GPU,
Mosaic in the interpreter on CPU), ``pallas_mosaic``, ``pallas_triton``, ``ragged_dot``, ``reference``, and any
name added with :func:`register_gmm`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from moejax.dispatch.backends.gmm import GMM, GmmBackend, select_gmm
from moejax.dispatch.backends.gmm.blocked import gmm_blocked, work_items as _work_items  # noqa: F401 (compat)
from moejax.dispatch.backends.gmm.ragged_dot import gmm_ragged_dot  # noqa: F401 (compat)
from moejax.dispatch.backends.registry import ANY, current_platform
from moejax.experts.ffn import GroupedMatmul


def register_gmm(name: str, fn: Callable[..., jax.Array], *, takes_tile: bool = False,
                 fused_ffn: Callable[..., jax.Array] | None = None, platforms: tuple[str, ...] = (ANY,)) -> None:
    """Makes ``fn`` selectable as ``dispatch.gmm=name``; ``takes_tile`` passes ``tile=`` from config (to both).

    ``fused_ffn`` ``(x, stacked params, group_sizes, expert_fn) -> y``: the same layout running a whole expert
    FFN at once, which the MoE layer's experts then use (see :func:`get_fused_ffn`). ``platforms``: where ``fn``
    runs (default: anywhere). The full form is :func:`moejax.dispatch.backends.register_gmm_backend`.
    """
    GMM.register(GmmBackend(name, fn, platforms=tuple(platforms), takes_tile=takes_tile, fused_ffn=fused_ffn))


def available() -> list[str]:
    """Every ``dispatch.gmm`` name: the registered backends and the aliases ``auto`` and ``pallas``."""
    return GMM.names()


def resolve_name(name: str, backend: str | None = None) -> str:
    """The backend that ``name`` stands for on platform ``backend`` (default: jax's backend)."""
    return GMM.resolve(name, backend).name


def get_gmm(name: str = "auto", *, tile: Any = 128) -> GroupedMatmul:
    """The grouped matmul for ``dispatch.gmm=name`` on jax's current platform, with row tile ``tile``."""
    platform = current_platform()
    return select_gmm(name, platform).bind(platform, tile)


def get_fused_ffn(name: str = "auto", *, tile: Any = 128, slab: float | str = "auto") -> Callable[..., jax.Array] | None:
    """The whole-FFN form of ``dispatch.gmm=name`` (None if it has none), e.g. ``bulk``'s
    :func:`~moejax.dispatch.bulk_ffn.bulk_ffn` (``tile``: ``dispatch.gmm_tile``, ``slab``: ``dispatch.bulk_slab``)."""
    platform = current_platform()
    return select_gmm(name, platform).bind_fused(platform, tile, slab)


__all__ = ["GroupedMatmul", "available", "get_fused_ffn", "get_gmm", "gmm_blocked", "gmm_ragged_dot", "register_gmm",
           "resolve_name"]
