"""DynaMoE (Gülmez 2026): threshold-based dynamic experts per token and a descending layer-wise schedule.

24 experts and a total maximum k of 6 over three MoE layers, shaped by ``schedule`` (default ``descending``:
12/8/4 experts with at most 3/2/1 per token); each token activates every expert whose probability reaches
``router.threshold``, at least one.

python -m moejax.main --config=configs/mechanisms/dynamoe.py --workdir=/tmp/moejax_dynamoe
"""
import ml_collections

from moejax.training.config import digits_mlp_config


def get_config(schedule: str = "descending") -> ml_collections.ConfigDict:

    from moejax.config import DispatchConfig, MoEConfig, RouterConfig
    from moejax.routing.schedules import scheduled_moe_layers
    base = MoEConfig(num_experts=1, hidden_dim=64, router=RouterConfig(kind="threshold", k=1, threshold=0.2),
                     dispatch=DispatchConfig(mode="dropless"))
    layers = scheduled_moe_layers(base, schedule, total_experts=24, num_layers=3, total_k=6)
    return digits_mlp_config([layer.to_dict() for layer in layers], steps=300)
