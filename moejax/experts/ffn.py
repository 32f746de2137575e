"""Expert FFNs over stacked parameters ``[E, ...]``, written once for every token layout.

An expert function sees tokens already grouped by expert, through a *grouping* that knows how to
multiply them by stacked weights:

* :class:`Padded` — x: [E, C, D_in], one padded buffer per expert (capacity dispatch); batched einsum.
* :class:`Ragged` — x: [M, D_in], rows sorted by expert in contiguous groups of ``group_sizes[E]``
  (dropless dispatch); a pluggable grouped matmul. Rows at or past ``sum(group_sizes)`` belong to no
  expert and must be ignored by the caller.
* :class:`Dense` — x: [T, D_in] with unstacked weights [D_in, D_out] (shared experts, dense baselines).

The expert never sees the router.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """``x * Phi(x)`` (``jax.nn.gelu(x, approximate=False)``) with its derivative ``Phi(x) + x * phi(x)`` written out.

    jax 0.12's JVP of ``erf``/``erfc`` fails inside ``shard_map`` (check_vma) on varying inputs ("Primitive polynomial
    requires varying manual axes to match"; smallest reproducer, jax 0.12.0.1: ``jax.jit(jax.shard_map(jax.grad(lambda
    x: jax.lax.erf(x).sum()), mesh=Mesh(devices, ("e",)), in_specs=P("e"), out_specs=P("e")))(jnp.ones(4))``), which
    the expert-parallel experts are. The forward is jax's own; the derivative uses only ``erfc`` and ``exp`` values.
    """
    return jax.nn.gelu(x, approximate=False)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * jax.lax.erfc(-x * np.sqrt(0.5).astype(x.dtype))
    pdf = jnp.exp(-0.5 * x * x) * np.float32(1.0 / np.sqrt(2.0 * np.pi)).astype(x.dtype)
    return gelu_exact(x), (cdf + x * pdf) * t


ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATION_FNS[name]
    except KeyError:
        raise ValueError(f"activation={name!r}: must be one of {sorted(ACTIVATION_FNS)}") from None


class Grouping(Protocol):
    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array: ...
    def add_bias(self, h: jax.Array, b: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Padded:
    """x: [E, C, D_in] times w: [E, D_in, D_out] -> [E, C, D_out]; bias [E, D_out] broadcast over C."""

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.einsum("ecd,edf->ecf", x, w.astype(x.dtype))

    def add_bias(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return h + b[:, None, :].astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class Ragged:
    """x: [M, D_in] in contiguous expert groups; ``gmm(x, w[E, D_in, D_out], group_sizes[E]) -> [M, D_out]``.

    ``fused``: optionally a whole-FFN implementation ``(x, stacked params, group_sizes, expert_fn) -> [M, D_out]``
    (``expert_fn(one expert's params, rows)``) that :func:`ffn` then uses instead of calling ``gmm`` per
    matmul, e.g. :func:`moejax.dispatch.bulk_ffn.bulk_ffn`.
    """

    group_sizes: jax.Array
    gmm: GroupedMatmul
    fused: Callable[..., jax.Array] | None = None

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return self.gmm(x, w.astype(x.dtype), self.group_sizes)

    def row_expert(self, num_rows: int) -> jax.Array:
        """int32[M]: the expert of each row (rows past the last group are given expert E-1)."""
        ends = jnp.cumsum(self.group_sizes)
        e = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
        return jnp.minimum(e, self.group_sizes.shape[0] - 1)

    def add_bias(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return h + b[self.row_expert(h.shape[0])].astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class Dense:
    """x: [T, D_in] times unstacked w: [D_in, D_out]; bias [D_out]."""

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return x @ w.astype(x.dtype)

    def add_bias(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return h + b.astype(h.dtype)


def ffn(params: dict[str, jax.Array], x: jax.Array, grouping: Grouping, *, kind: str, activation: str) -> jax.Array:
    """The FFN of every expert in ``params`` applied to its group of ``x``.

    ``mlp``: ``act(x W_in + b_in) W_out + b_out``; ``glu``: ``(act(x W_gate + b_gate) * (x W_up + b_up)) W_down
    + b_down``. Biases are used when present in ``params``. Shapes follow the grouping.
    """
    act = activation_fn(activation)
    if isinstance(grouping, Ragged) and grouping.fused is not None:
        def expert_fn(p: dict[str, jax.Array], rows: jax.Array) -> jax.Array:
            return ffn(p, rows, Dense(), kind=kind, activation=activation)
        return grouping.fused(x, params, grouping.group_sizes, expert_fn)

    def linear(h: jax.Array, name: str) -> jax.Array:
        y = grouping.matmul(h, params[f"w_{name}"])
        if f"b_{name}" in params:
            y = grouping.add_bias(y, params[f"b_{name}"])
        return y

    if kind == "mlp":
        return linear(act(linear(x, "in")), "out")
    if kind == "glu":
        return linear(act(linear(x, "gate")) * linear(x, "up"), "down")
    raise ValueError(f"expert_kind={kind!r}: must be 'mlp' or 'glu'")


def ffn_param_shapes(kind: str, d_model: int, hidden: int, use_bias: bool) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Unstacked parameter shapes and logical axis names of one FFN of ``kind``."""
    if kind == "mlp":
        shapes = {"w_in": ((d_model, hidden), ("embed", "mlp")), "w_out": ((hidden, d_model), ("mlp", "embed"))}
        biases = {"b_in": ((hidden,), ("mlp",)), "b_out": ((d_model,), ("embed",))}
    elif kind == "glu":
        shapes = {"w_gate": ((d_model, hidden), ("embed", "mlp")), "w_up": ((d_model, hidden), ("embed", "mlp")),
                  "w_down": ((hidden, d_model), ("mlp", "embed"))}
        biases = {"b_gate": ((hidden,), ("mlp",)), "b_up": ((hidden,), ("mlp",)), "b_down": ((d_model,), ("embed",))}
    else:
        raise ValueError(f"expert_kind={kind!r}: must be 'mlp' or 'glu'")
    return {**shapes, **biases} if use_bias else shapes


def _kernel_init(stacked: bool) -> nn.initializers.Initializer:
    # Fan-in scaling per expert: the leading expert axis is a batch axis, not part of the fan.
    if stacked:
        return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                batch_axis=(0,))
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def make_ffn_params(module: nn.Module, kind: str, d_model: int, hidden: int, use_bias: bool,
                 num_experts: int | None, param_dtype: jnp.dtype) -> dict[str, jax.Array]:
    """Declares the FFN parameters in ``module``'s scope: stacked ``[E, ...]`` if ``num_experts`` else unstacked."""
    params = {}
    for name, (shape, axes) in ffn_param_shapes(kind, d_model, hidden, use_bias).items():
        init = _kernel_init(num_experts is not None) if name.startswith("w_") else nn.initializers.zeros_init()
        if num_experts is not None:
            shape, axes = (num_experts, *shape), ("expert", *axes)
        params[name] = module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
    return params


class ExpertWeights(nn.Module):
    """Declares the stacked parameters of ``num_experts`` FFNs and returns them: ``ExpertWeights(...)(d_model)``.

    ``expert_kind='mlp'``: ``w_in`` float[E, D, F] (expert, embed, mlp), ``w_out`` [E, F, D] (expert, mlp, embed),
    with ``use_bias`` ``b_in`` [E, F], ``b_out`` [E, D]; ``'glu'``: ``w_gate``, ``w_up`` [E, D, F], ``w_down``
    [E, F, D], with ``use_bias`` ``b_gate``, ``b_up`` [E, F], ``b_down`` [E, D]. Calling one instance several times
    returns the same parameters (Chain-of-Experts iterations share their experts this way).
    """

    num_experts: int
    hidden_dim: int
    kind: str = "mlp"
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, d_model: int) -> dict[str, jax.Array]:
        return make_ffn_params(self, self.kind, d_model, self.hidden_dim, self.use_bias, self.num_experts,
                               self.param_dtype)


