"""Experts: FFN computations over stacked ``[E, ...]`` parameters, for tokens already grouped by expert."""
from moejax.experts.ffn import (ACTIVATION_FNS, FFN, Dense, Experts, GroupedMatmul, Grouping, Padded, Ragged,
                                activation_fn, ffn, ffn_param_shapes)

__all__ = ["ACTIVATION_FNS", "FFN", "Dense", "Experts", "GroupedMatmul", "Grouping", "Padded", "Ragged",
           "activation_fn", "ffn", "ffn_param_shapes"]
