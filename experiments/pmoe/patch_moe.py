"""Patch-level routing (pMoE) against a single two-layer CNN on synthetic patch data (JAX).

The setting of Chowdhury, Zhang, Wang, Liu, Chen, *Patch-level Routing in Mixture-of-Experts is Provably
Sample-efficient for Convolutional Neural Networks* (ICML 2023), as far as we could read it (README.md, "What we
read"): a binary label carried by one class-discriminative patch among ``n`` patches, the others label-irrelevant;
a two-layer CNN (one filter bank applied to every patch, ReLU, average pooling, a fixed second layer); pMoE: ``k``
such CNNs ("experts"), each with a linear router that sends it the ``l`` highest-scoring patches of every sample,
weighted by a softmax over those ``l`` scores.

Shapes::

    n   patches per sample        d   patch dimension        M   label-irrelevant patterns
    k   experts                   m   filters per expert     l   patches routed to each expert (l <= n)
    F   filters of a single CNN   B   samples
    x   [B, n, d]   inputs        y   [B] labels in {+1, -1}   pos [B] index of the discriminative patch

Every function is pure (arrays in, arrays out); randomness only through explicit ``jax.random`` keys. The second
layer is fixed (not trained), half +1 and half -1 in every expert and in the CNN.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------------------- data
def make_patterns(key: jax.Array, d: int, irrelevant: int) -> tuple[jax.Array, jax.Array]:
    """``(o [2, d], q [M, d])``: the two class-discriminative patterns (o[0] for y = +1, o[1] for y = -1) and
    the M label-irrelevant patterns, all unit-norm and mutually orthogonal (needs ``d >= 2 + M``)."""
    if d < 2 + irrelevant:
        raise ValueError(f"d={d} < 2 + irrelevant={irrelevant}: the patterns must be orthonormal")
    basis, _ = jnp.linalg.qr(jax.random.normal(key, (d, 2 + irrelevant)))
    basis = basis.T
    return basis[:2], basis[2:]


def sample(key: jax.Array, o: jax.Array, q: jax.Array, num: int, n: int, sigma: float
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``num`` samples ``(x [num, n, d], y [num], pos [num])``.

    Labels alternate +1, -1, +1, ... (so every even-length prefix, i.e. every training set, is exactly
    balanced). Sample i has the discriminative pattern ``o[0]`` (y = +1) or ``o[1]`` (y = -1) at position
    ``pos[i]``, uniform over the n positions; each of its other n - 1 patches is a label-irrelevant pattern
    ``q[j]`` with j uniform over the M patterns, independently of the label; every patch then gets i.i.d.
    N(0, sigma^2) noise in each of its d coordinates.
    """
    k_pos, k_irr, k_noise = jax.random.split(key, 3)
    y = jnp.where(jnp.arange(num) % 2 == 0, 1, -1).astype(jnp.int32)
    pos = jax.random.randint(k_pos, (num,), 0, n)
    x = q[jax.random.randint(k_irr, (num, n), 0, q.shape[0])]                        # [num, n, d]
    disc = o[(1 - y) // 2]                                                             # [num, d]
    x = jnp.where((jnp.arange(n)[None, :] == pos[:, None])[..., None], disc[:, None, :], x)
    x = x + sigma * jax.random.normal(k_noise, x.shape)
    return x, y, pos


# ---------------------------------------------------------------------------------------------------- models
def second_layer(filters: int) -> jax.Array:
    """The fixed output weights of one filter bank: ``[filters]``, the first half +1, the second half -1."""
    return jnp.where(jnp.arange(filters) < filters // 2, 1.0, -1.0)


def init_cnn(key: jax.Array, filters: int, d: int, scale: float) -> dict[str, jax.Array]:
    """``{"w": [F, d]}`` with N(0, scale^2) entries."""
    return {"w": scale * jax.random.normal(key, (filters, d))}


def init_pmoe(key: jax.Array, experts: int, filters: int, d: int, scale: float, router_scale: float
              ) -> dict[str, jax.Array]:
    """``{"w": [k, m, d], "router": [k, d]}``: N(0, scale^2) filters, N(0, router_scale^2) routers."""
    k_w, k_r = jax.random.split(key)
    return {"w": scale * jax.random.normal(k_w, (experts, filters, d)),
            "router": router_scale * jax.random.normal(k_r, (experts, d))}


def cnn_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``f(x) = sum_r a_r (1/n) sum_j relu(w_r . x_j)``: ``[B]`` logits."""
    h = jax.nn.relu(jnp.einsum("bnd,fd->bnf", x, params["w"])).mean(1)               # [B, F]
    return h @ second_layer(params["w"].shape[0])


def route(router: jax.Array, x: jax.Array, l: int) -> tuple[jax.Array, jax.Array]:
    """Patch-level routing: expert s takes the ``l`` patches of each sample with the highest scores
    ``router[s] . x_j`` (ties to the lower index) and weights them by a softmax over those l scores.

    Returns ``(idx [B, k, l] patch indices, gates [B, k, l])``; every row of ``gates`` sums to 1."""
    scores = jnp.einsum("bnd,kd->bkn", x, router)
    values, idx = jax.lax.top_k(scores, l)
    return idx, jax.nn.softmax(values, axis=-1)


def pmoe_apply(params: dict[str, jax.Array], x: jax.Array, l: int) -> jax.Array:
    """``f(x) = sum_s sum_r a_r sum_{j in J_s(x)} G_sj(x) relu(w_sr . x_j)``: ``[B]`` logits, ``J_s``/``G`` from
    :func:`route` (each expert pools its l patches with the gate weights, which sum to 1)."""
    idx, gates = route(params["router"], x, l)
    xs = jnp.take_along_axis(x[:, None], idx[..., None], axis=2)                     # [B, k, l, d]
    h = jax.nn.relu(jnp.einsum("bkld,kmd->bklm", xs, params["w"]))                   # [B, k, l, m]
    pooled = jnp.einsum("bkl,bklm->bkm", gates, h)
    return jnp.einsum("bkm,m->b", pooled, second_layer(params["w"].shape[1]))


def routing_stats(router: jax.Array, x: jax.Array, y: jax.Array, pos: jax.Array, l: int) -> dict[str, jax.Array]:
    """How the routers treat the discriminative patch, on samples (x, y, pos).

    Returns ``capture [k, 2]``: the fraction of the samples of class c (c = 0 for y = +1, 1 for y = -1) whose
    discriminative patch is among expert s's l patches; ``gate [k, 2]``: the mean gate weight expert s gives
    that patch over the samples of class c where it routes it (0 where it never does)."""
    idx, gates = route(router, x, l)
    hit = idx == pos[:, None, None]                                                   # [B, k, l]
    captured = hit.any(-1).astype(jnp.float32)                                        # [B, k]
    gate_on = (gates * hit).sum(-1)                                                   # [B, k]
    cls = jnp.stack([y == 1, y == -1], axis=1).astype(jnp.float32)                    # [B, 2]
    count = jnp.einsum("bk,bc->kc", captured, cls)
    capture = count / jnp.maximum(cls.sum(0), 1.0)[None, :]
    gate = jnp.einsum("bk,bc->kc", gate_on, cls) / jnp.maximum(count, 1.0)
    return {"capture": capture, "gate": gate}


# ------------------------------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class Setup:
    """One run's fixed settings (config.py fills them from the preset and the variant)."""
    n: int                # patches per sample
    d: int                # patch dimension
    irrelevant: int       # M label-irrelevant patterns
    sigma: float          # per-coordinate noise std
    model: str            # "cnn" or "pmoe"
    filters: int          # F (cnn) or m per expert (pmoe)
    experts: int          # k (pmoe; 1 for cnn)
    l: int                # patches per expert (pmoe; n for cnn)
    train_router: bool    # False: the router stays at its initialisation (a control)
    sizes: tuple          # training-set sizes N (the grid), nested prefixes of one pool
    test_size: int
    steps: int            # SGD steps for every N
    batch: int
    lr: float
    init_scale: float
    router_init_scale: float


def make_data(seed: int, setup: Setup) -> dict[str, jax.Array]:
    """The data of a seed, the same for every variant: the patterns, a training pool of ``max(sizes)`` samples
    (a training set of size N is its first N samples) and a test set. Depends only on (seed, n, d, M, sigma)."""
    k_pat, k_train, k_test = jax.random.split(jax.random.PRNGKey(seed), 3)
    o, q = make_patterns(k_pat, setup.d, setup.irrelevant)
    x, y, pos = sample(k_train, o, q, max(setup.sizes), setup.n, setup.sigma)
    xt, yt, post = sample(k_test, o, q, setup.test_size, setup.n, setup.sigma)
    return {"x": x, "y": y, "pos": pos, "x_test": xt, "y_test": yt, "pos_test": post}


def init_params(seed: int, setup: Setup) -> dict[str, jax.Array]:
    """The initial parameters of a seed (a key stream separate from the data's)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    if setup.model == "cnn":
        return init_cnn(key, setup.filters, setup.d, setup.init_scale)
    return init_pmoe(key, setup.experts, setup.filters, setup.d, setup.init_scale, setup.router_init_scale)


def logits_fn(setup: Setup):
    if setup.model == "cnn":
        return cnn_apply
    return lambda params, x: pmoe_apply(params, x, setup.l)


def train(setup: Setup, params0: dict[str, jax.Array], x: jax.Array, y: jax.Array, sizes: jax.Array,
          key: jax.Array) -> dict[str, jax.Array]:
    """Minibatch SGD on the logistic loss ``log(1 + exp(-y f(x)))``, one model per training-set size, all from
    the same initialisation ``params0`` and in one compiled program (``vmap`` over ``sizes``).

    Each step draws ``batch`` indices uniformly (with replacement) from the first N samples of the pool (x, y);
    the step's key is the same for every N. Returns the trained parameters, stacked over sizes (leading axis).
    """
    f = logits_fn(setup)

    def loss(params, xb, yb):
        return jnp.mean(jax.nn.softplus(-yb * f(params, xb)))

    def one(size):
        def step(params, k):
            i = jax.random.randint(k, (setup.batch,), 0, size)
            g = jax.grad(loss)(params, x[i], y[i].astype(jnp.float32))
            if not setup.train_router and "router" in g:
                g = {**g, "router": jnp.zeros_like(g["router"])}
            return jax.tree_util.tree_map(lambda p, gp: p - setup.lr * gp, params, g), None

        params, _ = jax.lax.scan(step, params0, jax.random.split(key, setup.steps))
        return params

    return jax.vmap(one)(sizes)


@functools.lru_cache(maxsize=None)
def compiled(setup: Setup):
    """The jitted training-and-evaluation program of a setup (compiled once, reused by every seed):
    ``(params0, x, y, x_test, y_test, pos_test, key) -> outputs`` (see :func:`run`)."""
    sizes = jnp.asarray(setup.sizes, jnp.int32)
    f = logits_fn(setup)

    @jax.jit
    def go(params0, x, y, xt, yt, post, key):
        trained = train(setup, params0, x, y, sizes, key)
        acc = jax.vmap(lambda p: jnp.mean(jnp.sign(f(p, xt)) == yt))(trained)
        first = jnp.arange(x.shape[0])[None, :] < sizes[:, None]                     # [sizes, pool]
        hits = jax.vmap(lambda p: jnp.sign(f(p, x)) == y)(trained)                    # [sizes, pool]
        out = {"test_acc": acc, "train_acc": (hits * first).sum(1) / sizes}
        if setup.model == "pmoe":
            out["routing"] = jax.vmap(lambda p: routing_stats(p["router"], xt, yt, post, setup.l))(trained)
            out["routing_init"] = routing_stats(params0["router"], xt, yt, post, setup.l)
        return out

    return go


def run(setup: Setup, seed: int) -> dict[str, Any]:
    """Trains one variant of one seed at every size of the grid. Returns, as plain Python lists, per size:
    ``test_acc``, ``train_acc`` (on the N training samples); for pMoE also ``routing`` (:func:`routing_stats` of
    the trained routers on the test set, each entry ``[sizes, k, 2]``) and ``routing_init`` (the same for the
    routers at initialisation: the untrained-router control, ``[k, 2]``)."""
    data = make_data(seed, setup)
    params0 = init_params(seed, setup)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    out = compiled(setup)(params0, data["x"], data["y"], data["x_test"], data["y_test"], data["pos_test"], key)
    return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), out)


# ------------------------------------------------------------------------------------------------- analysis
def sample_complexity(sizes, acc, threshold: float) -> tuple[float | None, str]:
    """The smallest training-set size from which test accuracy stays at or above ``threshold``, interpolated.

    Let i be the first grid index such that ``acc[j] >= threshold`` for every j >= i. Returns ``(N*, status)``:
    ``status = "ok"`` with ``log2 N*`` linearly interpolated between grid points i - 1 and i (where accuracy
    crosses the threshold); ``"left"`` with ``N* = sizes[0]`` when i = 0 (already there at the smallest size);
    ``"right"`` with ``N* = None`` when the last size is below the threshold (not reached on the grid)."""
    acc = list(acc)
    i = len(acc)
    while i > 0 and acc[i - 1] >= threshold:
        i -= 1
    if i == len(acc):
        return None, "right"
    if i == 0:
        return float(sizes[0]), "left"
    a0, a1 = acc[i - 1], acc[i]
    t = (threshold - a0) / (a1 - a0)
    lo, hi = math.log2(sizes[i - 1]), math.log2(sizes[i])
    return float(2 ** (lo + t * (hi - lo))), "ok"
