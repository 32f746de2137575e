"""Analytic model FLOPs per token, from the model config: what model FLOPs utilisation (MFU) divides by.

Conventions (those of PaLM's MFU and MaxText's ``calculate_tflops_training_per_device``,
``src/maxtext/utils/maxtext_utils.py``): only matrix multiplications count, 2 FLOPs per multiply-add; norms,
activations, softmax, rotary embeddings, biases, the routing sort and the optimiser do not. A training step costs
3x the forward pass (the backward pass computes two products per forward product: input and weight gradients).
Causal attention counts only the attended (query, key) pairs, about half of the ``L x L`` scores XLA computes and
masks (MaxText divides the non-causal count by 2; here the exact mean, ``(L + 1) / 2`` keys per query).

The parts, each a small function of its own sub-config so that other variants slot in:

* attention: each attention kind's ``flops`` (:mod:`moejax.models.attention`) over :func:`attended_keys`.
* :func:`ffn_flops`: one dense FFN (``mlp``: 2 products, ``glu``: 3).
* :func:`moe_flops`: an MoE layer per token: ``k`` routed experts (the *active* experts, not all ``E``), the shared
  experts (and their gate), the router's projection.
* :func:`lm_flops`, :func:`vit_flops`, :func:`mlp_flops` (or :func:`model_flops` for any model config): the whole
  model, with its embedding / patch projection and head.

Dropped tokens do no expert work, so the routed-expert part is measured rather than assumed: :meth:`ModelFlops.
forward` takes each FFN layer's ``experts_per_token``, the train step's metric of that name
(``RoutingStats.experts_per_token``: FFN experts that processed each token, on average over the step's tokens, after
capacity drops; a layer that dropped a fraction ``d`` of its ``k`` copies reports ``k * (1 - d)``), and counts that
many expert FFNs per token instead of the nominal ``k``. The same measurement covers dynamic-k routers, expert-choice
routers and MoE++ zero-computation experts (copies sent to them are not FFN work). The trainer uses the values of
the step it logs for its whole logging window (an approximation when they move fast). Without measurements (an
analytic count before training) the nominal values hold: ``k`` experts, or ``k * E / num_routed`` with
zero-computation experts (balanced routing over all router outputs).

Not modelled (``UnsupportedFlops``; the trainer then omits MFU): Soft MoE and SMEAR layers, attention kinds without
a ``flops`` method (each kind counts its own: multi-head / grouped-query and multi-head latent attention do).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moejax.config import MoEConfig
from moejax.models.attention import MHA


class UnsupportedFlops(ValueError):
    """The config has a part without an analytic FLOPs count (the message names it)."""


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token of a model, by part.

    attention: every attention layer together. dense_ffn: every dense FFN layer. experts: the routed experts of each
    FFN layer, in ``ffn_specs()`` order (0.0 for a dense layer), at the nominal experts per token, nothing dropped.
    expert_slots: those nominal experts per token of each FFN layer (0.0 for a dense layer).
    shared_experts, router: every MoE layer's shared experts (and gate) and router projection. embed_head: input
    projections (MLP input, ViT patches) and the output head; an embedding lookup is a gather and counts 0.
    tokens_per_example: tokens in one example (LM: the sequence length; ViT: patches (+ class token); MLP: 1).
    """

    attention: float = 0.0
    dense_ffn: float = 0.0
    experts: tuple[float, ...] = ()
    expert_slots: tuple[float, ...] = ()
    shared_experts: float = 0.0
    router: float = 0.0
    embed_head: float = 0.0
    tokens_per_example: int = 1

    def forward(self, experts_per_token: Sequence[float] | None = None) -> float:
        """Forward FLOPs per token; ``experts_per_token``: the measured FFN experts per token of each FFN layer
        (``RoutingStats.experts_per_token``), replacing the nominal ``expert_slots`` (dense layers' values unused)."""
        if experts_per_token is None:
            experts = sum(self.experts)
        else:
            if len(experts_per_token) != len(self.experts):
                raise ValueError(f"experts_per_token: {len(experts_per_token)} values for {len(self.experts)} FFN "
                                 f"layers")
            experts = sum(f / slots * max(float(e), 0.0) for f, slots, e in
                          zip(self.experts, self.expert_slots, experts_per_token) if slots)
        return self.attention + self.dense_ffn + experts + self.shared_experts + self.router + self.embed_head

    def training(self, experts_per_token: Sequence[float] | None = None) -> float:
        """Training FLOPs per token: forward and backward, 3x the forward."""
        return 3.0 * self.forward(experts_per_token)


