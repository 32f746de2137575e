"""Compressing a layer's experts: per-expert low rank (SVD) and a shared-basis joint decomposition.

Both functions return the experts in their dense form (same keys, shapes and dtypes, biases untouched), so the
compressed model is an ordinary moejax model whose quality can be measured directly;
:func:`compression_ratio` reports the parameter count the factorised form would need.

* :func:`low_rank`: every expert matrix ``W_e`` [A, B] (``w_in``/``w_gate``/``w_up`` [D, F], ``w_out``/``w_down``
  [F, D]) is replaced by its best rank-``r`` approximation (truncated SVD, Eckart-Young), independently per
  expert: ``E * r * (A + B)`` parameters per name instead of ``E * A * B``. MC-SMoE's "compress" step
  decomposes merged experts into low-rank plus structured-sparse parts (LoSparse); this is the low-rank part.
* :func:`shared_basis`: one basis ``U`` float[D, r] per parameter name, shared by all ``E`` experts of the layer,
  on the model-width side ``D``. ``D`` is the only axis whose coordinates mean the same thing in every expert
  (the residual stream); the hidden axis ``F`` of each expert can be permuted at will, so a basis over ``F``
  shared across experts would be arbitrary. For the input matrices ``W_e`` [D, F] the experts are concatenated
  along their output axis, ``M = [W_1 | ... | W_E]`` [D, E*F], ``U`` is ``M``'s top-``r`` left singular vectors and
  ``W_e ~ U (U^T W_e)``: tokens are projected once, ``x U`` [T, r], for all experts. For the output matrices
  ``W_e`` [F, D] the same basis of the ``D`` side comes from stacking along their input axis, ``M = [W_1; ...;
  W_E]`` [E*F, D] (its top-``r`` right singular vectors), and ``W_e ~ (W_e U) U^T``: every expert writes into the
  same ``r``-dimensional subspace, lifted once. ``U`` is the rank-``r`` subspace of ``R^D`` that keeps the most
  squared Frobenius norm of all experts' matrices together (the joint Eckart-Young optimum for a common
  projection); each expert keeps its own coefficients ``U^T W_e`` [r, F]. Parameters per name:
  ``D * r + E * r * F`` instead of ``E * D * F``. This is the joint SVD of concatenated expert weights with a
  shared ``U`` and expert-specific coefficients that Sub-MoE (2025) calls "Experts Union
  Decomposition", here over a whole layer and without merging the coefficients (merging is :mod:`.merge`'s job).

SVDs run in float32 (as jax arrays, on whatever device holds them) and results are cast back to each input dtype.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moejax.surgery.merge import INPUT_MATRICES, OUTPUT_MATRICES

Experts = Mapping[str, jax.Array]
METHODS = ("low_rank", "shared_basis")


def _matrices(experts: Experts) -> dict[str, jax.Array]:
    """The stacked weight matrices ``[E, A, B]`` of ``experts`` (biases ``[E, A]`` are left alone)."""
    mats = {name: jnp.asarray(w) for name, w in experts.items() if jnp.ndim(w) == 3}
    if not mats:
        raise ValueError(f"experts: no stacked matrix [E, A, B] among {sorted(experts)}")
    return mats


def _check_rank(rank: int, limit: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
        raise ValueError(f"rank={rank!r}: must be an integer in [1, {limit}] ({what})")


def _check_low_rank(mats: Mapping[str, jax.Array], rank: int) -> None:
    _check_rank(rank, min(min(w.shape[1:]) for w in mats.values()), "the smallest side of the expert matrices")


def _check_shared_rank(mats: Mapping[str, jax.Array], rank: int) -> None:
    shapes = [_to_input_side(name, w).shape for name, w in mats.items()]          # (E, D, F) each
    _check_rank(rank, min(min(d, e * f) for e, d, f in shapes), "min(D, E*F) of the expert matrices")


def truncated(w: jax.Array, rank: int) -> jax.Array:
    """float32[..., A, B]: the best rank-``rank`` approximation of each trailing matrix of ``w`` (truncated SVD)."""
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]


def low_rank(experts: Experts, rank: int) -> dict[str, jax.Array]:
    """Every expert matrix replaced by its best rank-``rank`` approximation (per expert, per matrix).

    experts: ``{name: [E, ...]}``; matrices are the 3-D arrays (``[E, D, F]``, ``[E, F, D]``), biases are
    returned as they are. ``rank`` must be in ``[1, min(A, B)]`` over all matrices (a rank beyond a matrix's
    smaller side would not be a compression). Same keys, shapes and dtypes.
    """
    mats = _matrices(experts)
    _check_low_rank(mats, rank)
    out = dict(experts)
    for name, w in mats.items():
        out[name] = truncated(w, rank).astype(w.dtype)
    return out


def _to_input_side(name: str, w: jax.Array) -> jax.Array:
    """[E, D, F] view of a stacked matrix: input matrices as they are, output matrices [E, F, D] transposed."""
    if name in INPUT_MATRICES:
        return w
    if name in OUTPUT_MATRICES:
        return jnp.swapaxes(w, 1, 2)
    raise ValueError(f"experts[{name!r}]: not an FFN expert matrix, expected one of "
                     f"{list(INPUT_MATRICES + OUTPUT_MATRICES)}")


def shared_basis_factors(experts: Experts, rank: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (basis float32[D, r], coefficients float32[E, r, F])}`` for every expert matrix.

    Input matrices (``w_in``, ``w_gate``, ``w_up`` [E, D, F]): ``W_e = basis @ coefficients[e]`` at full rank.
    Output matrices (``w_out``, ``w_down`` [E, F, D]): ``W_e = (basis @ coefficients[e]).T``. ``basis`` is the
    top-``r`` left singular vectors of the experts' ``[D, F]`` views concatenated along ``F``, [D, E*F];
    ``coefficients[e] = basis.T @ W_e`` (module docstring). ``rank`` in ``[1, min(D, E*F)]``.
    """
    mats = _matrices(experts)
    _check_shared_rank(mats, rank)
    views = {name: _to_input_side(name, w).astype(jnp.float32) for name, w in mats.items()}
    factors = {}
    for name, v in views.items():
        e, d, f = v.shape
        joint = jnp.transpose(v, (1, 0, 2)).reshape(d, e * f)            # [D, E*F] = [W_1 | ... | W_E]
        u, _, _ = jnp.linalg.svd(joint, full_matrices=False)
        basis = u[:, :rank]                                              # [D, r]
        factors[name] = (basis, jnp.einsum("dr,edf->erf", basis, v))
    return factors


