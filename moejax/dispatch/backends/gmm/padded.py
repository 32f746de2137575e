"""``dispatch.gmm=padded``: XLA, every group padded to tile-aligned blocks
(:func:`moejax.dispatch.padded_gmm.gmm_padded`).

A loop over the non-empty blocks with a hand-written VJP. Written for XLA:CPU; pure XLA, so it runs anywhere.
"""
from moejax.dispatch import padded_gmm
from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend

BACKEND = register_gmm_backend(GmmBackend("padded", padded_gmm.gmm_padded, takes_tile=True))
