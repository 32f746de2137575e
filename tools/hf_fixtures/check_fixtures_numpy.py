"""Independent check of ``tests/fixtures/hf/``: a plain-numpy (float64) forward pass of each family, written from
the transformers modeling code, that reads only the fixture files (config.json, safetensors in the Hub per-expert
layout, tokenizer.json) and must reproduce the stored logits (1e-4), routing and greedy generations.

It needs numpy, safetensors and tokenizers, not torch or transformers:

    /work/fixenv/bin/python tools/hf_fixtures/check_fixtures_numpy.py

It is an executable description of what the importer must compute; it is not part of the test suite.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, "tests", "fixtures", "hf")


def load(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), "np") as f:
                for k in f.keys():
                    w[k] = f.get_tensor(k).astype(np.float64)
    return cfg, w


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rope_cos_sin(theta, dim, n):
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    f = np.arange(n)[:, None] * inv[None]  # [L, dim/2]
    return np.cos(f), np.sin(f)


def rope_half(x, cos, sin):
    """rotate_half layout: feature i pairs with i + d/2. x [H, L, d]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_interleaved(x, cos, sin):
    """DeepSeek rope_interleave=True: feature 2j pairs with 2j+1; the output comes out de-interleaved
    ([rotated evens, rotated odds]), which is harmless because q and k get the same permutation."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attend(q, k, v, scale, window=None):
    """q [H, L, d], k/v [KV, L, d] (GQA: query head h uses kv head h // (H // KV))."""
    H, L, _ = q.shape
    rep = H // k.shape[0]
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    s = q @ k.transpose(0, 2, 1) * scale
    i, j = np.arange(L)[:, None], np.arange(L)[None]
    allowed = j <= i
    if window:
        allowed &= j > i - window
    s = np.where(allowed, s, -np.inf)
    o = softmax(s) @ v  # [H, L, dv]
    return o.transpose(1, 0, 2).reshape(L, -1)


def lin(x, w, b=None):
    y = x @ w.T  # HF Linear weights are [out, in]
    return y if b is None else y + b


def mlp(x, w, p):
    return lin(silu(lin(x, w[p + "gate_proj.weight"])) * lin(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"])


def experts(x, w, p, idx, wts, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, a in zip(idx[t], wts[t]):
            q = f"{p}experts.{e}."
            h = silu(x[t] @ w[q + g + ".weight"].T) * (x[t] @ w[q + u + ".weight"].T)
            out[t] += a * (h @ w[q + d + ".weight"].T)
    return out


def topk(a, k):
    return np.argsort(-a, -1, kind="stable")[:, :k]


def softmax_route(logits, k, renorm):
    p = softmax(logits)
    idx = topk(p, k)
    wts = np.take_along_axis(p, idx, -1)
    if renorm:
        wts = wts / wts.sum(-1, keepdims=True)
    return idx, wts


def deepseek_route(logits, bias, cfg):
    E, G, TG, K = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    s = 1 / (1 + np.exp(-logits))
    choice = s + bias  # the correction bias is used for the choice only
    gs = np.sort(choice.reshape(-1, G, E // G), -1)[..., -2:].sum(-1)  # group score: sum of its top-2
    keep = np.zeros_like(gs, bool)
    np.put_along_axis(keep, topk(gs, TG), True, -1)
    choice = np.where(np.repeat(keep, E // G, -1), choice, -np.inf)
    idx = topk(choice, K)
    wts = np.take_along_axis(s, idx, -1)  # weights from the un-biased sigmoid scores
    if cfg["norm_topk_prob"]:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return idx, wts * cfg["routed_scaling_factor"]


def forward(family, cfg, w, ids):
    L = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    eps = cfg["rms_norm_eps"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    routing = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        if family == "deepseek_v3":
            nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            r = cfg["kv_lora_rank"]
            q = lin(rms(lin(h, w[a + "q_a_proj.weight"]), w[a + "q_a_layernorm.weight"], 1e-6), w[a + "q_b_proj.weight"])
            q = q.reshape(L, H, nope + rope).transpose(1, 0, 2)
            ckv = lin(h, w[a + "kv_a_proj_with_mqa.weight"])
            c, k_rot = ckv[:, :r], ckv[:, r:]
            kv = lin(rms(c, w[a + "kv_a_layernorm.weight"], 1e-6), w[a + "kv_b_proj.weight"])
            kv = kv.reshape(L, H, nope + vd).transpose(1, 0, 2)
            k_nope, v = kv[..., :nope], kv[..., nope:]
            cos, sin = rope_cos_sin(cfg["rope_theta"], rope, L)
            rot = rope_interleaved if cfg.get("rope_interleave", True) else rope_half
            q_rot = rot(q[..., nope:], cos, sin)
            k_rot = rot(k_rot[None], cos, sin)  # one rope key shared by all heads
            qq = np.concatenate([q[..., :nope], q_rot], -1)
            kk = np.concatenate([k_nope, np.repeat(k_rot, H, 0)], -1)
            o = attend(qq, kk, v, (nope + rope) ** -0.5)
        else:
            hd = cfg.get("head_dim") or cfg["hidden_size"] // H
            bias = (lambda n: w.get(a + n + ".bias"))
            q = lin(h, w[a + "q_proj.weight"], bias("q_proj"))
            k = lin(h, w[a + "k_proj.weight"], bias("k_proj"))
            v = lin(h, w[a + "v_proj.weight"], bias("v_proj"))
            if family == "olmoe":  # QK-norm over the whole projection, before the head split
                q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
            q = q.reshape(L, H, hd).transpose(1, 0, 2)
            k = k.reshape(L, KV, hd).transpose(1, 0, 2)
            v = v.reshape(L, KV, hd).transpose(1, 0, 2)
            if family == "qwen3_moe":  # QK-norm per head over head_dim
                q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
            cos, sin = rope_cos_sin(cfg["rope_theta"], hd, L)
            q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
            window = cfg.get("sliding_window") if family == "mixtral" else None
            o = attend(q, k, v, hd**-0.5, window)
        x = x + lin(o, w[a + "o_proj.weight"])

        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if family == "mixtral":
            m = p + "block_sparse_moe."
            lg = lin(h, w[m + "gate.weight"])
            idx, wts = softmax_route(lg, cfg["num_experts_per_tok"], True)
            y = experts(h, w, m, idx, wts, ("w1", "w3", "w2"))
        elif family == "deepseek_v3" and i < cfg["first_k_dense_replace"]:
            y, lg = mlp(h, w, p + "mlp."), None
        else:
            m = p + "mlp."
            lg = lin(h, w[m + "gate.weight"])
            if family == "deepseek_v3":
                idx, wts = deepseek_route(lg, w[m + "gate.e_score_correction_bias"], cfg)
                y = experts(h, w, m, idx, wts) + mlp(h, w, m + "shared_experts.")
            else:
                idx, wts = softmax_route(lg, cfg["num_experts_per_tok"], cfg["norm_topk_prob"])
                y = experts(h, w, m, idx, wts)
                if family == "qwen2_moe":
                    gate = 1 / (1 + np.exp(-lin(h, w[m + "shared_expert_gate.weight"])))
                    y = y + gate * mlp(h, w, m + "shared_expert.")
        if lg is not None:
            order = np.argsort(idx, -1)
            routing[i] = (np.take_along_axis(idx, order, -1), np.take_along_axis(wts, order, -1), lg)
        x = x + y
    x = rms(x, w["model.norm.weight"], eps)
    return lin(x, w["lm_head.weight"]), routing


def check(family):
    d = os.path.join(ROOT, family)
    cfg, w = load(d)
    ref = np.load(os.path.join(d, "reference.npz"))
    meta = json.load(open(os.path.join(d, "meta.json")))
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    worst = 0.0
    for p, n in enumerate(ref["prompt_lengths"]):
        ids = [int(t) for t in ref["prompts"][p, :n]]
        assert tok.encode(str(ref["prompt_texts"][p])).ids == ids == meta["prompt_ids"][p]
        logits, routing = forward(family, cfg, w, ids)
        err = float(np.abs(logits - ref[f"logits_{p}"]).max())
        worst = max(worst, err)
        assert err < 1e-4, (family, p, err)
        for i, (idx, wts, lg) in routing.items():
            assert np.array_equal(idx, ref[f"router_idx_{p}_layer{i}"]), (family, p, i)
            assert np.abs(wts - ref[f"router_weights_{p}_layer{i}"]).max() < 1e-5, (family, p, i)
            assert np.abs(lg - ref[f"router_logits_{p}_layer{i}"]).max() < 1e-4, (family, p, i)
        seq = list(ids)
        for _ in range(len(ref[f"generated_{p}"])):  # greedy, recomputed from scratch at every step
            seq.append(int(forward(family, cfg, w, seq)[0][-1].argmax()))
        assert seq[n:] == ref[f"generated_{p}"].tolist(), (family, p, seq[n:])
    print(f"{family}: logits max |diff| {worst:.2e}; routing and 16-token greedy generations match")


if __name__ == "__main__":
    for fam in sys.argv[1:] or ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]:
        check(fam)
