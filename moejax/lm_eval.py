"""Perplexity and per-token expert usage of a Hugging Face MoE checkpoint or a moejax workdir.

    python -m moejax.lm_eval --model=<dir> (--text=<file> | --tfds=<name>[:<split>] [--data_dir=...]) [--length=128]
        [--max_windows=64] [--batch_size=8] [--text_key=text] [--out=<dir>]

Writes ``<out>/lm_eval.json`` (perplexity, tokens, per-layer expert frequencies) and ``<out>/expert_usage.npz``
(``windows`` int32[N, L+1] and, per MoE layer, ``<layer path>`` int32[N, L, K]: the experts each token used).
Errors are one line (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from moejax.generation.evaluate import evaluate_lm, windows
from moejax.generation.sources import load_language_model
from moejax.errors import command_main


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moejax.lm_eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory or moejax workdir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file")
    src.add_argument("--tfds", help="a TFDS text dataset, name[:split] (default split: test); the project's offline "
                                    "builders (e.g. stdlib_bytes) too")
    p.add_argument("--data_dir", default=None, help="TFDS data directory")
    p.add_argument("--text_key", default="text")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--max_windows", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default=None, help="directory for lm_eval.json and expert_usage.npz")
    return p.parse_args(argv)


def read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        try:
            return pathlib.Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--text={args.text}: cannot read it as UTF-8 text ({e})") from e
    from moejax.data.reader import load_split
    name, _, split = args.tfds.partition(":")
    source = load_split(name, split or "test", args.data_dir)
    parts = []
    for i in range(len(source)):
        value = source[i][args.text_key]
        parts.append(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value))
        if sum(map(len, parts)) > 64 * args.length * (args.max_windows or 1):
            break
    return "\n".join(parts)


def run(argv: Sequence[str]) -> dict:
    args = parse(argv)
    lm = load_language_model(args.model, dtype=args.dtype)
    token_windows = windows(lm.tokenizer.encode(read_text(args)), args.length, args.max_windows)
    result = evaluate_lm(lm.config, lm.variables, token_windows, batch_size=args.batch_size)
    summary = {"model": lm.source, **result.summary()}
    print(f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f} nats/token over {result.tokens} tokens)")
    if args.out is not None:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_eval.json").write_text(json.dumps(summary, indent=2))
        np.savez_compressed(out / "expert_usage.npz", windows=result.windows, **result.expert_index)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return command_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
