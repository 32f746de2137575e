"""Weight-only quantization for measuring quality: symmetric round-to-nearest per output channel ("fake quant").

MoQE (Kim et al. 2023, *Mixture of Quantized Experts*): "expert layers in MoE models are much more robust to the
quantization than conventional feedforward networks (FFN) layers". To measure such claims, :func:`quantize_tree`
replaces chosen weight matrices of a parameter tree by their quantized-then-dequantized values (same dtypes, so
the result is an ordinary checkpoint that every moejax tool runs), and :func:`quantization_error` reports how far
they moved.

:func:`quantize`: ``scale = max|w| / (2^(bits-1) - 1)`` over the input axes of each output channel, ``q =
clip(round(w / scale), -qmax, qmax)``, returns ``q * scale`` in ``w``'s dtype. Symmetric, so zero maps to zero;
``bits = 2`` is ternary ``{-1, 0, 1} * scale``; 16 bits (steps of ``max|w| / 32767``) is a control.

Which axes are "input" in a moejax tree (:func:`input_axes`): FFN and expert matrices ``w_*`` reduce over their
second-to-last axis (``[D, F]``, ``[F, D]``, stacked ``[E, D, F]``: one scale per expert and output neuron);
``kernel`` leaves reduce over their leading axis (``nn.Dense`` ``[in, out]``, attention ``query``/``key``/``value``
``[D, H, Dh]``: one scale per head channel), except an attention ``out`` projection ``[H, Dh, D]`` (axes 0 and 1)
and convolution kernels (every axis but the last).

Selectors (``select(path) -> bool`` over the ``'/'``-joined path of a leaf, e.g.
``params/decoder/block_1/ffn/experts/w_in``; they accept only weight matrices: leaves named ``kernel`` or ``w_*``):

* :func:`experts_only`: the routed experts (``.../experts/w_*``) of every MoE layer (sparse, soft, SMEAR, chain).
* :func:`dense_ffn_only`: the dense FFN layers: ``w_*`` not under ``experts/`` or ``shared/`` (the LM's
  ``block_i/ffn/w_*`` of dense blocks, the MLP classifier's ``layer_i/w_*`` of dense layers).
* :func:`shared_experts_only`: the shared experts (``.../shared/w_*``), which are in neither of the two above: they
  are dense FFNs that every token passes through, but live inside MoE layers, and mixing them into either set
  would blur the MoQE comparison; measure them on their own.
* :func:`all_weights`: every ``kernel`` and ``w_*`` outside embeddings: attention projections, dense FFNs,
  routed and shared experts, routers, the shared-expert gate, the classifier ``input`` and ``head`` kernels.
  Not quantized: norms' ``scale``/``bias``, every bias, the token embedding ``embed/embedding``, the ViT's
  ``patch_embed``, ``pos_embedding`` and ``cls_token``, soft-MoE ``phi`` and other non-matrix leaves.

A real int8 path. ``qwix`` (Google's JAX quantization library, installed here as a dependency of tokamax; not a
moejax dependency) would store weights as ``QArray`` (int8 ``qvalue`` + per-channel ``scale``) and compute with
int8 operands: ``qwix.quantize(w, jnp.int8, channelwise_axes=(0, 2))`` on an ``[E, D, F]`` stack gives the same
per-expert, per-output-channel layout as here (its symmetric bound is ``qmax + 0.5``, i.e. ``scale =
max|w| / 127.5``, so values can differ from ours by one step). What it buys: 2x less expert memory than bf16 (4x vs
float32) in HBM and in checkpoints, and int8 matmuls where the hardware has them (TPU v5e+, recent NVIDIA GPUs),
i.e. the memory/latency side of MoQE that fake quant cannot show. Wiring: qwix either intercepts
``jnp.einsum``/``dot_general``/``ragged_dot`` inside modules matched by a ``QtRule``/``PtqProvider``
(``qwix.quantize_model`` + ``qwix.quantize_params``), which does not reach moejax's experts because they are used
by the dispatcher outside :class:`~moejax.experts.ExpertWeights` and the Pallas/XLA grouped matmuls are not
intercepted, or is called explicitly: an ``int8`` expert kind whose :class:`~moejax.experts.ffn.Padded` and
``Ragged`` groupings call ``qwix.einsum``/``qwix.ragged_dot`` on the ``QArray`` (and a checkpoint format holding
``qvalue``/``scale``). That is a new expert/dispatch backend, measured like any other kernel, not part of this file.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 3, 4, 8, 16)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r}: must be one of {list(BITS)}")


def _normalize_axes(axis: int | Iterable[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes or any(isinstance(a, bool) or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"axis={axis!r}: must be one or more axes of w, which has rank {ndim}")
    return tuple(sorted({a % ndim for a in axes}))


def quantize(w: jax.Array, bits: int, axis: int | tuple[int, ...]) -> jax.Array:
    """``w`` quantized to ``bits`` (symmetric round-to-nearest) and dequantized, in ``w``'s dtype and shape.

    ``axis``: the input (contracted) axis or axes; one scale ``max|w| / (2^(bits-1) - 1)`` is taken over them for
    every index of the other axes (each output channel, and each expert of a stacked ``[E, D, F]`` with
    ``axis=1``). An all-zero channel stays zero. ``bits`` in ``{2, 3, 4, 8, 16}``.
    """
    _check_bits(bits)
    w = jnp.asarray(w)
    axes = _normalize_axes(axis, w.ndim)
    qmax = 2 ** (bits - 1) - 1
    x = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)        # a zero channel: any scale maps it to zero
    q = jnp.clip(jnp.round(x / scale), -qmax, qmax)
    return (q * scale).astype(w.dtype)


def _segments(path: str) -> tuple[list[str], str]:
    parts = path.split("/")
    return parts[:-1], parts[-1]


def _is_weight(leaf: str) -> bool:
    return leaf == "kernel" or leaf.startswith("w_")


def experts_only(path: str) -> bool:
    """The routed experts' matrices: ``.../experts/w_*``."""
    parents, leaf = _segments(path)
    return _is_weight(leaf) and "experts" in parents


