"""Part A of the sparse_ot experiment: the k-sparse OT solver on synthetic problems (no training).

Instance families (all costs float32, seeds fix everything):

* ``assign``  M = N = 8, uniform marginals 1/8, cost U[0, 1), gamma = 2: the unregularised optimum is a permutation
  (k = 1 limit, compared with scipy's ``linear_sum_assignment``); gamma is large enough that the quadratic plan is
  not that permutation.
* ``square``  M = N = 16, marginals Dirichlet(2), cost U[0, 1), gamma = 1 (the k >= M limit against an
  independent numpy solver of quadratically regularised OT; the convergence study, secondary).
* ``moe``     M = 64 "tokens" (mass 1) x N = 8 "experts" (mass M/N), cost = -logits with logits N(0, 1),
  gamma = 1: the router's problem (the convergence study, primary).

Every function here is pure numpy / jax on given arrays; :func:`run_family` measures one (family, k) cell over a
batch of instances with a vmapped, jitted solver.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

FAMILIES = {
    "assign": dict(m=8, n=8, gamma=2.0, marginals="uniform", cost="uniform"),
    "square": dict(m=16, n=16, gamma=1.0, marginals="dirichlet", cost="uniform"),
    "moe": dict(m=64, n=8, gamma=1.0, marginals="tokens", cost="normal_logits"),
}


def instance(family: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cost float32[M, N], a float32[M], b float32[N]) of instance ``seed`` of ``family``."""
    f = FAMILIES[family]
    rng = np.random.default_rng([seed, list(FAMILIES).index(family)])
    m, n = f["m"], f["n"]
    cost = rng.uniform(size=(m, n)) if f["cost"] == "uniform" else -rng.normal(size=(m, n))
    if f["marginals"] == "uniform":
        a, b = np.full(m, 1.0 / m), np.full(n, 1.0 / n)
    elif f["marginals"] == "dirichlet":
        a, b = rng.dirichlet(2.0 * np.ones(m)), rng.dirichlet(2.0 * np.ones(n))
    else:
        a, b = np.ones(m), np.full(n, m / n)
    return cost.astype(np.float32), a.astype(np.float32), b.astype(np.float32)


# ---------------------------------------------------------------------------------------------- references


