"""Upcycling: a dense Transformer LM's checkpoint turned into an MoE one.

Two constructions of the experts of every selected block's FFN (``D`` model width, ``F`` the dense FFN's hidden
width ``config.dense_width``, ``E`` experts, ``K`` experts per token):

* ``mode="copy"`` (sparse upcycling; Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from
  Dense Checkpoints", arXiv:2212.05055): ``E`` copies of the dense FFN (width ``F`` each), optionally perturbed.
* ``mode="partition"`` (LLaMA-MoE; Zhu et al. 2024, "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with
  Continual Pre-training", arXiv:2406.16554): the ``F`` hidden neurons split into ``E`` disjoint experts of width
  ``F / E`` (the paper's "independent random" split).

Everything that is not a selected FFN is copied unchanged; the router of every new MoE FFN is fresh. The result
is an ordinary moejax model: ``TransformerLM(new_config)`` with the returned parameters, trained further by the
normal trainer. See :func:`upcycle` for the router and combine-weight choices that make the upcycled model start
as the dense one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.core import meta

from moejax.config import MoEConfig
from moejax.experts.ffn import ffn_param_shapes
from moejax.models.config import LMConfig
from moejax.routing.config import RouterConfig

MODES = ("copy", "partition")
LAYER_PRESETS = ("all", "every_other")
# moejax's own Router kernel init is N(0, 0.02^2); a copy-mode router starts the same way.
DEFAULT_ROUTER_SCALE = 0.02

# How each dense FFN parameter maps onto partitioned experts, by the role of its axes:
_HIDDEN_COLUMNS = ("w_in", "w_gate", "w_up")     # [D, F]: expert e takes columns idx[e]
_HIDDEN_BIASES = ("b_in", "b_gate", "b_up")      # [F]: expert e takes entries idx[e]
_HIDDEN_ROWS = ("w_out", "w_down")               # [F, D]: expert e takes rows idx[e]
_OUTPUT_BIASES = ("b_out", "b_down")             # [D]: added once by the dense FFN, so each expert adds 1/E of it


def upcycle(config: LMConfig, params: Mapping[str, Any], *, num_experts: int, k: int, mode: str = "copy",
            noise: float = 0.0, rng: jax.Array | None = None, layers: str | tuple[int, ...] = "all",
            router_init_scale: float | None = None) -> tuple[LMConfig, dict[str, Any]]:
    """The MoE model upcycled from a dense LM: ``(new_config, new_params)``; the inputs are not modified.

    Args:
      config: a dense :class:`~moejax.models.config.LMConfig` (``moe=None``): every block's FFN is a
        ``DenseLayer`` of width ``F = config.dense_width``, kind ``config.ffn_kind``.
      params: the dense model's ``params`` collection (``{'embed': ..., 'decoder': {'block_0': {'ffn': {'w_in'
        [D, F], ...}}}}``), boxed or plain arrays; a variables dict ``{'params': ...}`` is accepted too and the
        result has the same form.
      num_experts: ``E`` routed experts per upcycled FFN.
      k: ``K`` experts per token, in ``[1, E]``.
      mode: ``copy`` or ``partition`` (below).
      noise: copy mode: Gaussian noise added to every expert copy, with standard deviation ``noise`` times the
        root-mean-square of the dense tensor it copies (per parameter tensor and block; an all-zero bias stays
        zero), so that the copies can diverge from the start. 0 keeps exact copies.
      rng: PRNG key for the router kernels, the noise and the random partition; the result is a deterministic
        function of it (None: ``jax.random.key(0)``). Block ``i`` draws from ``fold_in(rng, i)``, so a block's
        result does not depend on which other blocks are upcycled.
      layers: the blocks to upcycle: ``'all'``, ``'every_other'`` (blocks 1, 3, ...: the GShard/Switch
        convention, ``moe_every=2``) or a tuple of block indices. Any non-empty set of blocks is expressible with
        ``moe_every`` / ``dense_layers``; the returned config uses the largest ``moe_every`` that needs the fewest
        ``dense_layers``.
      router_init_scale: standard deviation of the fresh router kernels float32[D, E] (normal, mean 0). None:
        0 for ``partition`` with ``k == E`` (a kernel with equal columns, e.g. zero, is the only router under
        which every expert weighs exactly 1 for every token, see below), else 0.02 (moejax's ``Router`` default).

    Returns:
      ``new_config``: ``config`` with ``moe`` set (``num_experts=E``, ``hidden_dim`` ``F`` (copy) or ``F/E``
      (partition), the dense FFN's kind, activation, bias and dtypes, a ``topk`` router, dropless dispatch) and
      ``moe_every`` / ``dense_layers`` selecting exactly the upcycled blocks; ``new_params``: a complete parameter
      tree of plain arrays for ``TransformerLM(new_config)`` (upcycled blocks' ``ffn`` is ``{'router': {'kernel'
      [D, E]}, 'experts': {'w_in' [E, D, F'], ...}}``).

    Copy mode, router and combine weights. Sparse upcycling initialises every expert as an exact copy of the
    dense MLP, keeps all other weights, and trains a router created from scratch (randomly initialised); its
    routers (Expert Choice in the vision models and the language encoders, top-K in the decoders) combine with
    router probabilities that need not sum to one per token, so its upcycled model starts only *close to* the dense
    function. Here the start is exact: with identical experts ``f`` a token's output is ``sum_k w_k f(x)``, which is
    ``f(x)`` for every router iff the token's combine weights sum to 1, so the router is ``topk`` with softmax
    scores and ``renormalize=True`` (the chosen weights divided by their sum, as in Mixtral), for every ``K`` and
    every router kernel; ``router_init_scale`` only sets how strongly the fresh router prefers experts at the start.
    Two consequences, inherent to an exact start: while the experts are identical the task loss gives the router
    no gradient (the output does not depend on the weights), so the router starts learning as the experts diverge
    (they receive different tokens; ``noise > 0`` makes them differ from step 0); and with ``K = 1`` the
    renormalised weight is always 1, so the router learns from the auxiliary (load-balance, z) losses only, as
    with any renormalised top-1 router. The dispatch is dropless: a capacity limit that drops tokens would break
    the equality. ``noise`` is our option for symmetry breaking; 0 keeps the paper's exact copies.

    Partition mode and the weight-1 combination. With disjoint neuron sets, the dense FFN is the *sum* of the
    experts' outputs (``act`` acts per neuron; the output bias is split as ``b_out / E`` per expert), so the MoE
    reproduces it exactly when all ``E`` experts are active with weight 1 each. moejax expresses this with a
    ``topk`` router with ``renormalize=True`` and ``routed_scaling=E`` and a zero router kernel: the softmax over
    ``E`` equal logits is ``1/E``, renormalised over the ``K`` chosen experts ``1/K``, scaled by ``E``: weight
    ``E/K`` per chosen expert, which is exactly 1 at ``K = E``. The expert parameters stay exact slices of the dense
    ones (no rescaled down-projections), and the router stays learned. With ``K < E`` the output at init is
    ``(E/K) * sum_{chosen k} f_k(x)``: an approximation of the dense FFN, unbiased when the ``K`` experts are a
    uniformly random choice (each part enters with probability ``K/E``); the larger ``E/K``, the coarser. LLaMA-MoE
    likewise zero-initialises its linear gate and re-scales the expert outputs (the paper by ``N/K``, on top of a
    softmax renormalised over the chosen experts); at a zero router every logit ties, so ``jax.lax.top_k`` picks
    experts ``0..K-1`` for every token until the router learns, which is why the default ``router_init_scale`` is
    0.02 for ``K < E`` (each token gets its own experts, with weights close to ``E/K``). The neurons are
    split by a random permutation of ``F`` (deterministic given ``rng``); LLaMA-MoE's clustered split is not
    implemented.

    Raises:
      ValueError: one line naming the argument: ``config`` already MoE, ``num_experts < 1``, ``k`` outside
        ``[1, E]``, unknown ``mode``, negative or non-finite ``noise`` (or noise in partition mode), ``F`` not
        divisible by ``E`` in partition mode (named ``num_experts``), ``layers`` selecting no block or an
        out-of-range one, ``router_init_scale < 0``, ``params`` not the dense model's tree.
    """
    _check_args(config, num_experts, k, mode, noise, router_init_scale)
    blocks = select_blocks(layers, config.num_layers)
    moe_every, dense_layers = layer_pattern(blocks, config.num_layers)
    scale = router_init_scale
    if scale is None:
        scale = 0.0 if mode == "partition" and k == num_experts else DEFAULT_ROUTER_SCALE
    moe = moe_config(config, num_experts=num_experts, k=k, mode=mode)
    new_config = dataclasses.replace(config, moe=moe, moe_every=moe_every, dense_layers=dense_layers)

    wrapped = "params" in params and "decoder" not in params
    tree = _plain(params["params"] if wrapped else params)
    decoder = tree.get("decoder") if isinstance(tree, dict) else None
    if not isinstance(decoder, dict):
        raise ValueError("params: expected the dense LM's params collection with a 'decoder' subtree")
    key = jax.random.key(0) if rng is None else rng
    new_decoder = dict(decoder)
    for i in blocks:
        dense = _dense_ffn(config, decoder, i)
        block_key = jax.random.fold_in(key, i)
        new_decoder[f"block_{i}"] = {**decoder[f"block_{i}"],
                                     "ffn": _upcycle_ffn_jit(dense, block_key, float(noise), float(scale),
                                                             kind=config.ffn_kind, num_experts=num_experts, mode=mode,
                                                             noisy=noise > 0)}
    new_tree = {**tree, "decoder": new_decoder}
    return new_config, ({**params, "params": new_tree} if wrapped else new_tree)


def moe_config(config: LMConfig, *, num_experts: int, k: int, mode: str) -> MoEConfig:
    """The ``MoEConfig`` of an upcycled FFN: the dense FFN's kind, activation, bias and dtypes; width ``F`` (copy)
    or ``F / E`` (partition); a ``topk`` softmax router with renormalised weights, scaled by ``E`` in partition mode
    (see :func:`upcycle`); dropless dispatch (no token is dropped, so the exact start holds)."""
    width = config.dense_width if mode == "copy" else config.dense_width // num_experts
    router = RouterConfig(kind="topk", k=k, renormalize=True,
                          routed_scaling=1.0 if mode == "copy" else float(num_experts))
    return MoEConfig(num_experts=num_experts, hidden_dim=width, expert_kind=config.ffn_kind,
                     activation=config.activation, use_bias=config.use_bias, router=router,
                     dtype=config.dtype, param_dtype=config.param_dtype)


def upcycle_ffn(dense: Mapping[str, jax.Array], kind: str, *, num_experts: int, mode: str, noise: float | jax.Array,
                rng: jax.Array, router_init_scale: float | jax.Array) -> dict[str, Any]:
    """One dense FFN's parameters (``w_in`` [D, F], ... of ``kind``) -> the MoE FFN's ``{'router': {'kernel'
    [D, E]}, 'experts': {...}}`` (stacked [E, ...])."""
    router_key, expert_key = jax.random.split(rng)
    if mode == "copy":
        experts = copy_experts(dense, num_experts, noise=noise, rng=expert_key)
    else:
        experts = partition_experts(dense, kind, num_experts, rng=expert_key)
    w = dense["w_in" if kind == "mlp" else "w_gate"]                        # [D, F]
    kernel = router_init_scale * jax.random.normal(router_key, (w.shape[0], num_experts), jnp.float32)
    return {"router": {"kernel": kernel.astype(w.dtype)}, "experts": experts}


# One compilation per FFN shape and setting, shared by all blocks (eagerly, every small op would compile on its own).
@functools.partial(jax.jit, static_argnames=("kind", "num_experts", "mode", "noisy"))
def _upcycle_ffn_jit(dense: Mapping[str, jax.Array], rng: jax.Array, noise: jax.Array, scale: jax.Array, *,
                     kind: str, num_experts: int, mode: str, noisy: bool) -> dict[str, Any]:
    # noise and scale are traced, so a sweep over them reuses the compilation; only noise=0 vs > 0 is static.
    return upcycle_ffn(dense, kind, num_experts=num_experts, mode=mode, noise=noise if noisy else 0.0, rng=rng,
                       router_init_scale=scale)


def copy_experts(dense: Mapping[str, jax.Array], num_experts: int, *, noise: float | jax.Array = 0.0,
                 rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """``E`` copies of every dense parameter: [...] -> [E, ...], each plus ``N(0, (noise * rms(p))^2)`` noise.

    The noise is relative to the tensor's root-mean-square so that one ``noise`` value means the same relative
    perturbation for kernels and biases of any scale (an all-zero bias stays zero).
    """
    names = sorted(dense)
    stacked = {name: jnp.broadcast_to(jnp.asarray(dense[name])[None], (num_experts, *jnp.shape(dense[name])))
               for name in names}
    if isinstance(noise, (int, float)) and noise <= 0:       # a traced noise value always draws
        return stacked
    # One draw for all tensors, sliced: a single PRNG computation compiles much faster than one per tensor.
    sizes = [math.prod(stacked[name].shape) for name in names]
    eps = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, start = {}, 0
    for name, size in zip(names, sizes):
        p32 = jnp.asarray(dense[name]).astype(jnp.float32)
        rms = jnp.sqrt(jnp.mean(jnp.square(p32)))
        draw = eps[start:start + size].reshape(stacked[name].shape)
        out[name] = (p32[None] + noise * rms * draw).astype(stacked[name].dtype)
        start += size
    return out


def neuron_partition(rng: jax.Array, hidden: int, num_experts: int) -> jax.Array:
    """int32[E, F / E]: a uniformly random split of the ``F`` hidden neurons into ``E`` disjoint equal sets, each
    sorted (so an expert keeps the dense FFN's neuron order)."""
    return jnp.sort(jax.random.permutation(rng, hidden).reshape(num_experts, hidden // num_experts), axis=-1)


def partition_experts(dense: Mapping[str, jax.Array], kind: str, num_experts: int, *, rng: jax.Array,
                      index: jax.Array | None = None) -> dict[str, jax.Array]:
    """The dense FFN's neurons split into ``E`` experts: expert ``e`` owns neurons ``index[e]`` (default
    :func:`neuron_partition`), so that ``sum_e expert_e(x) = dense(x)`` exactly.

    ``w_in``/``w_gate``/``w_up`` [D, F] -> [E, D, F/E]; ``b_in``/``b_gate``/``b_up`` [F] -> [E, F/E];
    ``w_out``/``w_down`` [F, D] -> [E, F/E, D]; ``b_out``/``b_down`` [D] -> [E, D] holding ``b / E`` (the sum over
    the E experts adds it once).
    """
    hidden = dense["w_in" if kind == "mlp" else "w_gate"].shape[1]
    idx = neuron_partition(rng, hidden, num_experts) if index is None else index
    out = {}
    for name, p in dense.items():
        p = jnp.asarray(p)
        if name in _HIDDEN_COLUMNS:
            out[name] = jnp.moveaxis(p[:, idx], 1, 0)                      # [D, E, F/E] -> [E, D, F/E]
        elif name in _HIDDEN_BIASES or name in _HIDDEN_ROWS:
            out[name] = p[idx]
        elif name in _OUTPUT_BIASES:
            out[name] = jnp.broadcast_to((p / num_experts)[None], (num_experts, *p.shape)).astype(p.dtype)
        else:
            raise ValueError(f"params: unexpected dense FFN parameter {name!r} for kind {kind!r}")
    return out


def select_blocks(layers: str | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The sorted block indices ``layers`` names (``'all'``, ``'every_other'`` = 1, 3, ..., or indices)."""
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers={layers!r}: must be one of {list(LAYER_PRESETS)} or a tuple of block indices")
        blocks = tuple(range(num_layers)) if layers == "all" else tuple(range(1, num_layers, 2))
    else:
        if not isinstance(layers, (tuple, list)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"layers={layers!r}: must be 'all', 'every_other' or a tuple of block indices")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers={tuple(layers)!r}: block {bad[0]} is not in [0, num_layers={num_layers})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers={tuple(layers)!r}: a block is listed twice")
        blocks = tuple(sorted(layers))
    if not blocks:
        raise ValueError(f"layers={layers!r}: selects no block of a {num_layers}-block model")
    return blocks


def layer_pattern(blocks: tuple[int, ...], num_layers: int) -> tuple[int, tuple[int, ...]]:
    """``(moe_every, dense_layers)`` whose MoE blocks (``(i + 1) % moe_every == 0`` and ``i`` not in
    ``dense_layers``) are exactly ``blocks``: the fewest ``dense_layers``, then the largest ``moe_every``.

    ``moe_every=1`` with every other block in ``dense_layers`` always works, so any non-empty set is expressible.
    """
    chosen = set(blocks)
    best: tuple[int, tuple[int, ...]] | None = None
    for every in range(num_layers, 0, -1):
        if any((i + 1) % every for i in chosen):
            continue
        dense = tuple(i for i in range(num_layers) if (i + 1) % every == 0 and i not in chosen)
        if best is None or len(dense) < len(best[1]):
            best = (every, dense)
    assert best is not None        # every=1 always qualifies
    return best


def _check_args(config: LMConfig, num_experts: int, k: int, mode: str, noise: float,
                router_init_scale: float | None) -> None:
    """One-line ValueErrors naming the argument, raised before any array work."""
    if not isinstance(config, LMConfig):
        raise ValueError(f"config={type(config).__name__}: must be an LMConfig")
    if config.moe is not None:
        raise ValueError("config.moe: the model is already an MoE (moe is set); upcycle takes a dense model")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: must be an integer >= 1")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k={k!r}: must be an integer in [1, num_experts={num_experts}]")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {list(MODES)}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise={noise!r}: must be a finite number >= 0")
    if mode == "partition":
        if noise:
            raise ValueError(f"noise={noise!r}: applies to mode='copy' only (partitioned experts already differ)")
        if config.dense_width % num_experts:
            raise ValueError(f"num_experts={num_experts}: must divide the dense FFN width F={config.dense_width} "
                             f"in mode='partition'")
    if router_init_scale is not None and (
            isinstance(router_init_scale, bool) or not isinstance(router_init_scale, (int, float))
            or not math.isfinite(router_init_scale) or router_init_scale < 0):
        raise ValueError(f"router_init_scale={router_init_scale!r}: must be a finite number >= 0, or None")


def _plain(tree: Any) -> Any:
    """Nested plain dicts of plain arrays (Flax ``Partitioned`` boxes and ``FrozenDict`` removed)."""
    tree = meta.unbox(tree)
    if isinstance(tree, Mapping):
        return {name: _plain(value) for name, value in tree.items()}
    return tree


def _dense_ffn(config: LMConfig, decoder: Mapping[str, Any], i: int) -> dict[str, jax.Array]:
    """Block ``i``'s dense FFN parameters, checked against the shapes ``config`` implies."""
    block = decoder.get(f"block_{i}")
    ffn = block.get("ffn") if isinstance(block, Mapping) else None
    if not isinstance(ffn, Mapping):
        raise ValueError(f"params: decoder/block_{i}/ffn is missing")
    want = {name: shape for name, (shape, _) in ffn_param_shapes(config.ffn_kind, config.d_model, config.dense_width,
                                                                 config.use_bias).items()}
    got = {name: tuple(jnp.shape(p)) for name, p in ffn.items()}
    if got != want:
        raise ValueError(f"params: decoder/block_{i}/ffn has {got}, the dense config implies {want}")
    return dict(ffn)
