"""The expert-surgery command line: one subcommand per tool, each reading a model and writing a NEW directory.

    python -m moejax.surgery <tool> --model=<workdir | HF dir> --out=<new dir> [options]

tools (``--help`` after a tool lists its options):
  profile   routing frequency, mean gate, co-activation, router similarity per layer and expert -> profile.json,
            profile.png (``--by=label`` for a classifier's classes, ``--by=byte_class`` for byte-level LM inputs)
  detect    SteerMoE's detection: activation-rate difference of two texts (--text_a, --text_b) -> detect.json
  steer     router-logit offsets: --activate=L:E, --deactivate=L:E, --offset=L:E:VALUE (repeatable, comma lists)
  prune     --keep_top=N (by routing frequency) | --drop=L:E,... | --reconstruct=N (greedy output reconstruction)
  merge     --groups=G [--method=msmoe|frequency|average|prune] (M-SMoE; frequencies from the data)
  compress  --rank=R [--method=low_rank|shared_basis]
  quantize  --bits=B [--select=experts_only|dense_ffn_only|shared_experts_only|all_weights]
  upcycle   --experts=E --k=K [--mode=copy|partition] [--noise=0] [--seed=0] [--layers=all|every_other|0,2]

``L`` names an MoE layer by its number among the model's MoE layers (0-based) or its parameter path; ``E`` an
expert. Data (profile, detect, prune by frequency or reconstruction, merge): ``--text=<file>`` cut into windows of
``--length`` tokens (the workdir's byte tokenizer or the HF directory's tokenizer.json), or by default the workdir's
own evaluation split (``--max_batches``). A model-writing tool writes a workdir that ``python -m moejax.main
--config=<out>/config.py --workdir=<out>`` resumes (or a Hugging Face directory for an HF input) plus
``surgery.json``. Errors are one line (exit status 2); the input is never modified.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.surgery import io as surgery_io
from moejax.surgery import model as model_lib
from moejax.surgery import profile as profile_lib
from moejax.surgery.model import SurgeryModel
from moejax.errors import command_main

PROG = "python -m moejax.surgery"


# ----------------------------------------------------------------------------- arguments

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a moejax workdir or a Hugging Face directory (read only)")
    p.add_argument("--out", required=True, help="the new directory to write (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="workdir: the checkpoint step (default: the newest)")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="a UTF-8 text file (LM); default: the workdir's eval split")
    p.add_argument("--length", type=int, default=128, help="tokens per window of --text")
    p.add_argument("--max_windows", type=int, default=64, help="windows of --text at most")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (--text)")
    p.add_argument("--max_batches", type=int, default=None, help="eval batches at most (workdir eval split)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True, metavar="tool")

    t = sub.add_parser("profile", help="routing statistics per layer and expert")
    _common(t)
    _data(t)
    t.add_argument("--by", choices=("auto", "none", "label", "byte_class"), default="auto",
                   help="break the counts down: classifier labels (auto for a classifier), byte classes of LM inputs")
    t.add_argument("--no_plot", action="store_true")

    t = sub.add_parser("detect", help="SteerMoE's behaviour-linked experts from two texts")
    _common(t)
    _data(t)
    t.add_argument("--text_a", required=True)
    t.add_argument("--text_b", required=True)
    t.add_argument("--top", type=int, default=10, help="ranked pairs to print from each end")

    t = sub.add_parser("steer", help="router-logit offsets per layer and expert")
    _common(t)
    t.add_argument("--activate", action="append", default=[], metavar="L:E[,L:E]")
    t.add_argument("--deactivate", action="append", default=[], metavar="L:E[,L:E]")
    t.add_argument("--offset", action="append", default=[], metavar="L:E:VALUE[,L:E:VALUE]")

    t = sub.add_parser("prune", help="drop experts, remapping the router")
    _common(t)
    _data(t)
    how = t.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep_top", type=int, help="keep the N most frequently routed experts of every MoE layer")
    how.add_argument("--drop", action="append", metavar="L:E[,L:E]", help="drop these experts")
    how.add_argument("--reconstruct", type=int, metavar="N", help="keep N experts per layer, greedily by how little "
                                                                   "removing one changes the layer's output")
    t.add_argument("--max_tokens", type=int, default=1024, help="--reconstruct: sample tokens per layer")

    t = sub.add_parser("merge", help="merge experts into groups (M-SMoE)")
    _common(t)
    _data(t)
    t.add_argument("--groups", type=int, required=True, help="experts per layer after merging")
    t.add_argument("--method", default="msmoe", choices=("msmoe", "frequency", "average", "prune"))

    t = sub.add_parser("compress", help="low-rank or shared-basis compression of the experts")
    _common(t)
    t.add_argument("--rank", type=int, required=True)
    t.add_argument("--method", default="low_rank", choices=("low_rank", "shared_basis"))

    t = sub.add_parser("quantize", help="weight-only round-to-nearest (fake) quantization")
    _common(t)
    t.add_argument("--bits", type=int, required=True)
    t.add_argument("--select", default="experts_only",
                   choices=("experts_only", "dense_ffn_only", "shared_experts_only", "all_weights"))

    t = sub.add_parser("upcycle", help="a dense LM into an MoE")
    _common(t)
    t.add_argument("--experts", type=int, required=True)
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--mode", default="copy", choices=("copy", "partition"))
    t.add_argument("--noise", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", default="all", help="all | every_other | comma-separated block indices")
    return p


def _pairs(values: Sequence[str], flag: str, with_value: bool = False) -> list[tuple[Any, ...]]:
    """``['0:3,1:5']`` -> ``[(0, 3), (1, 5)]`` (``L:E:V`` -> ``(L, E, V)`` with ``with_value``); L an int or a path."""
    out = []
    for item in (s for v in values for s in v.split(",") if s.strip()):
        parts = item.strip().split(":")
        try:
            if len(parts) != (3 if with_value else 2):
                raise ValueError
            layer = int(parts[0]) if parts[0].lstrip("-").isdigit() else parts[0]
            entry = (layer, int(parts[1])) + ((float(parts[2]),) if with_value else ())
        except ValueError:
            form = "L:E:VALUE" if with_value else "L:E"
            raise ValueError(f"--{flag}={item!r}: expected {form} (L: MoE layer number or path, E: expert)") from None
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- data

def _tokenizer(model: SurgeryModel) -> Any:
    from moejax.generation.sources import ByteTokenizer, HFTokenizer
    if model.origin.kind == model_lib.HF:
        tok = pathlib.Path(model.origin.path) / "tokenizer.json"
        if not tok.is_file():
            raise ValueError(f"--text: {model.origin.path} has no tokenizer.json to encode the text with")
        return HFTokenizer(tok)
    return ByteTokenizer()


def _read_text(path: str, flag: str = "text") -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--{flag}={path}: cannot read it as UTF-8 text ({e})") from None


def _text_batches(model: SurgeryModel, path: str, args: argparse.Namespace, flag: str = "text"
                  ) -> list[profile_lib.Batch]:
    from moejax.models.config import LMConfig
    if not isinstance(model.config, LMConfig):
        raise ValueError(f"--{flag}: a {type(model.config).__name__} is profiled on its workdir's eval split; "
                         f"leave --{flag} out")
    ids = _tokenizer(model).encode(_read_text(path, flag))
    return profile_lib.text_batches(ids, length=args.length, max_windows=args.max_windows,
                                    batch_size=args.batch_size)


def data_batches(model: SurgeryModel, args: argparse.Namespace) -> list[profile_lib.Batch]:
    """The batches a data-driven tool runs on: ``--text`` windows, or the workdir's evaluation split."""
    if args.text is not None:
        return _text_batches(model, args.text, args)
    if model.origin.kind != model_lib.WORKDIR:
        raise ValueError(f"--text: needed for a Hugging Face model ({model.origin.path} has no evaluation data)")
    batches = list(profile_lib.eval_batches(model.origin.experiment, max_batches=args.max_batches))
    if not batches:
        raise ValueError("--max_batches: no evaluation batch to run on")
    return batches