def assignment_plan(cost: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Square uniform problem: (the optimal permutation plan / M, its OT value, the gap to the second-best
    permutation, i.e. the smallest cost increase when any one edge of the optimum is forbidden)."""
    from scipy.optimize import linear_sum_assignment
    m = cost.shape[0]
    rows, cols = linear_sum_assignment(cost)
    plan = np.zeros_like(cost, dtype=np.float64)
    plan[rows, cols] = 1.0 / m
    best = float(cost[rows, cols].sum())
    second = np.inf
    for r, c in zip(rows, cols):
        forbidden = cost.astype(np.float64).copy()
        forbidden[r, c] = 1e9
        rr, cc = linear_sum_assignment(forbidden)
        second = min(second, float(forbidden[rr, cc].sum()))
    return plan, best / m, (second - best) / m


def quadratic_plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray, gamma: float, sweeps: int = 2000,
                   tol: float = 1e-9) -> np.ndarray:
    """Quadratically regularised OT ``min <P, C> + gamma/2 ||P||^2`` (no cardinality) by exact block-coordinate
    ascent on its dual in float64 (bisection per row, then per column); independent of the jax solver."""
    cost, a, b = (np.asarray(x, np.float64) for x in (cost, a, b))
    alpha, beta = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])

    def solve(shift: np.ndarray, mass: np.ndarray) -> np.ndarray:
        lo, hi = -shift.max(1), -shift.min(1) + gamma * mass + 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            over = np.maximum(mid[:, None] + shift, 0).sum(1) / gamma > mass
            hi, lo = np.where(over, mid, hi), np.where(over, lo, mid)
        return 0.5 * (lo + hi)

    plan = np.zeros_like(cost)
    for _ in range(sweeps):
        alpha = solve(beta[None, :] - cost, a)
        beta = solve((alpha[:, None] - cost).T, b)
        plan = np.maximum(alpha[:, None] + beta[None, :] - cost, 0) / gamma
        if np.abs(plan.sum(1) - a).sum() < tol * a.sum():
            break
    return plan


def tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance of two plans of the same mass, relative to that mass: ``||P - Q||_1 / (2 sum P)``."""
    return float(np.abs(np.asarray(p, np.float64) - q).sum() / (2.0 * np.asarray(q, np.float64).sum()))


def gradient_jump(cost, a, b, k: int, gamma: float, alpha, seed: int = 0, draws: int = 64,
                  scale: float = 1e-3) -> np.ndarray:
    """An empirical local smoothness constant of the semi-dual around each ``alpha``: the largest
    ``||grad S(alpha + d) - grad S(alpha)|| / ||d||`` over ``draws`` random ``d`` of norm ``scale * gamma``, divided
    by the k >= M bound ``N / gamma`` (1 or less: as smooth as quadratic OT; larger: a jump was crossed).

    cost float32[I, M, N], a float32[I, M], b float32[I, N], alpha float32[I, M] -> float64[I] (one per instance).
    """
    import jax
    import jax.numpy as jnp

    from moejax.routing import ksparse_ot
    n_inst, m, n = cost.shape
    d = np.random.default_rng(seed).normal(size=(n_inst, draws, m))
    d = scale * gamma * d / np.linalg.norm(d, axis=-1, keepdims=True)

    def one(c, aa, bb, al, dd):
        g = lambda x: ksparse_ot.semi_dual(x, c, aa, bb, k, gamma)[1]  # noqa: E731
        moved = jax.vmap(g)(al[None, :] + dd)
        return jnp.linalg.norm(moved - g(al)[None, :], axis=1) / jnp.linalg.norm(dd, axis=1)

    ratio = jax.jit(jax.vmap(one))(cost, a, b, alpha, jnp.asarray(d, jnp.float32))
    return np.asarray(ratio).max(1) / (n / gamma)


def references(family: str, seeds: list[int]) -> dict[str, list]:
    """The k-independent references of each instance: the quadratically regularised plan, and for ``assign`` the
    optimal permutation plan, its OT value and the second-best gap (:func:`assignment_plan`)."""
    gamma = FAMILIES[family]["gamma"]
    insts = [instance(family, s) for s in seeds]
    out: dict[str, list] = {"quadratic": [quadratic_plan(*i, gamma) for i in insts]}
    if family == "assign":
        out["assignment"] = [assignment_plan(i[0]) for i in insts]
    return out


# ---------------------------------------------------------------------------------------------- one cell


def run_family(family: str, seeds: list[int], k: int, *, method: str = "agd", max_iter: int = 3000,
               tol: float = 1e-4, budget: int = 100, long: int = 5000,
               refs: dict[str, list] | None = None) -> dict[str, Any]:
    """Solves instances ``seeds`` of ``family`` with ``k`` and returns per-instance measurements.

    Per instance: ``iterations`` to ``error <= tol`` (``max_iter`` when not reached: censored), ``converged``,
    ``error`` at the end, ``error_at_budget`` (after ``budget`` iterations), ``suboptimality_at_budget`` (the
    semi-dual value after ``budget`` iterations below the best value found, ``max`` of the runs of ``max_iter`` and
    ``long`` iterations, relative to its magnitude), ``nnz_per_column`` (mean nonzeros per
    column of the plan), ``value`` (semi-dual), ``primal_gap`` (primal value of the plan minus the semi-dual value),
    ``smoothness`` (:func:`gradient_jump` at the solution), and with ``refs`` (:func:`references`):
    ``tv_to_quadratic`` (distance to the quadratically regularised plan), and for ``assign`` ``tv_to_assignment``, ``value_gap`` (relative, of the
    semi-dual value minus the constant ``gamma/2 sum b^2`` against the OT value) and ``second_best_gap``.
    """
    import jax
    import jax.numpy as jnp

    from moejax.routing import ksparse_ot
    f = FAMILIES[family]
    gamma = f["gamma"]
    insts = [instance(family, s) for s in seeds]
    cost, a, b = (jnp.asarray(np.stack([i[j] for i in insts])) for j in range(3))
    start = time.perf_counter()
    solve = jax.jit(jax.vmap(lambda c, aa, bb: ksparse_ot.solve_semi_dual(c, aa, bb, k, gamma, max_iter=max_iter,
                                                                          tol=tol, method=method)))
    sol = jax.block_until_ready(solve(cost, a, b))
    solve_s = time.perf_counter() - start
    at_budget = jax.jit(jax.vmap(lambda c, aa, bb: ksparse_ot.solve_semi_dual(c, aa, bb, k, gamma, max_iter=budget,
                                                                              tol=0.0, method=method)))(cost, a, b)
    longer = jax.jit(jax.vmap(lambda c, aa, bb: ksparse_ot.solve_semi_dual(c, aa, bb, k, gamma, max_iter=long,
                                                                           tol=0.0, method=method)))(cost, a, b)
    best = np.maximum(np.maximum(np.asarray(sol.value), np.asarray(longer.value)), np.asarray(at_budget.value))
    sub = (best - np.asarray(at_budget.value)) / np.maximum(np.abs(best), 1e-12)
    primal = jax.vmap(lambda p, c: ksparse_ot.primal_value(p, c, gamma))(sol.plan, cost)
    out: dict[str, Any] = {
        "family": family, "k": k, "gamma": gamma, "method": method, "max_iter": max_iter, "tol": tol,
        "budget": budget, "seeds": list(seeds), "solve_wall_clock_s": solve_s,
        "iterations": np.asarray(sol.iterations).tolist(), "converged": np.asarray(sol.converged).tolist(),
        "error": np.asarray(sol.error).tolist(), "error_at_budget": np.asarray(at_budget.error).tolist(),
        "suboptimality_at_budget": sub.tolist(), "best_value": best.tolist(),
        "nnz_per_column": (np.asarray(sol.plan) > 0).sum(1).mean(-1).tolist(),
        "value": np.asarray(sol.value).tolist(), "primal_gap": np.asarray(primal - sol.value).tolist(),
        "smoothness": gradient_jump(cost, a, b, k, gamma, sol.alpha, seed=k).tolist(),
    }
    if refs is not None:
        plans = np.asarray(sol.plan)
        out["tv_to_quadratic"] = [tv(plans[i], refs["quadratic"][i]) for i in range(len(seeds))]
        if family == "assign":
            refs = refs["assignment"]
            const = [0.5 * gamma * float(np.sum(np.asarray(i[2], np.float64) ** 2)) for i in insts]
            out["tv_to_assignment"] = [tv(plans[i], refs[i][0]) for i in range(len(seeds))]
            out["value_gap"] = [abs(out["value"][i] - const[i] - refs[i][1]) / abs(refs[i][1])
                                for i in range(len(seeds))]
            out["second_best_gap"] = [refs[i][2] for i in range(len(seeds))]
    out["wall_clock_s"] = time.perf_counter() - start
    return out
