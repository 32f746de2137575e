"""Expert parallelism: the MoE dispatch under ``shard_map`` with all-to-all over the ``expert`` mesh axis.

Layout (``n`` = size of the ``expert`` axis, ``E_l = E / n`` local experts, ``S`` token shards = product of
the ``data``, ``fsdp`` and ``expert`` axes present in the mesh):

* tokens x: [T, D] sharded along T over the token axes: each device holds ``T_l = T / S`` tokens, and the
  ``n`` devices of one expert group hold different tokens;
* routing (computed outside, on all tokens, so auxiliary losses and statistics are global) and the capacity
  plan arrive sharded like the tokens;
* expert weights [E, ...] are split over ``expert`` (device ``j`` of the group owns experts
  ``j*E_l .. (j+1)*E_l - 1``) and their ``mlp`` axis over ``tensor`` when the mesh has one (the second
  projection is then a partial sum, reduced with ``psum`` over ``tensor`` before its bias); ``fsdp``-sharded
  ``embed`` axes are gathered by XLA on the way in.

Capacity mode: each device builds the ``[g, E, C, D]`` buffers of its ``g = G / S`` routing groups, an
``all_to_all`` sends expert block ``j`` to device ``j`` (``[g, n, E_l, C, D]``, axis 1 = source), the local
experts run on ``[E_l, n*g*C, D]``, and the reverse ``all_to_all`` brings the outputs home for the combine.

Dropless mode: each device sorts its token copies by expert; a ragged all-to-all sends the rows of expert
block ``j`` to device ``j`` (sizes differ per pair, so offsets are exchanged first with an ``all_gather`` of the
per-expert counts); the receiver re-sorts the rows it got from all sources by local expert, runs the grouped
matmul, un-sorts, and a second ragged all-to-all returns them. ``jax.lax.ragged_all_to_all`` is used where the
backend implements it (TPU, GPU); XLA:CPU does not, so there :func:`ragged_all_to_all_emulated` — the same
semantics built from a padded dense ``all_to_all`` (``n`` times the buffer, exact) — stands in. The native path,
forward and backward, is tested to lower for TPU and CUDA (``tests/test_kernel_lowering.py``) but has not run
on an accelerator here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.dispatch import capacity as capacity_lib
from moejax.dispatch.backends.registry import current_platform
from moejax.dispatch.info import DispatchInfo
from moejax.dispatch.padded_gmm import vary_like
from moejax.dispatch.sorting import group_by_expert, inverse_permutation
from moejax.experts.ffn import ExpertFFN, Padded, Ragged, ffn, ffn_param_shapes
from moejax.parallel.mesh import TOKEN_AXES, token_shards
from moejax.routing.types import Routing

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def expert_mesh() -> Any | None:
    """The current (abstract) mesh if it has an ``expert`` axis of size > 1, else None.

    The trainer enters ``jax.set_mesh(mesh)`` while it traces its steps; :class:`moejax.layers.MoELayer`
    switches to expert-parallel dispatch exactly when this returns a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
        return None
    return mesh


def _token_axes(mesh: Any) -> tuple[str, ...]:
    return tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1) or (EXPERT_AXIS,)


def _tensor_axis(mesh: Any) -> str | None:
    return TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names and mesh.shape[TENSOR_AXIS] > 1 else None


def check_expert_parallel(mesh: Any, num_experts: int, num_tokens: int, groups: int, mode: str) -> None:
    """Errors that name the field when the layer cannot be split over ``mesh`` (raised while tracing)."""
    n = mesh.shape[EXPERT_AXIS]
    if num_experts % n:
        raise ValueError(f"num_experts={num_experts}: must be divisible by the mesh's expert axis ({n} devices)")
    shards = token_shards(mesh)
    if num_tokens % shards:
        raise ValueError(f"x: {num_tokens} routed tokens do not split over the {shards} token shards of the mesh "
                         f"({' x '.join(_token_axes(mesh))})")
    if mode == "capacity" and groups % shards:
        raise ValueError(f"dispatch.groups={groups}: capacity dispatch with expert parallelism needs routing groups "
                         f"divisible by the {shards} token shards (each device holds whole groups); "
                         f"set dispatch.groups={shards} (or a multiple)")


