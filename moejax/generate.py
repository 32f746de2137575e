"""Generate text from a Hugging Face MoE checkpoint directory or a moejax workdir.

    python -m moejax.generate --model=<dir> --prompt="The experts" [--prompt=...] [--max_new_tokens=32]
        [--temperature=0] [--top_k=0] [--top_p=1] [--seed=0] [--dtype=bfloat16] [--stop_token=<id>|none]
        [--contrast_weak_k=1 [--contrast_beta=0.5] [--contrast_alpha=0.1]]   (self-contrast decoding, SCMoE)
        [--truncate_prompts] [--debug]

Prompts of different lengths are batched (left-padded); ``--temperature=0`` is greedy. The stop token defaults to
the checkpoint's ``eos_token_id``. A prompt that does not fit the checkpoint's positions (``max_position_embeddings``)
together with ``--max_new_tokens`` is an error unless ``--truncate_prompts`` (keep its last tokens that fit, with a
warning). Errors are one line (exit status 2); ``--debug`` shows their traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax

from moejax.generation import Sampling, SelfContrast, generate
from moejax.generation.sources import load_language_model
from moejax.errors import command_main


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moejax.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory or moejax workdir")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="cast floating parameters, e.g. bfloat16")
    p.add_argument("--stop_token", default=None, help="token id, or 'none' (default: the checkpoint's eos)")
    p.add_argument("--contrast_weak_k", type=int, default=None,
                   help="self-contrast decoding (SCMoE) against the model with this many experts per token")
    p.add_argument("--contrast_beta", type=float, default=0.5)
    p.add_argument("--contrast_alpha", type=float, default=0.1)
    p.add_argument("--truncate_prompts", action="store_true",
                   help="keep the last tokens of a prompt too long for the model's positions (default: an error)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p.parse_args(argv)


def run(argv: Sequence[str]) -> list[str]:
    """Generates for the command line ``argv``; returns the continuations (also printed)."""
    args = parse(argv)
    lm = load_language_model(args.model, dtype=args.dtype)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    if args.stop_token is None:
        stop = lm.stop_token
    elif args.stop_token.lower() == "none":
        stop = None
    else:
        try:
            stop = int(args.stop_token)
        except ValueError:
            raise ValueError(f"--stop_token={args.stop_token!r}: must be a token id or 'none'") from None
    contrast = None if args.contrast_weak_k is None else SelfContrast(
        weak_k=args.contrast_weak_k, beta=args.contrast_beta, alpha=args.contrast_alpha)
    prompts = [lm.tokenizer.encode(p) for p in args.prompt]
    out = generate(lm.config, lm.variables, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   stop_token=stop, rng=jax.random.PRNGKey(args.seed), contrast=contrast,
                   max_positions=lm.max_positions, truncate_prompts=args.truncate_prompts)
    texts = []
    for prompt, ids in zip(args.prompt, out.as_lists()):
        if stop is not None and ids and ids[-1] == stop:
            ids = ids[:-1]
        texts.append(lm.tokenizer.decode(ids))
        print(f"{prompt}{texts[-1]}")
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Parsed here as well as in run(): --debug must be known before run() can fail.
    return command_main(run, argv, debug=parse(argv).debug)


if __name__ == "__main__":
    sys.exit(main())