def byte_class(tokens: np.ndarray) -> np.ndarray:
    """int[...] class of byte tokens: 0 letter, 1 digit, 2 whitespace, 3 ASCII punctuation, 4 other (non-ASCII)."""
    t = np.asarray(tokens)
    letter = ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122))
    digit = (t >= 48) & (t <= 57)
    space = np.isin(t, [9, 10, 11, 12, 13, 32])
    punct = (t >= 33) & (t <= 126) & ~letter & ~digit
    return np.select([letter, digit, space, punct], [0, 1, 2, 3], 4)


# ----------------------------------------------------------------------------- tools

def _new_dir(out: str) -> pathlib.Path:
    """``out`` created for a tool that writes files (not a model); refused when it exists and is not empty."""
    path = pathlib.Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"out={out!r}: exists and is not empty; surgery writes a new directory and never modifies "
                         f"an existing one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_profile(model: SurgeryModel, args: argparse.Namespace) -> dict[str, Any]:
    from moejax.models.config import LMConfig
    batches = data_batches(model, args)
    by = args.by
    if by == "auto":
        by = "none" if isinstance(model.config, LMConfig) else "label"
    if by == "byte_class" and (not isinstance(model.config, LMConfig) or model.origin.kind != model_lib.WORKDIR):
        raise ValueError("--by=byte_class: needs a byte-level LM (a moejax workdir)")
    if by == "label" and isinstance(model.config, LMConfig):
        raise ValueError("--by=label: an LM's batches have no labels; use --by=byte_class")
    labeler = byte_class if by == "byte_class" else None
    if by == "none":
        batches = [profile_lib.Batch(b.inputs, b.mask) for b in batches]
    prof = profile_lib.profile_experts(model, batches, labeler=labeler)
    out = _new_dir(args.out)
    summary = {"model": model.origin.path, "by": by, **prof.to_json()}
    (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.no_plot:
        profile_lib.plot(prof, out / "profile.png")
    for path, lp in prof.layers.items():
        print(f"{path}: {lp.tokens} tokens, frequency {np.round(lp.frequency, 3).tolist()}")
    return summary


def run_detect(model: SurgeryModel, args: argparse.Namespace) -> dict[str, Any]:
    from moejax.surgery import steer as steer_lib
    a = _text_batches(model, args.text_a, args, "text_a")
    b = _text_batches(model, args.text_b, args, "text_b")
    found = steer_lib.detect_behaviour_experts(model, a, b)
    out = _new_dir(args.out)
    summary = {"model": model.origin.path, "text_a": args.text_a, "text_b": args.text_b, **found.to_json()}
    (out / "detect.json").write_text(json.dumps(summary, indent=1) + "\n")
    for path, e, d in found.ranked[:args.top]:
        print(f"A-linked {path} expert {e}: {d:+.4f}")
    for path, e, d in found.ranked[-args.top:]:
        print(f"B-linked {path} expert {e}: {d:+.4f}")
    return summary


def run_steer(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    from moejax.surgery import steer as steer_lib
    offsets: dict[Any, dict[int, float]] = {}
    entries = ([(l, e, steer_lib.FORCE) for l, e in _pairs(args.activate, "activate")]
               + [(l, e, -steer_lib.FORCE) for l, e in _pairs(args.deactivate, "deactivate")]
               + _pairs(args.offset, "offset", with_value=True))
    if not entries:
        raise ValueError("--activate/--deactivate/--offset: give at least one expert to steer")
    for layer, expert, value in entries:
        ref = model_lib.resolve_layer(model, layer)
        per = offsets.setdefault(ref.path, {})
        per[expert] = per.get(expert, 0.0) + value
    return steer_lib.steer(model, offsets)


def run_prune(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    from moejax.surgery import prune as prune_lib
    if args.drop:
        drop: dict[str, list[int]] = {}
        for layer, expert in _pairs(args.drop, "drop"):
            drop.setdefault(model_lib.resolve_layer(model, layer).path, []).append(expert)
        return prune_lib.drop_experts(model, drop)
    num = args.keep_top if args.keep_top is not None else args.reconstruct
    flag = "keep_top" if args.keep_top is not None else "reconstruct"
    if num is None or num < 1:
        raise ValueError(f"--{flag}={num}: pruning to {num} experts would leave none (model.moe.num_experts must "
                         f"stay >= 1)")
    for ref in model_lib.moe_layers(model):
        model_lib.check_remappable(ref, "prune")
    batches = data_batches(model, args)
    if args.keep_top is not None:
        return prune_lib.keep_most_frequent(model, profile_lib.profile_experts(model, batches), num)
    return prune_lib.prune_by_reconstruction(model, batches, num, max_tokens=args.max_tokens)


def _helper(name: str) -> Any:
    try:
        return importlib.import_module(f"moejax.surgery.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"moejax.surgery.{name}":
            raise ValueError(f"{name}: moejax.surgery.{name} is not available in this installation") from None
        raise


def run_merge(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    merge = _helper("merge")
    refs = model_lib.moe_layers(model)
    for ref in refs:
        model_lib.check_remappable(ref, "merge")
        if args.groups < 1 or args.groups > ref.spec.num_experts:
            raise ValueError(f"--groups={args.groups}: must be in [1, {ref.spec.num_experts}] (the experts of "
                             f"{ref.path}; model.moe.num_experts must stay >= 1)")
    prof = profile_lib.profile_experts(model, data_batches(model, args))
    updates, assignment = {}, {}
    for ref in refs:
        e = ref.spec.num_experts
        lp = prof[ref.path]
        result = merge.merge_layer(model_lib.layer_experts(model, ref), None, lp.frequency[:e],
                                   lp.router_similarity[:e, :e], args.groups, method=args.method)
        # Group g's router entries (every per-expert array of the scorer, the selection bias) are its leader's.
        router, _ = model_lib.subset_arrays(model, ref, np.asarray(result.leaders))
        updates[ref.path] = model_lib.LayerUpdate(result.experts, None, None, router)
        assignment[ref.path] = np.asarray(result.assignment).tolist()
    merged = model_lib.replace_experts(model, updates)
    return merged.record("merge", groups=args.groups, method=args.method, assignment=assignment)


def run_compress(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    compress = _helper("compress")
    fn: Callable = getattr(compress, args.method)
    updates = {}
    for ref in model_lib.moe_layers(model):
        model_lib.check_sparse(ref, "compress")
        updates[ref.path] = model_lib.LayerUpdate(fn(model_lib.layer_experts(model, ref), args.rank),
                                                  model_lib.router_kernel(model, ref))
    return model_lib.replace_experts(model, updates).record("compress", method=args.method, rank=args.rank)


def run_quantize(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    quantize = _helper("quantize")
    params = quantize.quantize_tree(model.params, args.bits, select=getattr(quantize, args.select))
    return model.replace(variables={**model.variables, "params": params}).record(
        "quantize", bits=args.bits, select=args.select)


def run_upcycle(model: SurgeryModel, args: argparse.Namespace) -> SurgeryModel:
    upcycle = _helper("upcycle")
    from moejax.models.config import LMConfig
    if not isinstance(model.config, LMConfig):
        raise ValueError(f"--model: upcycling needs a dense transformer_lm, not a {type(model.config).__name__}")
    layers: Any = args.layers
    if layers not in ("all", "every_other"):
        try:
            layers = tuple(int(s) for s in layers.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--layers={args.layers!r}: all, every_other or comma-separated block indices") from None
    config, params = upcycle.upcycle(model.config, model.params, num_experts=args.experts, k=args.k,
                                     mode=args.mode, noise=args.noise, rng=jax.random.key(args.seed), layers=layers)
    return model.replace(config=config, variables={**model.variables, "params": params}).record(
        "upcycle", experts=args.experts, k=args.k, mode=args.mode, noise=args.noise, seed=args.seed,
        layers=args.layers)


ANALYSES = {"profile": run_profile, "detect": run_detect}
TRANSFORMS = {"steer": run_steer, "prune": run_prune, "merge": run_merge, "compress": run_compress,
              "quantize": run_quantize, "upcycle": run_upcycle}


def run(argv: Sequence[str]) -> Any:
    """Runs one tool; returns its summary (analyses) or the path written (model tools). Raises ``ValueError``."""
    args = parser().parse_args(argv)
    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):      # before any expensive work
        raise ValueError(f"out={args.out!r}: exists and is not empty; surgery writes a new directory and never "
                         f"modifies an existing one")
    model = surgery_io.load(args.model, step=args.step)
    if args.tool in ANALYSES:
        return ANALYSES[args.tool](model, args)
    new = TRANSFORMS[args.tool](model, args)
    path = surgery_io.save(new, args.out)
    layers = ", ".join(f"{r.path}: E={r.spec.num_experts} k={r.spec.router.k}" for r in model_lib.moe_layers(new))
    print(f"{args.tool}: wrote {path} ({layers or 'no MoE layer'})")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    return command_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
