"""``dispatch.gmm=bulk``: XLA, the CPU default (:mod:`moejax.dispatch.padded_gmm`, ``bulk = M / E``).

The first ``M / E`` rows of every group in one batched matmul, the overflow in tile-aligned blocks; its fused form
runs the MoE layer's whole expert FFN in that layout (:mod:`moejax.dispatch.bulk_ffn`), with tile levels and a slab
size chosen by ``bulk_ffn.layout_rule`` for ``dispatch.gmm_tile='auto'`` (the default). Written and measured for
XLA:CPU; pure XLA, so it runs anywhere.
"""
from moejax.dispatch import bulk_ffn, padded_gmm
from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend

BACKEND = register_gmm_backend(GmmBackend("bulk", padded_gmm.gmm_bulk, takes_tile=True, fused_ffn=bulk_ffn.bulk_ffn,
                                            tile_levels=True))