def shared_experts_only(path: str) -> bool:
    """The shared experts' matrices: ``.../shared/w_*``."""
    parents, leaf = _segments(path)
    return _is_weight(leaf) and "shared" in parents


def dense_ffn_only(path: str) -> bool:
    """The dense FFN layers' matrices: ``w_*`` not under ``experts/`` or ``shared/``."""
    parents, leaf = _segments(path)
    return leaf.startswith("w_") and "experts" not in parents and "shared" not in parents


def all_weights(path: str) -> bool:
    """Every ``kernel`` and ``w_*`` outside embeddings (no parent segment containing ``embed``)."""
    parents, leaf = _segments(path)
    return _is_weight(leaf) and not any("embed" in p for p in parents)


def input_axes(path: str, ndim: int) -> tuple[int, ...]:
    """The input axes of the weight at ``path`` (rank ``ndim``), over which one quantization scale is shared."""
    parents, leaf = _segments(path)
    if leaf.startswith("w_"):
        return (ndim - 2,)                   # [.., in, out]; a leading expert axis stays per expert
    if ndim >= 4:
        return tuple(range(ndim - 1))        # convolution [kh, kw, C_in, C_out]
    if ndim == 3 and parents and parents[-1] == "out":
        return (0, 1)                        # attention output projection [H, Dh, D]
    return (0,)                              # nn.Dense [in, out]; query/key/value [D, H, Dh]


def _path(keys: tuple[Any, ...]) -> str:
    # Only dict keys name a parameter; a boxed leaf (nn.LogicallyPartitioned) adds an attribute key, skipped.
    return "/".join(str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey))


def _selected(path: str, leaf: Any, select: Callable[[str], bool]) -> bool:
    return (select(path) and hasattr(leaf, "ndim") and leaf.ndim >= 2
            and jnp.issubdtype(leaf.dtype, jnp.floating))


def quantize_tree(params: Any, bits: int, *, select: Callable[[str], bool]) -> Any:
    """``params`` (a nested Flax param tree, boxed or not) with every floating matrix whose ``'/'``-joined path
    ``select`` accepts replaced by :func:`quantize` over its :func:`input_axes`; everything else is returned as is.
    Same structure, shapes and dtypes."""
    _check_bits(bits)

    def one(keys: tuple[Any, ...], leaf: Any) -> Any:
        path = _path(keys)
        if not _selected(path, leaf, select):
            return leaf
        return quantize(leaf, bits, input_axes(path, leaf.ndim))

    return jax.tree_util.tree_map_with_path(one, params)


def quantization_error(params: Any, qparams: Any, select: Callable[[str], bool]) -> dict[str, Any]:
    """How far the selected matrices moved: ``{"relative_error": |Q - W| / |W| over all of them together
    (Frobenius), "num_params": int, "per_param": {path: |Q - W| / |W| of that matrix}}``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    qleaves = jax.tree_util.tree_flatten_with_path(qparams)[0]
    if [_path(k) for k, _ in leaves] != [_path(k) for k, _ in qleaves]:
        raise ValueError("qparams: not the same tree as params")
    per_param, err2, norm2, count = {}, 0.0, 0.0, 0
    for (keys, w), (_, q) in zip(leaves, qleaves):
        path = _path(keys)
        if not _selected(path, w, select):
            continue
        w64, q64 = np.asarray(w, np.float64), np.asarray(q, np.float64)
        e2, n2 = float(np.sum((q64 - w64) ** 2)), float(np.sum(w64 ** 2))
        per_param[path] = float(np.sqrt(e2 / n2)) if n2 > 0 else 0.0
        err2, norm2, count = err2 + e2, norm2 + n2, count + w64.size
    return {"relative_error": float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0, "num_params": count,
            "per_param": per_param}
