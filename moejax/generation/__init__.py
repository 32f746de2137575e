"""Text generation from moejax LMs: KV-cache decoding (:mod:`.decode`), next-token sampling (:mod:`.sampling`) and
self-contrast decoding (:mod:`.contrast`)."""
from moejax.generation.contrast import SelfContrast
from moejax.generation.decode import Generated, decode_fn, fit_prompts, for_decoding, generate, left_pad
from moejax.generation.sampling import Sampling, filter_logits, next_token

__all__ = ["Generated", "Sampling", "SelfContrast", "decode_fn", "filter_logits", "fit_prompts", "for_decoding",
           "generate", "left_pad", "next_token"]
