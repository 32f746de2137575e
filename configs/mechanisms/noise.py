"""Routing noise in training: Gumbel selection noise, SiRA gate dropout, Switch input jitter, and V-MoE's
batch-prioritised capacity dispatch.

python -m moejax.main --config=configs/mechanisms/noise.py --workdir=/tmp/moejax_noise

Top-2 of ``logits + gumbel_noise * Gumbel(0, 1)`` (Kool et al. 2019: samples 2 experts without replacement
from the router distribution; the weights stay the noise-free probabilities), then each chosen gate is
dropped with probability ``gate_dropout`` and the kept ones are scaled by 1/(1 - rate) (Zhu et al. 2023, SiRA);
the router input is multiplied by ``U(1 - eps, 1 + eps)`` (Fedus et al. 2021, Switch). All three act only in
training. Capacity dispatch with ``priority='score'`` (Riquelme et al. 2021, V-MoE): when an expert overflows,
the copies with the largest routing weights keep their slots.

A small MLP classifier on scikit-learn's digits (no network), 200 steps; see docs/routing_mechanisms.md.
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config() -> ml_collections.ConfigDict:
    layer = {"num_experts": 8, "hidden_dim": 64,
             "router": {"k": 2, "gumbel_noise": 1.0, "gate_dropout": 0.1, "jitter_noise": 0.01},
             "dispatch": {"mode": "capacity", "capacity_factor": 1.0, "priority": "score"}}
    return digits_mlp_config([layer, dict(layer)])