def shared_basis(experts: Experts, rank: int) -> dict[str, jax.Array]:
    """Every expert matrix projected onto its layer-wide basis of rank ``rank`` (:func:`shared_basis_factors`).

    experts: ``{name: [E, ...]}`` FFN expert parameters; biases are returned as they are. Same keys, shapes and
    dtypes. At ``rank = D`` (when ``D <= E*F``) the basis spans ``R^D`` and the experts come back unchanged.
    """
    out = dict(experts)
    for name, (basis, coeffs) in shared_basis_factors(experts, rank).items():
        dense = jnp.einsum("dr,erf->edf", basis, coeffs)
        if name in OUTPUT_MATRICES:
            dense = jnp.swapaxes(dense, 1, 2)
        out[name] = dense.astype(jnp.asarray(experts[name]).dtype)
    return out


def compression_ratio(experts: Experts, rank: int, *, method: str = "low_rank") -> dict[str, float | int]:
    """Parameter counts of ``experts`` dense vs factorised by ``method`` at ``rank``.

    Returns ``{"dense": int, "factorised": int, "ratio": factorised / dense}`` (below 1 is a saving). Biases count
    the same in both. ``low_rank``: ``E * r * (A + B)`` per matrix name instead of ``E * A * B``;
    ``shared_basis``: ``D * r + E * r * F`` (one basis, per-expert coefficients). Checks ``rank`` as the
    compression itself does.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {list(METHODS)}")
    mats = _matrices(experts)
    (_check_low_rank if method == "low_rank" else _check_shared_rank)(mats, rank)
    dense = sum(int(jnp.size(w)) for w in experts.values())
    factorised = dense
    for name, w in mats.items():
        e, a, b = w.shape
        factorised -= e * a * b
        if method == "low_rank":
            factorised += e * rank * (a + b)
        else:
            _, d, f = _to_input_side(name, w).shape
            factorised += d * rank + e * rank * f
    return {"dense": dense, "factorised": factorised, "ratio": factorised / dense}
