"""Experts: FFN computations over stacked ``[E, ...]`` parameters, for tokens already grouped by expert."""
from moejax.experts.ffn import (ACTIVATION_FNS, FFN, Dense, ExpertFFN, ExpertWeights, GroupedMatmul,
                                Grouping, Padded, Ragged, activation_fn, ffn, ffn_param_shapes, merge_params)
from moejax.experts.zero_computation import ZeroComputationExperts, heterogeneous_load_balance, split_routing

__all__ = ["ACTIVATION_FNS", "FFN", "Dense", "ExpertFFN", "ExpertWeights", "GroupedMatmul", "Grouping",
           "Padded", "Ragged", "ZeroComputationExperts", "activation_fn", "ffn", "ffn_param_shapes",
           "heterogeneous_load_balance", "merge_params", "split_routing"]