def param_specs(kind: str, use_bias: bool, tensor: str | None, expert: str | None = EXPERT_AXIS) -> dict[str, P]:
    """``shard_map`` specs of the stacked expert parameters: expert -> ``expert`` (None: every device holds all
    experts), mlp -> ``tensor``."""
    axis = {"mlp": tensor, "embed": None}
    return {name: P(expert, *(axis.get(a) for a in axes))
            for name, (_, axes) in ffn_param_shapes(kind, 1, 1, use_bias).items()}


def local_ffn(params: dict[str, jax.Array], x: jax.Array, grouping: Any, *, kind: str, activation: str,
              tensor: str | None) -> jax.Array:
    """The experts' FFN on local parameter shards; with a tensor axis the output projection is ``psum``-ed."""
    out_bias = "b_out" if kind == "mlp" else "b_down"
    y = ffn({k: v for k, v in params.items() if k != out_bias}, x, grouping, kind=kind, activation=activation)
    if tensor is not None:
        y = jax.lax.psum(y, tensor)
    if out_bias in params:
        y = grouping.add_bias(y, params[out_bias])
    return y


def ragged_all_to_all_emulated(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                               send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array,
                               axis_name: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` (one slice per peer) from a padded dense ``all_to_all``.

    operand: [N, ...]; output: [R, ...]; the four int32[n] arrays as in ``ragged_all_to_all``. Each slice is
    padded to N rows, so this moves ``n * N`` rows instead of the ragged total: exact, not economical.
    """
    n_rows = operand.shape[0]
    rows = jnp.arange(n_rows, dtype=jnp.int32)
    padded = jnp.concatenate([operand, jnp.zeros_like(operand)], axis=0)
    chunks = padded[input_offsets[:, None] + rows[None, :]]                                 # [n, N, ...]
    keep = (rows[None, :] < send_sizes[:, None]).reshape(chunks.shape[:2] + (1,) * (operand.ndim - 1))
    chunks = jnp.where(keep, chunks, 0)
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)                    # [n (source), N, ...]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)             # where each source wrote
    dest = jnp.where(rows[None, :] < recv_sizes[:, None], offsets[:, None] + rows[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(received.reshape(-1, *operand.shape[1:]), mode="drop")


def _ragged_a2a(backend_supports: bool):
    return jax.lax.ragged_all_to_all if backend_supports else ragged_all_to_all_emulated


def native_ragged_all_to_all() -> bool:
    """Whether the platform being traced for (the context mesh's devices', else jax's default backend;
    :func:`moejax.dispatch.backends.registry.current_platform`) implements ``ragged-all-to-all`` (XLA:CPU does
    not)."""
    return current_platform() != "cpu"


def capacity_apply(x: jax.Array, plan: capacity_lib.TokenChoicePlan, experts: ExpertFFN, mesh: Any, *,
                   impl: str) -> jax.Array:
    """Expert-parallel capacity dispatch -> experts -> combine.

    x: [T, D]; plan: grouped plan with arrays [G, T/G, K] (:func:`moejax.dispatch.capacity.plan_groups`);
    experts: the stacked expert parameters [E, ...] with their kind and activation. Returns y [T, D], sharded like x.
    """
    params, kind, activation = experts.params, experts.kind, experts.activation
    toks, tensor = _token_axes(mesh), _tensor_axis(mesh)
    n = mesh.shape[EXPERT_AXIS]
    e, c = plan.num_experts, plan.capacity

    def body(x_l, plan_l, params_l):
        g, tg, _ = plan_l.expert_index.shape
        d = x_l.shape[-1]
        buf = jax.vmap(lambda p, xg: capacity_lib.dispatch(p, xg, impl))(plan_l, x_l.reshape(g, tg, d))
        buf = buf.reshape(g, n, e // n, c, d)
        if n > 1:
            buf = jax.lax.all_to_all(buf, EXPERT_AXIS, 1, 1, tiled=True)
        h = buf.transpose(2, 1, 0, 3, 4).reshape(e // n, n * g * c, d)                # [E_l, n*g*C, D]
        y = local_ffn(params_l, h, Padded(), kind=kind, activation=activation, tensor=tensor)
        y = y.reshape(e // n, n, g, c, -1).transpose(2, 1, 0, 3, 4)                   # [g, n, E_l, C, D]
        if n > 1:
            y = jax.lax.all_to_all(y, EXPERT_AXIS, 1, 1, tiled=True)
        y = y.reshape(g, e, c, -1)
        return jax.vmap(lambda p, yg: capacity_lib.combine(p, yg, impl))(plan_l, y).reshape(g * tg, -1)

    plan_spec = jax.tree_util.tree_map(lambda _: P(toks), plan)
    has_bias = "b_out" in params or "b_down" in params
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(toks), plan_spec,
                                                  param_specs(kind, has_bias, tensor, EXPERT_AXIS if n > 1 else None)),
                       out_specs=P(toks))
    return fn(x, plan, params)


def dropless_apply(x: jax.Array, routing: Routing, experts: ExpertFFN, mesh: Any, *, gmm: Any,
                   native_ragged: bool | None = None) -> jax.Array:
    """Expert-parallel dropless dispatch with ragged all-to-all. x: [T, D] -> y [T, D] (nothing dropped).

    experts: the stacked expert parameters [E, ...] with their kind and activation; the local experts use ``gmm``.
    ``native_ragged``: ``jax.lax.ragged_all_to_all`` (True) or the padded emulation (False); default: the native
    one wherever the backend has it (not XLA:CPU)."""
    params, kind, activation = experts.params, experts.kind, experts.activation
    toks, tensor = _token_axes(mesh), _tensor_axis(mesh)
    n = mesh.shape[EXPERT_AXIS]
    e = routing.num_experts
    el = e // n
    a2a = _ragged_a2a(native_ragged_all_to_all() if native_ragged is None else native_ragged)

    def exchange(sent_rows, sizes, params_l):
        """[N, D] rows sorted by expert (``sizes`` [E] of this device) -> their experts' outputs, same order: sent to
        the experts' devices, computed there, sent back."""
        rows_n = sent_rows.shape[0]
        me = jax.lax.axis_index(EXPERT_AXIS)
        counts = jax.lax.all_gather(sizes, EXPERT_AXIS)                                  # [n (src), E]
        blocks = counts.reshape(n, n, el).sum(-1)                                        # [src, dst] rows
        send = blocks[me]
        in_off = jnp.cumsum(send) - send
        out_off = (jnp.cumsum(blocks, axis=0) - blocks)[me]        # where my slice lands on each receiver
        recv = blocks[:, me]
        recv_off = jnp.cumsum(recv) - recv
        # The output buffers vary over the token axes like the rows sent into them: the native ragged all-to-all
        # types its result as its output operand, and a non-varying one breaks the custom VJPs of the grouped
        # matmul kernels downstream (their cotangents do vary).
        got = a2a(sent_rows, vary_like(jnp.zeros((n * rows_n, sent_rows.shape[-1]), sent_rows.dtype), sent_rows),
                  in_off, send, out_off, recv, axis_name=EXPERT_AXIS)                    # [n*N, D] by source
        # Received rows come in (source, local expert) segments; re-sort them by local expert.
        local_counts = jax.lax.dynamic_slice_in_dim(counts, me * el, el, axis=1)         # [n, E_l]
        seg_end = jnp.cumsum(local_counts.reshape(-1))
        seg = jnp.searchsorted(seg_end, jnp.arange(n * rows_n), side="right")
        local_expert = jnp.where(seg < n * el, seg % el, el)
        order2, sizes2, _ = group_by_expert(local_expert, local_expert < el, el)
        y = local_ffn(params_l, got[order2], Ragged(sizes2, gmm), kind=kind, activation=activation, tensor=tensor)
        y = y[inverse_permutation(order2)]
        back_off = jax.lax.all_gather(in_off, EXPERT_AXIS)[:, me]                       # where each source keeps its rows
        return a2a(y, vary_like(jnp.zeros((rows_n, y.shape[-1]), y.dtype), y), recv_off, recv, back_off, send,
                   axis_name=EXPERT_AXIS)                                                # [N, D] in my sorted order

    def body(x_l, expert_index, weight, valid, params_l):
        t_l, k = expert_index.shape
        valid_f = valid.reshape(-1)
        order, sizes, _ = group_by_expert(expert_index.reshape(-1), valid_f, e)       # sizes [E], this device
        sent_rows = x_l[order // k]                                                      # [N, D] sorted by expert
        if n == 1:       # tokens split, experts not (TokenParallel): every expert is here, nothing to exchange
            back = local_ffn(params_l, sent_rows, Ragged(sizes, gmm), kind=kind, activation=activation, tensor=tensor)
        else:
            back = exchange(sent_rows, sizes, params_l)
        w = jnp.where(valid_f, weight.reshape(-1), 0.0)[order].astype(back.dtype)
        return (w[:, None] * back)[inverse_permutation(order)].reshape(t_l, k, -1).sum(1)

    has_bias = "b_out" in params or "b_down" in params
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(P(toks), P(toks), P(toks), P(toks),
                                 param_specs(kind, has_bias, tensor, EXPERT_AXIS if n > 1 else None)),
                       out_specs=P(toks))
    return fn(x, routing.expert_index, routing.weight, routing.valid, params)


def token_mesh() -> Any | None:
    """The current (abstract) mesh if it splits tokens over more than one device (``data``, ``fsdp``) while its
    ``expert`` axis does not split the experts, on an accelerator platform, else None. On CPU (multi-device CPU is
    a test setting) XLA's own partitioning stays: the Pallas kernels run there in the interpreter, which cannot run
    inside ``shard_map`` on varying operands."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_mesh() is not None or current_platform() == "cpu":
        return None
    return mesh if token_shards(mesh) > 1 else None


@dataclasses.dataclass(frozen=True)
class _OnMesh:
    """A dispatcher ``inner`` wrapped to run over ``mesh``; it keeps the inner dispatcher's ``mode``."""

    inner: Any
    mesh: Any

    @property
    def mode(self) -> str:
        return self.inner.mode


@dataclasses.dataclass(frozen=True)
class TokenParallel(_OnMesh):
    """A dispatcher on a mesh that splits the tokens but not the experts (data parallelism, FSDP): each device
    dispatches its own tokens to a whole copy of the experts, under ``shard_map`` (the wrapped dispatcher's
    ``sharded`` form with an expert axis of one device: no all-to-all). Dropless dispatch computes exactly the same
    function; capacity dispatch does when its routing groups are whole on each device.

    Without it XLA partitions the global sort and grouped matmul itself, by gathering every token onto every
    device: each device computed the whole batch's experts (a ``tokamax`` or ``ragged_dot`` gmm all-gathered its
    rows), and moejax's own Mosaic and Triton kernels, which XLA cannot partition, did not compile at all (found
    compiling for TPU with ``moejax.aot``). Where the split does not apply (expert-choice routing, experts without
    stacked parameters, tokens that do not divide over the devices, capacity groups split across devices) the
    wrapped dispatcher runs on the whole batch, as before.
    """

    def __call__(self, x: jax.Array, routing: Any, experts: Any) -> tuple[jax.Array, DispatchInfo]:
        shards = token_shards(self.mesh)
        groups = getattr(self.inner, "groups", 1)
        whole = (isinstance(routing, Routing) and hasattr(experts, "params") and routing.num_tokens % shards == 0
                 and (self.inner.mode != "capacity" or groups % shards == 0))
        if not whole:
            impl = getattr(self.inner, "impl", None)
            if self.inner.mode == "capacity" and groups % shards and impl is not None:
                from moejax.dispatch.backends import CAPACITY
                platform = current_platform()
                if not CAPACITY.resolve(impl, platform).partitionable(platform):
                    raise ValueError(f"dispatch.groups={groups}: capacity_impl={impl!r} runs a kernel per device on "
                                     f"{platform}, so routing groups must be whole on each of the {shards} token "
                                     f"shards; set dispatch.groups={shards} (or a multiple)")
            return self.inner(x, routing, experts)
        return self.inner.sharded(x, routing, experts, self.mesh)


@dataclasses.dataclass(frozen=True)
class ExpertParallel(_OnMesh):
    """A dispatcher wrapped for expert parallelism over ``mesh``: the wrapped dispatcher's ``sharded`` form
    (:func:`capacity_apply`, :func:`dropless_apply`) runs the dispatch, the local experts and the combine under
    ``shard_map``; the statistics come from the global routing and plan, outside it, exactly as on one device.

    ``experts`` must carry its stacked parameters (an :class:`~moejax.experts.ExpertFFN`): they enter the
    ``shard_map`` split over ``expert`` (and ``tensor``).
    """

    def __call__(self, x: jax.Array, routing: Any, experts: Any) -> tuple[jax.Array, DispatchInfo]:
        if not isinstance(routing, Routing):
            raise ValueError("router.kind='expert_choice': not supported with expert parallelism (mesh.expert > 1)")
        if not hasattr(experts, "params"):
            raise ValueError("experts: expert parallelism needs the experts' stacked parameters (an ExpertFFN)")
        check_expert_parallel(self.mesh, routing.num_experts, routing.num_tokens, getattr(self.inner, "groups", 1),
                              self.inner.mode)
        return self.inner.sharded(x, routing, experts, self.mesh)
