"""Oracle tests of the k-sparse quadratically regularised OT solver (moejax.routing.ksparse_ot).

Oracles: brute force over supports for the sparse simplex projection; scipy's linear_sum_assignment and linprog for
unregularised OT (k = 1); an independent numpy block-coordinate ascent on the quadratic dual (k >= M); jax.grad and
float64 finite differences for the gradients; the zero duality gap of a converged solution for every k.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment, linprog

from moejax.routing import ksparse_ot as ko


pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


def _instance(rng, m, n, uniform=True):
    cost = rng.uniform(size=(m, n)).astype(np.float32)
    if uniform:
        a, b = np.full(m, 1.0 / m), np.full(n, 1.0 / n)
    else:
        a, b = rng.dirichlet(np.ones(m) * 2), rng.dirichlet(np.ones(n) * 2)
    return cost, a.astype(np.float32), b.astype(np.float32)


# ------------------------------------------------------------------------------ the projection / max operator


def _simplex_on(v, mass):
    """Projection of v onto {p >= 0, sum p = mass} by bisection on the threshold (independent of the sort method)."""
    lo, hi = v.min() - mass, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > mass:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def _brute_sparse_projection(x, k, mass):
    best, best_d = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(x.size), size):
            p = np.zeros_like(x)
            p[list(support)] = _simplex_on(x[list(support)], mass)
            d = np.sum((p - x) ** 2)
            if d < best_d - 1e-12:
                best, best_d = p, d
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_sparse_simplex_projection_is_the_nearest_k_sparse_point(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(6, 5))
    mass = rng.uniform(0.5, 2.0, size=6)
    got = np.asarray(ko.sparse_simplex_projection(jnp.asarray(x, jnp.float32), k, jnp.asarray(mass, jnp.float32)))
    for row, m_, g in zip(x, mass, got):
        np.testing.assert_allclose(g, _brute_sparse_projection(row, min(k, 5), m_), atol=2e-5)
        assert (g > 0).sum() <= k and abs(g.sum() - m_) < 1e-5 and (g >= 0).all()


def test_max_operator_value_is_its_maximum():
    """The value is attained by the plan and no random feasible k-sparse column does better."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 3)).astype(np.float32)
    b = np.array([0.2, 0.5, 0.3], np.float32)
    gamma, k = 0.7, 2
    value, plan = ko.max_operator(jnp.asarray(s), jnp.asarray(b), k, gamma)
    for j in range(3):
        for _ in range(300):
            support = rng.choice(6, size=k, replace=False)
            t = np.zeros(6)
            t[support] = rng.dirichlet(np.ones(k)) * b[j]
            assert s[:, j] @ t - 0.5 * gamma * t @ t <= float(value[j]) + 1e-5
    np.testing.assert_allclose(np.sum(s * plan, 0) - 0.5 * gamma * np.sum(np.asarray(plan) ** 2, 0), value,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------ k = 1


def _lp_ot(cost, a, b):
    """Unregularised OT by linear programming: (value, row potentials)."""
    m, n = cost.shape
    eq = np.zeros((m + n, m * n))
    for i in range(m):
        eq[i, i * n:(i + 1) * n] = 1
    for j in range(n):
        eq[m + j, j::n] = 1
    res = linprog(cost.reshape(-1).astype(np.float64), A_eq=eq, b_eq=np.concatenate([a, b]).astype(np.float64),
                  bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun, res.eqlin.marginals[:m]


@pytest.mark.parametrize("seed", range(4))
def test_k1_recovers_the_unregularised_assignment(seed):
    """Square uniform marginals: the k = 1 plan is the optimal permutation (scipy's assignment) and the semi-dual
    value is the OT value plus the constant gamma/2 sum_j b_j^2."""
    rng = np.random.default_rng(seed)
    n, gamma = 6, 0.3
    cost, a, b = _instance(rng, n, n)
    sol = ko.solve_semi_dual(cost, a, b, 1, gamma, max_iter=2000, tol=1e-6)
    rows, cols = linear_sum_assignment(cost)
    exact = np.zeros((n, n), np.float32)
    exact[rows, cols] = 1.0 / n
    assert bool(sol.converged)
    np.testing.assert_allclose(np.asarray(sol.plan), exact, atol=1e-6)
    ot = cost[rows, cols].sum() / n
    np.testing.assert_allclose(float(sol.value) - 0.5 * gamma * np.sum(b ** 2), ot, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_k1_semi_dual_is_the_unregularised_semi_dual(seed):
    """Non-uniform, rectangular marginals: at the LP's optimal row potentials the k = 1 semi-dual equals the OT value
    (+ the constant), and no solver iterate exceeds it (weak duality)."""
    rng = np.random.default_rng(10 + seed)
    cost, a, b = _instance(rng, 7, 4, uniform=False)
    gamma = 0.5
    ot, alpha_lp = _lp_ot(cost, a, b)
    const = 0.5 * gamma * np.sum(b.astype(np.float64) ** 2)
    at_lp = ko.semi_dual_value(jnp.asarray(alpha_lp, jnp.float32), cost, a, b, 1, gamma)
    np.testing.assert_allclose(float(at_lp) - const, ot, atol=2e-5)
    sol = ko.solve_semi_dual(cost, a, b, 1, gamma, max_iter=3000, tol=1e-6)
    assert float(sol.value) - const <= ot + 2e-5
    assert float(sol.value) - const >= ot - 0.1 * abs(ot)      # the nonsmooth fixed-step ascent only gets close


# ---------------------------------------------------------------------------------------- k >= M


def _quadratic_ot_numpy(cost, a, b, gamma, sweeps=3000):
    """Quadratically regularised OT by exact block-coordinate ascent on its dual (float64, a vectorised bisection
    per row and per column): P = [alpha_i + beta_j - C_ij]_+ / gamma with both marginals."""
    cost, a, b = (np.asarray(x, np.float64) for x in (cost, a, b))
    alpha, beta = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])

    def solve(shift, mass):            # per row r of shift [R, L]: t_r with sum_l [t_r + shift_rl]_+ / gamma = mass_r
        lo, hi = -shift.max(1), -shift.min(1) + gamma * mass + 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            over = np.maximum(mid[:, None] + shift, 0).sum(1) / gamma > mass
            hi, lo = np.where(over, mid, hi), np.where(over, lo, mid)
        return 0.5 * (lo + hi)

    for _ in range(sweeps):
        alpha = solve(beta[None, :] - cost, a)
        beta = solve((alpha[:, None] - cost).T, b)
        plan = np.maximum(alpha[:, None] + beta[None, :] - cost, 0) / gamma
        if np.abs(plan.sum(1) - a).sum() < 1e-10:
            break
    return plan


@pytest.mark.parametrize("k_extra", [0, 3])
def test_large_k_recovers_quadratically_regularised_ot(k_extra):
    rng = np.random.default_rng(3 + k_extra)
    m, n, gamma = 6, 4, 0.2
    cost, a, b = _instance(rng, m, n, uniform=False)
    expected = _quadratic_ot_numpy(cost, a, b, gamma)
    for method in ko.METHODS:
        sol = ko.solve_semi_dual(cost, a, b, m + k_extra, gamma, max_iter=5000, tol=1e-6, method=method)
        assert bool(sol.converged), method
        np.testing.assert_allclose(np.asarray(sol.plan), expected, atol=2e-5, err_msg=method)


# ------------------------------------------------------------------------ every k: sparsity, marginals, gap


@pytest.mark.parametrize("m,n,k,uniform", [(8, 5, 4, True), (8, 5, 8, False), (16, 16, 2, True),
                                           (16, 16, 10, False), (12, 4, 5, True)])
def test_plan_is_k_sparse_feasible_and_optimal(m, n, k, uniform):
    """Columns: at most k nonzeros and exact masses; rows: the marginal to tolerance; and a zero duality gap (the
    primal value of the recovered plan equals the semi-dual value), which certifies the plan optimal for the
    non-convex primal. (Cases where the ascent reaches a zero gradient; see the next test for the others.)"""
    rng = np.random.default_rng(m * k)
    gamma = 0.1
    for _ in range(2):
        cost, a, b = _instance(rng, m, n, uniform=uniform)
        sol = ko.solve_semi_dual(cost, a, b, k, gamma, max_iter=5000, tol=1e-5)
        plan = np.asarray(sol.plan)
        assert bool(sol.converged), (k, float(sol.error))
        assert ((plan > 0).sum(0) <= k).all()
        assert (plan >= 0).all()
        np.testing.assert_allclose(plan.sum(0), b, atol=1e-6)
        assert np.abs(plan.sum(1) - a).sum() <= 1e-5 * a.sum() + 1e-7
        assert float(ko.marginal_error(sol.plan, jnp.asarray(a), jnp.asarray(b))) <= 2e-5
        gap = float(ko.primal_value(sol.plan, cost, gamma)) - float(sol.value)
        assert abs(gap) <= 1e-4, gap


@pytest.mark.parametrize("k", [1, 2, 3])
def test_small_k_plan_keeps_its_columns_exact(k):
    """Small k with non-uniform marginals: the semi-dual's maximiser is a kink, the recovered plan may violate the row
    marginal (a relaxation gap), but every column still has at most k nonzeros and its exact mass."""
    rng = np.random.default_rng(30 + k)
    cost, a, b = _instance(rng, 8, 5, uniform=False)
    sol = ko.solve_semi_dual(cost, a, b, k, 0.1, max_iter=300, tol=1e-5)
    plan = np.asarray(sol.plan)
    assert ((plan > 0).sum(0) <= k).all() and (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-6)
    assert np.isfinite(float(sol.value)) and float(sol.error) == pytest.approx(np.abs(plan.sum(1) - a).sum(), 1e-4)


def test_sparser_k_costs_no_less():
    """The optimal regularised objective can only rise as the constraint tightens (smaller k)."""
    rng = np.random.default_rng(7)
    cost, a, b = _instance(rng, 8, 5, uniform=False)
    values = [float(ko.solve_semi_dual(cost, a, b, k, 0.1, max_iter=3000, tol=1e-6).value) for k in (2, 4, 8)]
    assert values[0] >= values[1] - 1e-5 and values[1] >= values[2] - 1e-5


# -------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_semi_dual_gradient_matches_autodiff_and_finite_differences(k):
    rng = np.random.default_rng(k)
    cost, a, b = _instance(rng, 6, 4, uniform=False)
    alpha = rng.normal(scale=0.3, size=6)
    gamma = 0.4
    _, grad, _ = ko.semi_dual(jnp.asarray(alpha, jnp.float32), cost, a, b, k, gamma)
    auto = jax.grad(ko.semi_dual_value)(jnp.asarray(alpha, jnp.float32), cost, a, b, k, gamma)
    np.testing.assert_allclose(grad, auto, atol=1e-5)
    with jax.enable_x64(True):
        c64, a64, b64 = (jnp.asarray(x, jnp.float64) for x in (cost, a, b))
        f = lambda al: float(ko.semi_dual_value(jnp.asarray(al, jnp.float64), c64, a64, b64, k, gamma))  # noqa: E731
        eps = 1e-6
        fd = np.array([(f(alpha + eps * e) - f(alpha - eps * e)) / (2 * eps) for e in np.eye(6)])
    np.testing.assert_allclose(grad, fd, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_dual_gradient_matches_autodiff(k):
    rng = np.random.default_rng(20 + k)
    cost, a, b = _instance(rng, 6, 4, uniform=False)
    alpha, beta = (jnp.asarray(rng.normal(scale=0.5, size=s), jnp.float32) for s in (6, 4))
    value, (ga, gb), plan = ko.dual(alpha, beta, cost, a, b, k, 0.3)
    auto_a, auto_b = jax.grad(lambda x, y: ko.dual(x, y, cost, a, b, k, 0.3)[0], argnums=(0, 1))(alpha, beta)
    np.testing.assert_allclose(ga, auto_a, atol=1e-5)
    np.testing.assert_allclose(gb, auto_b, atol=1e-5)
    assert ((np.asarray(plan) > 0).sum(0) <= k).all()


def test_dual_at_the_semi_dual_solution_has_the_same_value_for_large_k():
    """For k >= M the dual with beta_j set from the semi-dual's column thresholds reaches the semi-dual's value."""
    rng = np.random.default_rng(5)
    cost, a, b = _instance(rng, 6, 4, uniform=False)
    gamma = 0.2
    sol = ko.solve_semi_dual(cost, a, b, 6, gamma, max_iter=5000, tol=1e-7)
    # Column j of the plan is [alpha - C_j + beta_j]_+ / gamma: read beta_j off any positive entry.
    plan = np.asarray(sol.plan)
    s = np.asarray(sol.alpha)[:, None] - cost
    beta = np.array([np.mean((gamma * plan[:, j] - s[:, j])[plan[:, j] > 0]) for j in range(4)], np.float32)
    value = ko.dual(sol.alpha, jnp.asarray(beta), cost, a, b, 6, gamma)[0]
    np.testing.assert_allclose(float(value), float(sol.value), atol=1e-5)


# ------------------------------------------------------------------------------------------------ plumbing


def test_solver_jits_and_vmaps_and_reports_iterations():
    rng = np.random.default_rng(1)
    costs = jnp.asarray(rng.uniform(size=(3, 8, 4)), jnp.float32)
    a, b = jnp.full((8,), 1 / 8), jnp.full((4,), 1 / 4)
    solve = jax.jit(jax.vmap(lambda c: ko.solve_semi_dual(c, a, b, 3, 0.1, max_iter=500, tol=1e-4)))
    sol = solve(costs)
    assert sol.plan.shape == (3, 8, 4) and sol.iterations.shape == (3,)
    assert (sol.iterations >= 0).all() and (sol.iterations <= 500).all() and bool(sol.converged.all())
    capped = ko.solve_semi_dual(costs[1], a, b, 3, 0.1, max_iter=2, tol=0.0)
    assert int(capped.iterations) == 2 and not bool(capped.converged)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="method="):
        ko.solve_semi_dual(jnp.ones((2, 2)), jnp.ones(2), jnp.ones(2), 1, 1.0, method="newton")
    with pytest.raises(ValueError, match="k="):
        ko.solve_semi_dual(jnp.ones((2, 2)), jnp.ones(2), jnp.ones(2), 0, 1.0)


# ===================================================================== the router kind ``ksparse_ot``

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402

from moejax import DispatchConfig, MoEConfig, MoELayer, RouterConfig, reference  # noqa: E402
from moejax.routing import Router, top_k_routing  # noqa: E402
from moejax.routing.ksparse_ot_router import ksparse_ot_plan, ksparse_ot_routing  # noqa: E402


@pytest.mark.parametrize("k,c", [(1, 4), (2, 4), (2, 8), (3, 6)])
def test_routing_respects_tokens_per_expert_and_slots(k, c):
    t, e = 16, 4
    logits = 2.0 * jax.random.normal(jax.random.key(k * c), (t, e))
    sol = ksparse_ot_plan(logits, c, gamma=0.5, max_iterations=2000, tolerance=1e-5)
    r = jax.jit(ksparse_ot_routing, static_argnums=(1, 2),
                static_argnames=("gamma", "max_iterations", "tolerance"))(logits, k, c, gamma=0.5,
                                                                           max_iterations=2000, tolerance=1e-5)
    plan, idx, valid = np.asarray(sol.plan), np.asarray(r.expert_index), np.asarray(r.valid)
    assert ((plan > 0).sum(0) <= c).all()
    per_expert = np.zeros(e, int)
    np.add.at(per_expert, idx[valid], 1)
    assert (per_expert <= c).all()                                        # an expert gets at most c tokens
    np.testing.assert_array_equal(valid, np.take_along_axis(plan, idx, 1) > 0)
    if c > t // e:      # slack in the cardinality: the ascent converges and every token has an expert
        assert bool(sol.converged) and valid[:, 0].all()
    w = np.asarray(r.weight)
    np.testing.assert_allclose(w[valid], np.take_along_axis(np.asarray(jax.nn.softmax(logits)), idx, 1)[valid],
                               rtol=1e-6)
    assert (w[~valid] == 0).all()


def test_routing_with_one_token_per_slot_is_the_balanced_assignment():
    """c = T/E and k = 1 with a decisive cost: the plan is the max-affinity balanced assignment (BASE's problem),
    checked against scipy's assignment on the expanded T x T slot matrix."""
    t, e = 8, 4
    logits = 3.0 * jax.random.normal(jax.random.key(3), (t, e))
    r = ksparse_ot_routing(logits, 1, t // e, gamma=0.05, max_iterations=5000, tolerance=1e-6)
    slots = np.repeat(np.asarray(logits), t // e, axis=1)               # [T, T]: expert e owns T/E slots
    rows, cols = linear_sum_assignment(-slots)
    np.testing.assert_array_equal(np.asarray(r.expert_index)[rows, 0], cols // (t // e))
    assert np.asarray(r.valid).all()


def test_infeasible_tokens_per_expert_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"^router\.ot_tokens_per_expert=1: E \* c = 4 < T = 16"):
        ksparse_ot_routing(jnp.zeros((16, 4)), 1, 1)


def _layer_cfg(router, mode="capacity", cf=1.0):
    return MoEConfig(num_experts=4, hidden_dim=3, router=router,
                     dispatch=DispatchConfig(mode=mode, capacity_factor=cf, gmm="blocked", gmm_tile=4))


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_layer_matches_the_reference_in_training_with_finite_gradients(mode):
    e, d = 4, 5
    cfg = _layer_cfg(RouterConfig(kind="ksparse_ot", k=2, ot_gamma=0.5, ot_max_iterations=200), mode)
    x = jax.random.normal(jax.random.key(0), (2, 8, d))
    params = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))["params"]
    params["router"] = {"kernel": jax.random.normal(jax.random.key(2), (d, e))}
    cot = jax.random.normal(jax.random.key(9), x.shape)
    cap = cfg.capacity(16, True)

    def layer(p, xx):
        return jnp.sum(MoELayer(cfg).apply({"params": p}, xx, deterministic=False).y * cot)

    def oracle(p, xx):
        tokens = xx.reshape(-1, d)
        routing = Router(e, cfg.router).apply({"params": p["router"]}, tokens, capacity=cap, deterministic=False)
        y = reference.moe(tokens, routing, p["experts"], kind="mlp", activation="gelu",
                          capacity=cap if mode == "capacity" else None)
        return jnp.sum(y.reshape(xx.shape) * cot)

    (v, g), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x) for f in (layer, oracle))
    np.testing.assert_allclose(v, v_ref, rtol=2e-5, atol=2e-5)
    for a_, b_ in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert np.isfinite(np.asarray(a_)).all()
        np.testing.assert_allclose(a_, b_, rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(g[0]["router"]["kernel"]).sum()) > 0             # the router learns through the weights
    out = MoELayer(cfg).apply({"params": params}, x, deterministic=False)
    assert float(out.stats.dropped_fraction) == 0.0                       # c = C: the plan never overflows


