"""k-sparse, quadratically regularised optimal transport (Liu, Puigcerver, Blondel, ICLR 2023, arXiv:2209.15466).

"Sparsity-Constrained Optimal Transport": OT "with explicit cardinality constraints on the transportation plan".
With a cost ``C float32[M, N]``, a row marginal ``a float32[M]`` and a column marginal ``b float32[N]`` (equal
total mass), the primal problem is

    min_P  <P, C> + sum_j (gamma / 2) ||P[:, j]||^2     s.t.  P >= 0,  P 1 = a,  P^T 1 = b,  ||P[:, j]||_0 <= k,

i.e. quadratically regularised OT in which every *column* of the plan has at most ``k`` nonzeros. In the MoE
application the rows are tokens and the columns experts, so an expert is matched with at most ``k`` tokens.

The cardinality constraint is not convex, but the (semi-)dual problems are concave maximisations built from the
conjugate of the k-sparse quadratic term, which is cheap: a top-k followed by a projection.

* **max operator** (semi-dual): for a column ``j`` with mass ``b_j``,
  ``max_j(s) = max_{t >= 0, 1^T t = b_j, ||t||_0 <= k} <s, t> - (gamma/2) ||t||^2``. Its maximiser is the
  Euclidean projection of ``s / gamma`` onto the k-sparse scaled simplex ``{t >= 0, 1^T t = b_j, ||t||_0 <= k}``,
  which keeps the ``k`` largest entries of ``s`` and projects them onto the simplex (Kyrillidis et al. 2013); it is
  also the gradient of ``max_j`` wherever that is differentiable (Danskin). :func:`sparse_simplex_projection`,
  :func:`max_operator`.
* **semi-dual** (maximised over the row potential ``alpha float32[M]``):
  ``S(alpha) = <alpha, a> - sum_j max_j(alpha - C[:, j])``, gradient ``a - P(alpha) 1`` where column ``j`` of
  ``P(alpha)`` is the maximiser above. :func:`semi_dual`.
* **dual** (over ``alpha float32[M]`` and ``beta float32[N]``):
  ``D(alpha, beta) = <alpha, a> + <beta, b> - sum_j (1/(2 gamma)) sum_{top-k i} [alpha_i + beta_j - C_ij]_+^2``,
  gradient ``(a - P 1, b - P^T 1)`` with ``P[:, j] = [top-k of (alpha + beta_j - C[:, j])]_+ / gamma``.
  :func:`dual`.

Limit cases (the paper's abstract: "a middle ground between unregularized OT (recovered in the limit case k=1) and
quadratically-regularized OT (recovered when k is large enough)"): with ``k = 1`` the max operator is
``b_j max_i s_i - gamma b_j^2 / 2``, so the semi-dual is the unregularised OT semi-dual plus the constant
``gamma/2 sum_j b_j^2`` (nonsmooth, piecewise linear); with ``k >= M`` it is the quadratically regularised OT
semi-dual of Blondel et al. 2018 (smooth, ``N/gamma``-Lipschitz gradient). In between the objective is concave
(a sum of conjugates), differentiable almost everywhere, and its gradient jumps where the top-k support of a
column changes: "The smoothness of the objectives increases as k increases".

The plan recovered from the semi-dual has exact column marginals and at most ``k`` nonzeros per column by
construction; its row marginals hold to the solver's tolerance (the semi-dual gradient is their violation).

Solvers (:func:`solve_semi_dual`): accelerated gradient ascent (Nesterov / FISTA with the gradient-based adaptive
restart of O'Donoghue & Candès 2015) with the fixed step ``gamma / N`` (the inverse of the k >= M smoothness
constant, so the same step for every ``k``), or L-BFGS (``optax.lbfgs`` with its zoom line search), both inside
``lax.while_loop`` with a tolerance on the relative row-marginal error and a maximum number of iterations; the
iterations used are returned. Everything here is pure and jit-able; ``k`` is static (it fixes the top-k shape).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

METHODS = ("agd", "lbfgs")


# ------------------------------------------------------------------------------ the k-sparse max operator


def _simplex_of_sorted(u: jax.Array, mass: jax.Array) -> jax.Array:
    """Projection of rows already sorted in descending order onto ``{p >= 0, 1^T p = mass}``.

    u: float32[R, K] (descending along the last axis); mass: float32[R] -> float32[R, K].
    """
    kk = u.shape[-1]
    cssv = jnp.cumsum(u, axis=-1) - mass[:, None]
    ind = jnp.arange(1, kk + 1, dtype=u.dtype)
    support = (u - cssv / ind) > 0                       # a prefix of the sorted entries
    rho = jnp.maximum(support.sum(-1), 1)
    theta = jnp.take_along_axis(cssv, (rho - 1)[:, None], axis=-1) / rho[:, None].astype(u.dtype)
    return jnp.maximum(u - theta, 0.0)


def sparse_simplex_projection(x: jax.Array, k: int, mass: jax.Array | float = 1.0) -> jax.Array:
    """Row-wise Euclidean projection onto the k-sparse scaled simplex ``{p >= 0, 1^T p = mass, ||p||_0 <= k}``.

    Keeps the ``k`` largest entries of each row and projects them onto the simplex of the row's ``mass``; the
    other entries are zero (Kyrillidis et al. 2013, "Sparse projections onto the simplex"). ``k >= R`` is the plain
    simplex projection.

    Args:
      x: float32[R, M]; k: static int >= 1 (clipped to ``M``); mass: float32[R] or a scalar > 0.

    Returns:
      float32[R, M] with at most ``k`` nonzeros per row, each row summing to its mass.
    """
    r, m = x.shape
    kk = min(int(k), m)
    mass = jnp.broadcast_to(jnp.asarray(mass, x.dtype), (r,))
    top, idx = jax.lax.top_k(x, kk)
    proj = _simplex_of_sorted(top, mass)
    return jnp.zeros_like(x).at[jnp.arange(r)[:, None], idx].set(proj)


def max_operator(s: jax.Array, b: jax.Array, k: int, gamma: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """The k-sparse quadratic max operator of every column, and its maximiser (the per-column plan).

    ``value_j = max_{t >= 0, 1^T t = b_j, ||t||_0 <= k} <s[:, j], t> - (gamma/2) ||t||^2``.

    Args:
      s: float32[M, N] (``alpha[:, None] - C`` in the semi-dual); b: float32[N] column masses > 0; k: static;
      gamma: > 0.

    Returns:
      (value float32[N], plan float32[M, N]): ``plan[:, j]`` is the maximiser (= the gradient of ``value_j`` in
      ``s[:, j]`` wherever it is differentiable), at most ``k`` nonzeros, summing to ``b_j``.
    """
    plan = sparse_simplex_projection(s.T / gamma, k, b).T
    value = jnp.sum(s * plan, axis=0) - 0.5 * gamma * jnp.sum(plan * plan, axis=0)
    return value, plan


# ------------------------------------------------------------------------------------------ objectives


def semi_dual(alpha: jax.Array, cost: jax.Array, a: jax.Array, b: jax.Array, k: int, gamma: float | jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The semi-dual objective, its gradient and the plan at ``alpha``.

    ``S(alpha) = <alpha, a> - sum_j max_j(alpha - C[:, j])`` (to be maximised; concave).

    Args:
      alpha: float32[M] row potentials; cost: float32[M, N]; a: float32[M]; b: float32[N]; k: static; gamma > 0.

    Returns:
      (value float32[], grad float32[M] = ``a - plan 1``, plan float32[M, N]).
    """
    values, plan = max_operator(alpha[:, None] - cost, b, k, gamma)
    return jnp.dot(alpha, a) - values.sum(), a - plan.sum(1), plan


