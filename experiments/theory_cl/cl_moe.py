"""A mixture of linear experts learning a stream of over-parameterised regression tasks (numpy).

The setting of Li, Lin, Duan, Liang, Shroff, *Theory on Mixture-of-Experts in Continual Learning* (ICLR 2025),
as far as we could read it (see README.md, "What we read"): one task per round, its ground truth drawn from a
pool of ``N`` vectors; ``M`` linear experts; a linear top-1 gate with additive uniform noise; the routed expert
jumps to the minimum-norm interpolator of the task closest to where it was; the gate takes one gradient step on
a locality loss plus a load-balancing loss, and is either frozen after ``T1`` rounds or never.

Shapes (the update rules are pure functions, arrays in and arrays out; only :func:`make_problem` and
:func:`sample_task` draw from a random generator, and the only state is what :func:`simulate` carries)::

    d   feature dimension              s   samples per task (d > s: over-parameterised)
    N   clusters (ground truths)       M   experts
    X   [d, s]  one task's inputs, one sample per column
    y   [s]     its targets, y = X^T w_n
    W   [M, d]  expert weights          Theta [d, M]  gate weights (one column per expert)

Errors are squared parameter distances ``||w - w_n||^2``: for isotropic inputs this is the expected squared
prediction error of ``w`` on a fresh sample of cluster ``n``; forgetting and generalisation error are built from
it (our reading of the paper's definitions, which we could not read verbatim).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """The fixed part of the task stream.

    ground_truths: [N, d], ``w_n = a v_n + g_n`` with ``g_n ~ N(0, I/d)`` (so ``||g_n||^2 ~ 1``) and ``a`` the
        ``signal_weight``: 0 gives isotropic ground truths (the primary regime); ``a > 0`` puts part of each
        ground truth along its own cluster's signal, so that an expert fitted to another cluster is visibly far
        from it (a robustness regime). The paper's exact ground truths we could not read.
    signals: [N, d], orthonormal feature directions ``v_n`` (here the first N coordinate axes): the one
        sample per task that tells the gate which cluster the task belongs to.
    beta: length of the signal sample ``beta * v_n``.
    sigma: standard deviation of every entry of the other ``s - 1`` (noise) samples.
    samples: s.
    """
    ground_truths: np.ndarray
    signals: np.ndarray
    beta: float
    sigma: float
    samples: int


def make_problem(rng: np.random.Generator, dim: int, samples: int, clusters: int, beta: float,
                 sigma: float, signal_weight: float = 0.0) -> Problem:
    """Draws the N ground truths; ``dim > samples`` (over-parameterised) and ``clusters <= dim``."""
    if not dim > samples >= 2:
        raise ValueError(f"need dim > samples >= 2 (over-parameterised, a signal and a noise sample), "
                         f"got dim={dim}, samples={samples}")
    if clusters > dim:
        raise ValueError(f"clusters={clusters} > dim={dim}: the feature signals must be orthonormal")
    signals = np.eye(clusters, dim)
    truths = rng.normal(0.0, 1.0 / math.sqrt(dim), size=(clusters, dim)) + signal_weight * signals
    return Problem(truths, signals, float(beta), float(sigma), int(samples))


def sample_task(rng: np.random.Generator, problem: Problem) -> tuple[np.ndarray, np.ndarray, int]:
    """One round's task: (X [d, s], y [s], cluster n).

    The cluster is uniform over the N clusters; column 0 of X is the signal ``beta v_n``, columns 1..s-1 are
    Gaussian noise samples (the paper's feature structure as we read it: one signal sample among noise
    samples); y = X^T w_n, without label noise."""
    n = int(rng.integers(problem.ground_truths.shape[0]))
    d = problem.ground_truths.shape[1]
    x = rng.normal(0.0, problem.sigma, size=(d, problem.samples))
    x[:, 0] = problem.beta * problem.signals[n]
    return x, x.T @ problem.ground_truths[n], n


def min_norm_update(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The expert after learning task (X, y): ``argmin ||w' - w|| s.t. X^T w' = y``.

    ``w' = w + X (X^T X)^{-1} (y - X^T w)``: the point gradient descent on the task's squared loss reaches from
    ``w`` (it only moves in the span of X's columns). w: [d], X: [d, s] of rank s, y: [s] -> [d]."""
    return w + x @ np.linalg.solve(x.T @ x, y - x.T @ w)