def test_a_tiny_layer_trains():
    cfg = _layer_cfg(RouterConfig(kind="ksparse_ot", k=1, ot_gamma=0.5, ot_max_iterations=100), cf=1.5)
    x = jax.random.normal(jax.random.key(0), (4, 8, 6))
    target = jnp.tanh(x @ jax.random.normal(jax.random.key(5), (6, 6)))
    params = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))["params"]

    def loss(p):
        return jnp.mean((MoELayer(cfg).apply({"params": p}, x, deterministic=False).y - target) ** 2)

    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, jax.grad(loss)(p)))
    first = float(loss(params))
    for _ in range(20):
        params = step(params)
        assert all(np.isfinite(np.asarray(w)).all() for w in jax.tree_util.tree_leaves(params))
    assert float(loss(params)) < first


def test_greedy_in_eval_unless_balance_in_eval():
    x = jax.random.normal(jax.random.key(4), (16, 5))
    cfg = RouterConfig(kind="ksparse_ot", k=2, ot_tokens_per_expert=6)
    variables = {"params": {"kernel": jax.random.normal(jax.random.key(3), (5, 4))}}

    def apply(c, det):
        return jax.jit(lambda v, xx: Router(4, c).apply(v, xx, deterministic=det, return_logits=True))(variables, x)

    train, logits = apply(cfg, False)
    evals, _ = apply(cfg, True)
    both, _ = apply(dataclasses.replace(cfg, balance_in_eval=True), True)
    np.testing.assert_array_equal(evals.expert_index, top_k_routing(logits, 2).expert_index)
    np.testing.assert_array_equal(both.expert_index, train.expert_index)
    assert not np.array_equal(np.asarray(train.valid), np.ones((16, 2), bool)) or \
        not np.array_equal(train.expert_index, evals.expert_index)       # the plan changed something


