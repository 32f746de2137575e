"""A router that is never trained (SMoE-Dropout, Chen et al. 2023): its projections live in ``moe_state``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax

from moejax.routing import plugin


@plugin.register_transform
@dataclasses.dataclass(frozen=True)
class Frozen(plugin.Transform):
    """``frozen``: the router kernel (and the attention router's key/value kernels) is randomly initialised and
    kept in ``moe_state/<name>`` instead of ``params``, so neither gradients nor weight decay touch it; it is
    checkpointed with the rest of the non-gradient state."""

    name: ClassVar[str] = "frozen"
    requires: ClassVar[frozenset[str]] = frozenset({plugin.LEARNED})
    frozen: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.frozen, bool):
            plugin.fail("frozen", self.frozen, "must be a bool")

    def is_identity(self) -> bool:
        return not self.frozen

    def make_kernel(self, module: Any, name: str, init: Callable, shape: tuple[int, ...], dtype: Any
                    ) -> jax.Array | None:
        if not self.frozen:
            return None
        # A non-param variable: the optimiser never sees it, so it stays at its random init.
        kernel = module.variable("moe_state", name, lambda: nn.unbox(init(module.make_rng("params"), shape, dtype)))
        return jax.lax.stop_gradient(kernel.value)
