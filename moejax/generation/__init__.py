"""Text generation from moejax LMs: KV-cache decoding (:mod:`.decode`) and next-token sampling (:mod:`.sampling`)."""
from moejax.generation.decode import Generated, decode_fn, for_decoding, generate, left_pad
from moejax.generation.sampling import Sampling, filter_logits, next_token

__all__ = ["Generated", "Sampling", "decode_fn", "filter_logits", "for_decoding", "generate", "left_pad",
           "next_token"]