def matmul_flops(d_in: int, d_out: int) -> float:
    """One token through a ``[d_in, d_out]`` projection."""
    return 2.0 * d_in * d_out


def attended_keys(seq_len: int, *, causal: bool, window: int | None = None) -> float:
    """Keys a query attends to, on average over a sequence of ``seq_len``: all of them (not causal), ``(L + 1) / 2``
    (causal), or with a sliding window of ``window`` keys: positions before it see ``i + 1``, the rest ``window``."""
    if not causal:
        return float(seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops(d_model: int, num_heads: int, seq_len: int, *, causal: bool, head_dim: int | None = None,
                    num_kv_heads: int | None = None, window: int | None = None) -> float:
    """One multi-head (grouped-query) attention layer, per token (:meth:`moejax.models.MHA.flops`): projections
    ``x Wq [D, H*Dh]``, ``x Wk, x Wv [D, Hkv*Dh]``, ``o Wo [H*Dh, D]``, and per query ``2 * H * Dh`` FLOPs per attended
    key for the scores and as many for the values (:func:`attended_keys`)."""
    att = MHA(num_kv_heads=num_kv_heads, head_dim=head_dim, sliding_window=window)
    return att.flops(d_model=d_model, num_heads=num_heads, keys=attended_keys(seq_len, causal=causal, window=window))


def ffn_flops(d_model: int, hidden: int, kind: str) -> float:
    """One dense FFN of width ``hidden``, per token: ``mlp`` (in, out) or ``glu`` (gate, up, down)."""
    if kind not in ("mlp", "glu"):
        raise UnsupportedFlops(f"ffn kind {kind!r}: no FLOPs count")
    return (3 if kind == "glu" else 2) * matmul_flops(d_model, hidden)


@dataclasses.dataclass(frozen=True)
class MoEFlops:
    """One MoE layer's forward FLOPs per token: routed experts (``slots`` nominal experts per token, none dropped),
    shared experts, router."""

    experts: float
    slots: float
    shared: float
    router: float


def moe_flops(spec: MoEConfig, d_model: int) -> MoEFlops:
    """An MoE layer (``layer='sparse'`` or ``'chain'``, ``I`` iterations each a full sparse layer), per token.

    Routed: ``k`` experts of width ``F`` (with MoE++ zero-computation experts, ``k * E / num_routed`` of the slots
    reach an FFN expert under balanced routing). Shared: one FFN of width ``num_shared * shared_hidden`` plus the
    ``[D, 1]`` gate. Router: the scorer's ``flops_per_token`` (``[D, num_routed]`` for linear logits), 0 for
    hash and random routers.
    """
    if spec.layer not in ("sparse", "chain"):
        raise UnsupportedFlops(f"MoE layer={spec.layer!r}: no FLOPs count (only 'sparse' and 'chain')")
    per_expert = ffn_flops(d_model, spec.hidden_dim, spec.expert_kind)
    slots = spec.router.k * spec.num_experts / spec.num_routed
    shared = ffn_flops(d_model, spec.shared_width, spec.expert_kind) if spec.num_shared_experts else 0.0
    if spec.shared_gate:
        shared += matmul_flops(d_model, 1)
    router = 0.0
    if "learned" in spec.router.options.offers:
        router = spec.router.scorer_options.flops_per_token(d_model, spec.num_routed)
    iterations = spec.resolved_chain_iterations if spec.layer == "chain" else 1
    return MoEFlops(iterations * slots * per_expert, iterations * slots, iterations * shared, iterations * router)


def _ffn_layers(specs: Sequence[Any], d_model: int, dense_kind: str) -> dict[str, Any]:
    """The FFN parts of :class:`ModelFlops` for ``specs`` (an ``MoEConfig`` or a dense width per layer)."""
    dense, experts, slots, shared, router = 0.0, [], [], 0.0, 0.0
    for spec in specs:
        if isinstance(spec, MoEConfig):
            moe = moe_flops(spec, d_model)
            experts.append(moe.experts)
            slots.append(moe.slots)
            shared += moe.shared
            router += moe.router
        else:
            dense += ffn_flops(d_model, spec, dense_kind)
            experts.append(0.0)
            slots.append(0.0)
    return {"dense_ffn": dense, "experts": tuple(experts), "expert_slots": tuple(slots), "shared_experts": shared,
            "router": router}


def _attention_layers(cfg: Any, seq_len: int, causal: bool) -> float:
    """Every attention layer of a Transformer config: its attention kind's own count (``AttentionConfig.flops``)."""
    att = cfg.attention
    keys = attended_keys(seq_len, causal=causal, window=att.window() if causal else None)
    try:
        per_layer = att.flops(d_model=cfg.d_model, num_heads=cfg.num_heads, keys=keys)
    except NotImplementedError as e:
        raise UnsupportedFlops(str(e)) from e
    return cfg.num_layers * per_layer


def lm_flops(cfg: Any, seq_len: int) -> ModelFlops:
    """A decoder-only Transformer LM (``LMConfig``) on sequences of ``seq_len`` tokens, per token: causal
    attention, the FFNs, and the ``[D, V]`` output head (tied or not, the logits are a matmul)."""
    return ModelFlops(attention=_attention_layers(cfg, seq_len, causal=True),
                      embed_head=matmul_flops(cfg.d_model, cfg.vocab_size), tokens_per_example=seq_len,
                      **_ffn_layers(cfg.ffn_specs(), cfg.d_model, cfg.ffn_kind))


def vit_flops(cfg: Any) -> ModelFlops:
    """A ViT classifier (``ViTConfig``), per patch token (``N`` patches, plus the class token with ``cls``
    pooling): non-causal attention over them, the FFNs, the patch projection ``[P*P*C, D]`` of the ``N`` patches and
    the ``[D, classes]`` head of the example, both spread over its tokens."""
    n = cfg.num_patches
    tokens = n + (1 if cfg.pooling == "cls" else 0)
    patches = n * matmul_flops(cfg.patch_size ** 2 * cfg.channels, cfg.d_model)
    head = matmul_flops(cfg.d_model, cfg.num_classes)
    return ModelFlops(attention=_attention_layers(cfg, tokens, causal=False), embed_head=(patches + head) / tokens,
                      tokens_per_example=tokens, **_ffn_layers(cfg.ffn_specs(), cfg.d_model, cfg.ffn_kind))


def mlp_flops(cfg: Any, input_dim: int) -> ModelFlops:
    """An MLP classifier (``MLPConfig``) on flattened inputs of ``input_dim`` features; one example = one token."""
    return ModelFlops(embed_head=matmul_flops(input_dim, cfg.d_model) + matmul_flops(cfg.d_model, cfg.num_classes),
                      **_ffn_layers(cfg.layers, cfg.d_model, cfg.ffn_kind))


def model_flops(cfg: Any, *, seq_len: int | None = None, input_dim: int | None = None) -> ModelFlops:
    """:func:`lm_flops` (needs ``seq_len``), :func:`vit_flops` or :func:`mlp_flops` (needs ``input_dim``) by the
    config's kind; :class:`UnsupportedFlops` for anything else."""
    kind = getattr(cfg, "KIND", None)
    if kind == "transformer_lm":
        if seq_len is None:
            raise ValueError("seq_len: needed for a Transformer LM's attention FLOPs")
        return lm_flops(cfg, seq_len)
    if kind == "vit":
        return vit_flops(cfg)
    if kind == "mlp":
        if input_dim is None:
            raise ValueError("input_dim: needed for an MLP classifier's input projection FLOPs")
        return mlp_flops(cfg, input_dim)
    raise UnsupportedFlops(f"model kind {kind!r}: no FLOPs count")