@pytest.mark.parametrize("kwargs,match", [
    ({"ot_gamma": 0}, r"^router\.ot_gamma=0: must be a finite number > 0$"),
    ({"ot_gamma": float("nan")}, r"^router\.ot_gamma=nan: must be a finite number > 0$"),
    ({"ot_max_iterations": 0}, r"^router\.ot_max_iterations=0: must be an integer >= 1$"),
    ({"ot_tokens_per_expert": 0}, r"^router\.ot_tokens_per_expert=0: must be None"),
    ({"ot_tolerance": -1.0}, r"^router\.ot_tolerance=-1\.0: must be a finite number >= 0$"),
    ({"ot_method": "newton"}, r"^router\.ot_method='newton': must be one of \['agd', 'lbfgs'\]$"),
    ({"score": "relu"}, r"^router\.score='relu'"),
    ({"balance_iterations": 3}, r"^router\.balance_iterations=3: not a field of router\.kind='ksparse_ot'"),
])
def test_config_errors_are_one_line_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        RouterConfig(kind="ksparse_ot", k=2, **kwargs)
    assert "\n" not in str(info.value)


def test_capacity_too_small_for_a_plan_is_a_config_error():
    with pytest.raises(ValueError, match=r"^dispatch\.capacity_factor=0\.25: router\.kind='ksparse_ot'"):
        _layer_cfg(RouterConfig(kind="ksparse_ot", k=2), cf=0.25)
    _layer_cfg(RouterConfig(kind="ksparse_ot", k=2, ot_tokens_per_expert=8), cf=0.25)   # c given: no check
    _layer_cfg(RouterConfig(kind="ksparse_ot", k=2), cf=None)
    cfg = MoEConfig.from_dict({"num_experts": 4, "hidden_dim": 3, "router": {"kind": "ksparse_ot", "k": 2,
                                                                              "ot_gamma": 0.25}})
    assert cfg.router.ot_gamma == 0.25 and cfg.router.options.name == "ksparse_ot"


def test_lbfgs_method_routes_inside_the_layer_with_finite_gradients():
    cfg = _layer_cfg(RouterConfig(kind="ksparse_ot", k=2, ot_method="lbfgs", ot_max_iterations=30))
    x = jax.random.normal(jax.random.key(0), (2, 8, 5))
    params = nn.unbox(MoELayer(cfg).init(jax.random.key(1), x))["params"]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(MoELayer(cfg).apply({"params": p}, x, deterministic=False).y ** 2)))(
        params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["router"]["kernel"]).sum()) > 0
