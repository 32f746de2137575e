"""MoE++ zero-computation experts (Jin et al. 2024, *MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts*, arXiv:2410.07348).

Three kinds of expert that cost (almost) no FLOPs, routed by the same router as the FFN experts:

* **zero**: ``E(x) = 0`` (the token skips the layer; with the block's residual it is passed through);
* **copy**: ``E(x) = x``;
* **constant**: ``E(x) = a_1 x + a_2 v`` with ``[a_1, a_2] = softmax(x W_c)``, a learned vector ``v`` [D] and
  a learned ``W_c`` [D, 2] per constant expert (the paper's Eq. for constant experts: the token is replaced,
  partly or wholly, by a trainable vector, with the mixing decided per token).

The router has ``E_ffn + E_zero + E_copy + E_const`` outputs, in that order. :func:`split_routing` cuts a
routing over all of them into the FFN part (what dispatch sees; copies sent to zero-computation experts are
marked invalid there, so they occupy no buffer slot, cost no capacity and no FFN compute) and the
zero-computation part, which :class:`ZeroComputationExperts` evaluates densely (elementwise work and one
``[D, 2]`` projection per constant expert).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.routing.losses import balance_loss, expert_fraction
from moejax.routing.types import Routing


def split_routing(routing: Routing, num_ffn: int) -> tuple[Routing, jax.Array, jax.Array]:
    """Splits a routing over ``E_ffn + E_zc`` router outputs into its FFN and zero-computation parts.

    Args:
      routing: token-choice routing with ``num_experts = E_ffn + E_zc``.
      num_ffn: ``E_ffn``, the number of FFN experts (router outputs ``0 .. E_ffn - 1``).

    Returns:
      ffn_routing: the same routing with ``num_experts = E_ffn`` where only copies sent to FFN experts are
        valid (the others get weight 0 and expert index 0, never read); ``probs`` and ``expert_load`` keep
        their ``E_ffn + E_zc`` columns (dispatch reads neither).
      zc_index: int32[T, K] the zero-computation expert of each slot (``0 .. E_zc - 1``), -1 where none.
      zc_weight: float32[T, K] its combine weight, 0 where none.
    """
    to_ffn = routing.valid & (routing.expert_index < num_ffn)
    to_zc = routing.valid & (routing.expert_index >= num_ffn)
    ffn = routing.replace(expert_index=jnp.where(to_ffn, routing.expert_index, 0), valid=to_ffn,
                          weight=jnp.where(to_ffn, routing.weight, 0.0), num_experts=num_ffn)
    zc_index = jnp.where(to_zc, routing.expert_index - num_ffn, -1)
    return ffn, zc_index, jnp.where(to_zc, routing.weight, 0.0)


def heterogeneous_load_balance(routing: Routing, num_ffn: int, tau: float) -> jax.Array:
    """MoE++'s heterogeneous load-balancing loss ``E * sum_e eta_e f_e P_e`` (``eta_e`` = 1 for FFN experts,
    ``tau`` for zero-computation experts); equal to the Switch loss when ``tau = 1``.

    ``f_e``: fraction of valid copies (before capacity drops) sent to ``e``, no gradient; ``P_e``: mean router
    probability. ``E`` is the number of router outputs.
    """
    e = routing.num_experts
    eta = jnp.where(jnp.arange(e) < num_ffn, 1.0, tau)
    return balance_loss(expert_fraction(routing.expert_index, routing.valid, e), routing.probs, eta)


class ZeroComputationExperts(nn.Module):
    """The zero-computation part of an MoE++ layer: ``sum_k w[t, k] * E_{zc[t, k]}(x_t)``.

    Parameters (only with constant experts): ``vector`` float[E_const, D] (expert, embed), initialised
    ``N(0, 0.02^2)`` (the paper does not state an init; small, like the router, so that a constant expert starts
    close to a scaled copy); ``gate`` float[E_const, D, 2] (expert, embed, None), LeCun normal (the init of a
    ``Dense`` layer).
    """

    num_zero: int
    num_copy: int
    num_constant: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zc_index: jax.Array, zc_weight: jax.Array) -> jax.Array:
        """x: [T, D]; zc_index: int32[T, K] (-1: none), zc_weight: float32[T, K] -> [T, D]."""
        x = x.astype(self.dtype)
        first_copy, first_const = self.num_zero, self.num_zero + self.num_copy
        w = zc_weight.astype(self.dtype)
        is_copy = (zc_index >= first_copy) & (zc_index < first_const)
        y = jnp.sum(jnp.where(is_copy, w, 0.0), axis=-1, keepdims=True) * x              # zero experts add nothing
        if self.num_constant:
            d = x.shape[-1]
            v = self.param("vector", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("expert", "embed")),
                           (self.num_constant, d), self.param_dtype).astype(self.dtype)
            gate = self.param("gate", nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                 batch_axis=(0,)), ("expert", "embed", None)),
                (self.num_constant, d, 2), self.param_dtype).astype(self.dtype)
            # coeff[t, j] = summed weight of slots of token t that chose constant expert j.
            onehot = jax.nn.one_hot(zc_index - first_const, self.num_constant, dtype=self.dtype)   # -ve -> zeros
            coeff = jnp.einsum("tk,tkj->tj", w, onehot)
            alpha = jax.nn.softmax(jnp.einsum("td,jdc->tjc", x, gate), axis=-1)                    # [T, E_c, 2]
            y = y + jnp.einsum("tj,tj->t", coeff, alpha[..., 0])[:, None] * x \
                + jnp.einsum("tj,tj,jd->td", coeff, alpha[..., 1], v)
        return y