def semi_dual_value(alpha: jax.Array, cost: jax.Array, a: jax.Array, b: jax.Array, k: int,
                    gamma: float | jax.Array) -> jax.Array:
    """float32[]: :func:`semi_dual`'s value alone (differentiable with ``jax.grad``)."""
    return semi_dual(alpha, cost, a, b, k, gamma)[0]


def dual_plan(alpha: jax.Array, beta: jax.Array, cost: jax.Array, k: int, gamma: float | jax.Array) -> jax.Array:
    """float32[M, N]: ``P[:, j] = [top-k of (alpha + beta_j - C[:, j])]_+ / gamma``, the dual's plan."""
    s = alpha[:, None] + beta[None, :] - cost
    m = s.shape[0]
    kk = min(int(k), m)
    top, idx = jax.lax.top_k(s.T, kk)                                        # [N, k]
    kept = jnp.zeros_like(s.T).at[jnp.arange(s.shape[1])[:, None], idx].set(jnp.maximum(top, 0.0))
    return kept.T / gamma


def dual(alpha: jax.Array, beta: jax.Array, cost: jax.Array, a: jax.Array, b: jax.Array, k: int,
         gamma: float | jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The dual objective (maximised over both potentials), its gradient and its plan.

    ``D = <alpha, a> + <beta, b> - sum_j (1/(2 gamma)) sum_{top-k i} [alpha_i + beta_j - C_ij]_+^2``.

    Args:
      alpha: float32[M]; beta: float32[N]; cost: float32[M, N]; a: float32[M]; b: float32[N]; k static; gamma > 0.

    Returns:
      (value float32[], (grad_alpha float32[M] = ``a - P 1``, grad_beta float32[N] = ``b - P^T 1``), P float32[M, N]).
    """
    plan = dual_plan(alpha, beta, cost, k, gamma)
    conj = 0.5 * gamma * jnp.sum(plan * plan)                # = sum_j (1/(2 gamma)) sum_top-k [.]_+^2
    value = jnp.dot(alpha, a) + jnp.dot(beta, b) - conj
    return value, (a - plan.sum(1), b - plan.sum(0)), plan


def primal_value(plan: jax.Array, cost: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """float32[]: ``<P, C> + (gamma/2) ||P||^2`` (the primal objective, without the constraints)."""
    return jnp.sum(plan * cost) + 0.5 * gamma * jnp.sum(plan * plan)


def marginal_error(plan: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """float32[]: ``(||P 1 - a||_1 + ||P^T 1 - b||_1) / sum(a)``, the relative violation of both marginals."""
    return (jnp.abs(plan.sum(1) - a).sum() + jnp.abs(plan.sum(0) - b).sum()) / a.sum()


# ------------------------------------------------------------------------------------------------ solvers


class KSparseOTSolution(NamedTuple):
    """What :func:`solve_semi_dual` returns (a pytree).

    alpha: float32[M] the row potentials; plan: float32[M, N] the primal plan recovered from them (exact column
    marginals, at most ``k`` nonzeros per column); value: float32[] the semi-dual objective at ``alpha``;
    iterations: int32[] used; error: float32[] ``||a - plan 1||_1 / sum(a)`` at the end; converged: bool[]
    ``error <= tol``.
    """

    alpha: jax.Array
    plan: jax.Array
    value: jax.Array
    iterations: jax.Array
    error: jax.Array
    converged: jax.Array


def _row_error(grad: jax.Array, a: jax.Array) -> jax.Array:
    return jnp.abs(grad).sum() / a.sum()


def _agd(cost, a, b, k, gamma, alpha0, max_iter, tol, step):
    """Nesterov accelerated ascent on the semi-dual with gradient-based adaptive restart.

    Returns (alpha, iterations, semi_dual(alpha)), the last as the loop evaluated it (see :func:`solve_semi_dual`).
    """

    def body(state):
        it, alpha, y, t, _ = state
        _, g_y, _ = semi_dual(y, cost, a, b, k, gamma)
        new_alpha = y + step * g_y
        new_t = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        # Restart the momentum when the ascent direction and the step taken disagree (O'Donoghue & Candès).
        restart = jnp.dot(g_y, new_alpha - alpha) < 0.0
        momentum = jnp.where(restart, 0.0, (t - 1.0) / new_t)
        new_y = new_alpha + momentum * (new_alpha - alpha)
        new_t = jnp.where(restart, 1.0, new_t)
        return it + 1, new_alpha, new_y, new_t, semi_dual(new_alpha, cost, a, b, k, gamma)

    init = (jnp.zeros((), jnp.int32), alpha0, alpha0, jnp.ones((), cost.dtype),
            semi_dual(alpha0, cost, a, b, k, gamma))
    it, alpha, _, _, out = jax.lax.while_loop(_not_done(a, max_iter, tol), body, init)
    return alpha, it, out


def _lbfgs(cost, a, b, k, gamma, alpha0, max_iter, tol):
    """optax.lbfgs (zoom line search) on ``-S``; returns what :func:`_agd` returns."""

    def loss(alpha):
        return -semi_dual_value(alpha, cost, a, b, k, gamma)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(state):
        it, alpha, opt_state, _ = state
        value, grad = value_and_grad(alpha, state=opt_state)
        updates, opt_state = opt.update(grad, opt_state, alpha, value=value, grad=grad, value_fn=loss)
        alpha = optax.apply_updates(alpha, updates)
        return it + 1, alpha, opt_state, semi_dual(alpha, cost, a, b, k, gamma)

    init = (jnp.zeros((), jnp.int32), alpha0, opt.init(alpha0), semi_dual(alpha0, cost, a, b, k, gamma))
    it, alpha, _, out = jax.lax.while_loop(_not_done(a, max_iter, tol), body, init)
    return alpha, it, out


def _not_done(a, max_iter, tol):
    """The loops' condition on their state ``(it, ..., semi_dual(alpha))``: iterations left and the row error > tol."""

    def cond(state):
        return (state[0] < max_iter) & (_row_error(state[-1][1], a) > tol)

    return cond


def solve_semi_dual(cost: jax.Array, a: jax.Array, b: jax.Array, k: int, gamma: float | jax.Array, *,
                    max_iter: int | jax.Array = 1000, tol: float | jax.Array = 1e-4, method: str = "agd",
                    alpha0: jax.Array | None = None, step: float | jax.Array | None = None) -> KSparseOTSolution:
    """Maximises the k-sparse semi-dual and recovers the primal plan.

    Args:
      cost: float32[M, N]; a: float32[M] > 0; b: float32[N] > 0 with ``sum(a) == sum(b)``; k: static int >= 1,
        feasible when ``N k >= M`` (every row must be reachable); gamma: > 0.
      max_iter: the most iterations; tol: stop when ``||a - P 1||_1 / sum(a) <= tol``.
      method: ``'agd'`` (accelerated gradient, step ``gamma / N`` unless ``step`` is given) or ``'lbfgs'``.
      alpha0: float32[M] the starting potentials (default: ``min_j C[:, j]``, which makes every entry of
        ``alpha - C`` non-positive: a neutral start independent of ``k``).

    Returns:
      :class:`KSparseOTSolution`. No gradient flows through the solver (use the plan under ``stop_gradient``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {list(METHODS)}")
    if int(k) < 1:
        raise ValueError(f"k={k!r}: must be >= 1")
    cost = jax.lax.stop_gradient(jnp.asarray(cost, jnp.float32))
    a = jnp.asarray(a, cost.dtype)
    b = jnp.asarray(b, cost.dtype)
    if alpha0 is None:
        alpha0 = cost.min(axis=1)
    alpha0 = jnp.asarray(alpha0, cost.dtype)
    if method == "agd":
        step = gamma / cost.shape[1] if step is None else step
        alpha, it, (value, grad, plan) = _agd(cost, a, b, k, gamma, alpha0, max_iter, tol, step)
    else:
        alpha, it, (value, grad, plan) = _lbfgs(cost, a, b, k, gamma, alpha0, max_iter, tol)
    # The plan, value and error are those the loop stopped on, not a second evaluation at the same alpha: two compiled
    # copies of one float32 function may round differently (under jax 0.12's XLA by 2% of a 1e-5 tolerance), and
    # ``converged`` must say what the stopping rule saw.
    err = _row_error(grad, a)
    return KSparseOTSolution(alpha=alpha, plan=plan, value=value, iterations=it, error=err, converged=err <= tol)