@dataclasses.dataclass(frozen=True)
class ExpertFFN:
    """The routed experts as a pure function of their stacked parameters: ``ExpertFFN(params, ...)(x, grouping)``.

    What a :class:`~moejax.dispatch.Dispatcher` calls on tokens grouped by expert; expert parallelism hands
    ``params`` to ``shard_map`` and computes the local experts with the same ``kind`` and ``activation``.
    """

    params: dict[str, jax.Array]
    kind: str
    activation: str
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x: jax.Array, grouping: Grouping) -> jax.Array:
        return ffn(self.params, x.astype(self.dtype), grouping, kind=self.kind, activation=self.activation)


def merge_params(stacked: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
    """``{name: sum_e weights[n, e] * stacked[name][e]}``: N merged parameter sets [N, ...] from stacked [E, ...]."""
    return {name: jnp.tensordot(weights.astype(p.dtype), p, axes=(-1, 0)) for name, p in stacked.items()}


class FFN(nn.Module):
    """One (unstacked) FFN over [..., D]: the shared experts of an MoE layer and the dense baseline."""

    hidden_dim: int
    kind: str = "mlp"
    activation: str = "gelu"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        params = make_ffn_params(self, self.kind, x.shape[-1], self.hidden_dim, self.use_bias, None, self.param_dtype)
        return ffn(params, x.astype(self.dtype), Dense(), kind=self.kind, activation=self.activation)