def gate_logits(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``h_m = sum_i theta_m^T X_i``: the gate scores the sum of the task's samples. theta [d, M], X [d, s] -> [M]."""
    return theta.T @ x.sum(axis=1)


def softmax(h: np.ndarray) -> np.ndarray:
    """[M] -> [M], stable."""
    z = np.exp(h - h.max())
    return z / z.sum()


def route(h: np.ndarray, noise: np.ndarray) -> int:
    """Top-1 with exploration noise: ``argmax_m h_m + r_m`` (noise [M], drawn from Unif[0, lambda])."""
    return int(np.argmax(h + noise))


def locality_grad(pi: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Gradient over the logits of ``L_loc = sum_m pi_m ||w_m(t) - w_m(t-1)||``.

    pi: [M] softmax of the logits; moved: [M] how far each expert moved this round (0 except the routed one).
    ``d L / d h_k = pi_k (moved_k - sum_m pi_m moved_m)``: the routed expert's score falls in proportion to how
    far the task pulled it, i.e. tasks move away from experts they would have to overwrite."""
    return pi * (moved - pi @ moved)


def balance_grad(pi: np.ndarray, load: np.ndarray, rounds: int, alpha: float) -> np.ndarray:
    """Gradient over the current logits of ``L_aux = alpha M sum_m f_m P_m``.

    load: [M] fraction of the ``rounds`` tasks so far routed to each expert (f, no gradient); P_m is the mean of
    the softmax over the same rounds, of which only the current one depends on the current gate, hence the
    ``1 / rounds``: ``d L / d h_k = alpha M / rounds * pi_k (f_k - sum_m pi_m f_m)`` (overloaded experts lose)."""
    return alpha * pi.shape[0] / rounds * pi * (load - pi @ load)


def gate_step(theta: np.ndarray, x: np.ndarray, grad_logits: np.ndarray, lr: float) -> np.ndarray:
    """One gradient step: ``Theta - lr * (sum_i X_i) grad^T`` (chain rule through :func:`gate_logits`)."""
    return theta - lr * np.outer(x.sum(axis=1), grad_logits)


def model_errors(experts: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """``E[m, n] = ||w_m - w_n||^2``. experts [M, d], truths [N, d] -> [M, N]."""
    diff = experts[:, None, :] - truths[None, :, :]
    return np.einsum("mnd,mnd->mn", diff, diff)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One run. ``freeze_after``: the gate's last update round (T1), or None for never frozen.

    ``reference_t1`` is the round at which the expert sets are read off the routing counts for the consistency
    metric; it equals ``freeze_after`` for a frozen run and is set to the frozen twin's T1 for a never-frozen
    one, so that both arms are measured against the same reference point."""
    dim: int
    samples: int
    clusters: int
    experts: int
    rounds: int
    lr: float
    noise: float
    alpha: float
    beta: float
    sigma: float
    signal_weight: float
    freeze_after: int | None
    reference_t1: int
    log_every: int


def simulate(cfg: SimConfig, seed: int) -> dict[str, Any]:
    """Runs ``cfg.rounds`` rounds from zero experts and a zero gate; returns the curves and final diagnostics.

    Two random streams per seed: one draws the ground truths and the task sequence, the other the routing
    noise (one draw of M values every round). So every variant of a seed sees the same tasks (M = 1 included),
    and a frozen run and its never-frozen twin are identical up to round T1: freezing is the only difference.

    Every ``log_every`` rounds (and at the last) it records, with t the round just finished:
      ``forgetting``  F_t = mean over tasks tau < t of ``||w_{m_tau}(t) - w_{n_tau}||^2 - ||w_{m_tau}(tau) -
                      w_{n_tau}||^2`` (how far each past task's own expert has moved away from it since it learnt it);
      ``gen_error``   G_t = mean over tasks tau <= t of ``||w_{m_tau}(t) - w_{n_tau}||^2`` (each task judged by the
                      expert it was routed to when it arrived);
      ``system_error``  mean over clusters of the error of the expert the noise-free gate picks for the signal
                      ``beta v_n`` now (what the current system would do on a new task of each cluster);
      ``gate_drift``  sum of ``||Theta(t) - Theta(t-1)||_F`` over the window;
      ``consistent``  fraction of the window's tasks routed to an expert whose cluster at ``reference_t1`` (the
                      cluster it had received most tasks from) is the task's cluster; None up to reference_t1;
      ``purity``      sum_m max_n C[m, n] / t, C the routing counts so far (1 = every expert only ever saw one
                      cluster).
    """
    task_rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    problem = make_problem(task_rng, cfg.dim, cfg.samples, cfg.clusters, cfg.beta, cfg.sigma, cfg.signal_weight)
    m_count, n_count = cfg.experts, cfg.clusters
    experts = np.zeros((m_count, cfg.dim))
    theta = np.zeros((cfg.dim, m_count))
    counts = np.zeros((m_count, n_count))  # C[m, n]: tasks of cluster n routed to expert m
    learnt_error_sum = 0.0                 # sum over tasks of ||w_{m_tau}(tau) - w_{n_tau}||^2, just after learning
    home_t1: np.ndarray | None = None      # [M] cluster of each expert at reference_t1 (-1: never used)
    curve: dict[str, list] = {k: [] for k in ("round", "forgetting", "gen_error", "system_error", "gate_drift",
                                              "consistent", "purity")}
    window_drift, window_hits, window_tasks = 0.0, 0, 0
    gate_rounds = 0
    start = time.perf_counter()
    for t in range(1, cfg.rounds + 1):
        x, y, n = sample_task(task_rng, problem)
        h = gate_logits(theta, x)
        m = route(h, noise_rng.uniform(0.0, cfg.noise, size=m_count)) if m_count > 1 else 0
        new = min_norm_update(experts[m], x, y)
        moved = np.zeros(m_count)
        moved[m] = np.linalg.norm(new - experts[m])
        experts[m] = new
        counts[m, n] += 1
        learnt_error_sum += float(np.sum((new - problem.ground_truths[n]) ** 2))
        if home_t1 is not None:
            window_hits += int(home_t1[m] == n)
            window_tasks += 1
        if m_count > 1 and (cfg.freeze_after is None or t <= cfg.freeze_after):
            pi = softmax(h)
            grad = locality_grad(pi, moved) + balance_grad(pi, counts.sum(1) / t, t, cfg.alpha)
            updated = gate_step(theta, x, grad, cfg.lr)
            window_drift += float(np.linalg.norm(updated - theta))
            theta = updated
            gate_rounds += 1
        if t == cfg.reference_t1:
            home_t1 = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
        if t % cfg.log_every == 0 or t == cfg.rounds:
            errors = model_errors(experts, problem.ground_truths)
            past = float(np.sum(counts * errors))
            picks = np.argmax(theta.T @ (problem.beta * problem.signals).T, axis=0)  # [N]
            curve["round"].append(t)
            # The current task's own term is exactly 0 (its expert has not moved since it learnt it), so
            # dividing by t - 1 averages over the earlier tasks only.
            curve["forgetting"].append((past - learnt_error_sum) / (t - 1) if t > 1 else 0.0)
            curve["gen_error"].append(past / t)
            curve["system_error"].append(float(errors[picks, np.arange(n_count)].mean()))
            curve["gate_drift"].append(window_drift)
            curve["consistent"].append(window_hits / window_tasks if window_tasks else None)
            curve["purity"].append(float(counts.max(1).sum() / t))
            window_drift, window_hits, window_tasks = 0.0, 0, 0
    load = counts.sum(1)
    home = np.where(load > 0, counts.argmax(1), -1)
    return {
        "curve": curve,
        "load": load.astype(int).tolist(),
        "routing_counts": counts.astype(int).tolist(),
        "expert_cluster_final": home.tolist(),
        "expert_cluster_t1": None if home_t1 is None else home_t1.tolist(),
        "zero_model_error": float(np.mean(np.sum(problem.ground_truths ** 2, axis=1))),
        "gate_rounds": gate_rounds,
        "learnt_error_mean": learnt_error_sum / cfg.rounds,  # a task's error right after its expert learnt it
        "sim_wall_clock_s": time.perf_counter() - start,
    }


def converged_round(rounds: list[int], system_error: list[float], threshold: float, window: int) -> int | None:
    """First logged round at which the median system error of the last ``window`` logs is <= ``threshold``.

    The median, so that one misrouted task (a spike that the next tasks of that cluster repair) does not reset
    convergence; None when it never happens (censored at the last round)."""
    for i in range(window - 1, len(rounds)):
        if float(np.median(system_error[i - window + 1:i + 1])) <= threshold:
            return int(rounds[i])
    return None


def derived_metrics(run: dict[str, Any], rounds: int, t1: int, late_fraction: float = 0.2,
                    conv_threshold: float = 0.01, conv_window: int = 5) -> dict[str, Any]:
    """The numbers the README's decision rules use, from one :func:`simulate` result.

    ``late``: logs with round > (1 - late_fraction) * rounds. ``conv_threshold`` is relative to the zero
    model's error ``mean_n ||w_n||^2``."""
    c = run["curve"]
    r = np.asarray(c["round"])
    late = r > (1.0 - late_fraction) * rounds
    sys_err = np.asarray(c["system_error"])
    drift = np.asarray(c["gate_drift"])
    after = [v for v, t in zip(c["consistent"], r) if v is not None and t > t1]
    late_cons = [v for v, keep in zip(c["consistent"], late) if keep and v is not None]
    load = np.asarray(run["load"], float)
    return {
        "forgetting": c["forgetting"][-1],
        "gen_error": c["gen_error"][-1],
        "system_error_late_mean": float(sys_err[late].mean()),
        "system_error_late_std": float(sys_err[late].std()),
        "consistent_first_after_t1": after[0] if after else None,
        "consistent_late": float(np.mean(late_cons)) if late_cons else None,
        "purity": c["purity"][-1],
        "converged_round": converged_round(c["round"], c["system_error"],
                                           conv_threshold * run["zero_model_error"], conv_window),
        "gate_drift_to_t1": float(drift[r <= t1].sum()),
        "gate_drift_after_t1": float(drift[r > t1].sum()),
        "active_experts": int((load > 0.1 * load.mean()).sum()),
        "experts": len(run["load"]),
        "clusters_covered": len({n for n in run["expert_cluster_final"] if n >= 0}),
        "clusters": len(run["routing_counts"][0]),
        "load_max_over_mean": float(load.max() / load.mean()),
    }
