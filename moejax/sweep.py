"""Plumbing shared by the experiment sweeps (``experiments/<name>/run.py``): arguments, sibling modules, provenance.

Every experiment's ``run.py`` trains variants x seeds with the library's trainer and writes one JSON per run; this
module holds what is the same in all of them, so that forking an experiment copies only paper-specific code.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence


def parser(name: str, description: str, *, compile_cache: bool = False) -> argparse.ArgumentParser:
    """The common sweep flags: --preset, --variants, --seeds, --workdir, --results, --threads, --table,
    --allow_dirty (see :func:`refuse_dirty`) and, with ``compile_cache``, --compile_cache (see :func:`start`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="full")
    p.add_argument("--variants", default=None, help="comma-separated; default: all of config.VARIANTS")
    p.add_argument("--seeds", default=None, help="comma-separated; default: config.SEEDS[preset]")
    p.add_argument("--workdir", default=f"/tmp/moejax_experiments/{name}")
    p.add_argument("--results", default=None, help=f"default: experiments/{name}/results/<preset>")
    p.add_argument("--threads", type=int, default=None, help="pin XLA:CPU to one thread when 1 (set before jax)")
    p.add_argument("--table", action="store_true", help="only print the markdown table of the existing results")
    p.add_argument("--allow_dirty", action="store_true",
                   help="let --preset=full run from a tree with uncommitted changes (trials only)")
    if compile_cache:
        p.add_argument("--compile_cache", default="<workdir>/jax_cache",
                       help="JAX persistent compilation cache ('' disables): later seeds reuse compiled programs")
    return p


OUTCOMES = ("reproduced", "partly reproduced", "not reproduced", "not testable here")   # PROTOCOL.md section 2


def combine_outcomes(outcomes: Sequence[str]) -> str:
    """One claim's verdict over several settings (datasets, model sizes): settings whose controls failed ("not
    testable here") or that did not run the claim drop out; all remaining reproduced -> reproduced, all not
    reproduced -> not reproduced, otherwise partly; none left -> not testable here ("not run" when none ran)."""
    left = [o for o in outcomes if o in OUTCOMES[:3]]
    if not left:
        return "not run" if all(o == "not run" for o in outcomes) else "not testable here"
    if all(o == "reproduced" for o in left):
        return "reproduced"
    if all(o == "not reproduced" for o in left):
        return "not reproduced"
    return "partly reproduced"


def pin_one_thread() -> None:
    """Single-threaded XLA:CPU Eigen, so that two sweeps can share a 2-core machine; call before jax starts."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def use_compile_cache(directory: str) -> None:
    """A persistent XLA compilation cache in ``directory`` (call before the first compilation). The seeds of a
    variant compile identical programs, so only the first pays; results are unaffected."""
    import jax
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def start(args: argparse.Namespace) -> None:
    """What a sweep's ``main`` does before anything imports jax's backend: one XLA thread (``--threads=1``), the
    refusal to run a registered preset from a dirty tree (:func:`refuse_dirty`), and the persistent compilation
    cache of ``--compile_cache`` (``<workdir>`` expanded; not for ``--table``)."""
    if args.threads == 1:  # must happen before jax initialises its CPU client
        pin_one_thread()
    refuse_dirty(args)
    if getattr(args, "compile_cache", "") and not args.table:
        use_compile_cache(args.compile_cache.replace("<workdir>", args.workdir))


def refuse_dirty(args: argparse.Namespace, presets: Sequence[str] = ("full",)) -> dict[str, Any]:
    """:func:`code_version`, after refusing (``SystemExit``) to run a registered preset from a tree with uncommitted
    changes unless ``args.allow_dirty`` (PROTOCOL.md: every result from a recorded commit; a dirty run is a trial)."""
    code = code_version()
    if not getattr(args, "table", False) and args.preset in presets and code["dirty"] is not False \
            and not getattr(args, "allow_dirty", False):
        raise SystemExit(f"refusing --preset={args.preset} from a tree with uncommitted changes "
                         f"{code['dirty_paths']} (commit first; --allow_dirty for a trial)")
    return code


def load_sibling(run_file: str, prefix: str, name: str) -> ModuleType:
    """``<dir of run_file>/<name>.py`` imported as module ``<prefix>_<name>`` (every experiment has a config.py)."""
    full = f"{prefix}_{name}"
    if full not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(run_file)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def _git(root: str, *argv: str) -> str | None:
    """stdout of ``git -C root argv``, or None when git fails or is absent."""
    try:
        out = subprocess.run(["git", "-C", root, *argv], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _is_experiment_output(path: str) -> bool:
    """``experiments/<name>/results/...`` or ``experiments/<name>/pilot/...``: what sweeps write, not code."""
    parts = path.split("/")
    return len(parts) > 2 and parts[0] == "experiments" and parts[2] in ("results", "pilot")


def code_version() -> dict[str, Any]:
    """Which moejax ran: its path, the git commit of its checkout (if any), ``dirty`` (uncommitted changes, tracked
    or not, outside the experiments' ``results/`` and ``pilot/`` outputs: a run from a dirty tree is a trial, not a
    result; None when git cannot tell), the first of those paths, and ``$MOEJAX_CODE_VERSION``."""
    import moejax
    root = os.path.dirname(os.path.dirname(os.path.abspath(moejax.__file__)))
    head = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    paths = None if status is None else [line[3:] for line in status.splitlines()
                                         if line.strip() and not _is_experiment_output(line[3:])]
    return {"moejax_path": root, "git_commit": (head or "").strip() or None,
            "dirty": None if paths is None else bool(paths), "dirty_paths": None if paths is None else paths[:50],
            "note": os.environ.get("MOEJAX_CODE_VERSION")}


def machine() -> dict[str, Any]:
    """Backend, device and core counts, uname and XLA_FLAGS of this run (imports jax)."""
    import jax
    return {"platform": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "uname": " ".join(os.uname()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    import numpy as np
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def ci95(values: Sequence[float]) -> list[float] | None:
    """The 95% t-interval of the mean of ``values`` (None for fewer than two)."""
    import numpy as np
    from scipy import stats
    v = np.asarray(values, float)
    if v.size < 2:
        return None
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return [float(v.mean()) - half, float(v.mean()) + half]


def paired(groups: Sequence[Sequence[Mapping[str, Any]]], f: Callable[..., float]) -> dict[str, Any] | None:
    """``f(run of group 0, run of group 1, ...)`` at every ``seed`` all groups of run records share: the per-seed
    values, mean ± std (ddof=1), the 95% t-interval of the mean and how many seeds are > 0 and < 0 (None when no
    seed is shared). The statistic a pre-registered comparison paired by seed is decided on."""
    maps = [{r["seed"]: r for r in g} for g in groups]
    seeds = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    if not seeds:
        return None
    vals = [float(f(*(m[s] for m in maps))) for s in seeds]
    return {"seeds": seeds, "per_seed": vals, "n": len(vals), **mean_std(vals), "ci95": ci95(vals),
            "positive": sum(v > 0 for v in vals), "negative": sum(v < 0 for v in vals)}


def clearly(p: Mapping[str, Any] | None, sign: int, share: float) -> bool:
    """A :func:`paired` statistic is clearly of ``sign`` (+1 or -1): of that sign in at least ``share`` of its seeds
    **and** its 95% interval excludes 0 on that side. Anything else (None, one seed, a non-finite bound) is not."""
    import math
    if p is None or p["ci95"] is None or sign not in (1, -1):
        return False
    need = math.ceil(share * p["n"] - 1e-9)
    count, bound = (p["positive"], p["ci95"][0]) if sign > 0 else (p["negative"], -p["ci95"][1])
    return count >= need and math.isfinite(bound) and bound > 0


def format_paired(p: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``'+m ± s, 95% CI [lo, hi], u up / d down of n'`` of a :func:`paired` statistic (``'not run'`` for None)."""
    if p is None:
        return "not run"
    ci = "—" if p["ci95"] is None else f"[{p['ci95'][0]:+.{digits}f}, {p['ci95'][1]:+.{digits}f}]"
    return (f"{p['mean']:+.{digits}f} ± {p['std']:.{digits}f}, 95% CI {ci}, {p['positive']} up / "
            f"{p['negative']} down of {p['n']}")


def resolution_control(p: Mapping[str, Any] | None, max_half: float) -> dict[str, Any]:
    """A positive control for a :func:`paired` primary statistic: a decisive result (its 95% interval excludes 0)
    passes whatever its width; an inconclusive one only when the interval's half-width is at most ``max_half`` (the
    sweep could have seen an effect of that size)."""
    import math
    if p is None or p["ci95"] is None:
        return {"passes": False, "why": "fewer than two paired seeds"}
    lo, hi = p["ci95"]
    half = (hi - lo) / 2
    if math.isfinite(half) and (lo > 0 or hi < 0):
        return {"passes": True, "half_width": half, "why": f"decisive: the 95% CI excludes 0 (half-width {half:.4f})"}
    ok = math.isfinite(half) and half <= max_half
    return {"passes": ok, "half_width": half,
            "why": f"inconclusive, 95% CI half-width {half:.4f} {'<=' if ok else '>'} {max_half}"}


def outcome_if_controls_pass(controls: Mapping[str, Mapping[str, Any]], decide: Callable[[], str]) -> str:
    """``decide()`` when every positive control passes, else ``'not testable here'`` (PROTOCOL.md section 2)."""
    return decide() if all(c["passes"] for c in controls.values()) else OUTCOMES[3]


def verdict_rows(verdicts: Mapping[str, Mapping[str, Any]], settings_key: str, setting: str) -> list[str]:
    """Markdown rows of a per-claim, per-setting verdict table: ``verdicts[claim]`` holds ``verdict``, ``paper`` and
    ``verdicts[claim][settings_key][name]`` = one setting's ``outcome``, ``controls`` and ``why``; ``setting``
    names the column ('size', 'dataset')."""
    rows = [f"| claim | {setting} | outcome | controls | ours (primary, paired by seed) | paper (abstract) |",
            "|---|---|---|---|---|---|"]
    for claim, c in verdicts.items():
        for name, x in c[settings_key].items():
            controls = "; ".join(f"{k}: {'pass' if cv['passes'] else 'FAIL'} ({cv['why']})"
                                 for k, cv in x.get("controls", {}).items())
            rows.append(f"| ({claim}) | {name} | {x['outcome']} | {controls} | {x['why']} | {c['paper']} |")
        rows.append(f"| **({claim}) verdict** | all | **{c['verdict']}** | | | |")
    return rows


def lm_loss_fn(model: Any) -> Callable[[Any, Iterable[Mapping[str, Any]]], float]:
    """``(variables, batches) -> mean next-token cross-entropy (nats)`` of an LM over the real targets (``mask``) of
    batches ``{'tokens': int[B, L + 1], 'mask': [B, L]}``; compiled once per model and batch shape, so every modified
    copy of a model's variables (quantized, merged, ...) reuses it."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def sums(variables, tokens, mask):
        logits, _ = model.apply(variables, tokens[:, :-1], deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        m = mask.astype(jnp.float32)
        return jnp.sum(ce * m), jnp.sum(m)

    def loss(variables, batches) -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            s, c = sums(variables, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    return loss


def pm(s: dict[str, float], digits: int = 3) -> str:
    """``'mean ± std'`` of a :func:`mean_std` result, both to ``digits`` decimals (for the README tables)."""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def selection(args: argparse.Namespace, config_lib: ModuleType, run_file: str
              ) -> tuple[list[str], list[int], pathlib.Path]:
    """(variants, seeds, results directory) from the flags, defaulting to ``config.VARIANTS`` / ``config.SEEDS``."""
    variants = args.variants.split(",") if args.variants else list(config_lib.VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(config_lib.SEEDS[args.preset])
    here = os.path.dirname(os.path.abspath(run_file))
    results = pathlib.Path(args.results or os.path.join(here, "results", args.preset))
    results.mkdir(parents=True, exist_ok=True)
    return variants, seeds, results


def load_runs(results: pathlib.Path, variant_order: Sequence[str]) -> list[dict[str, Any]]:
    """The run JSONs already in ``results``, ordered by variant (as in ``variant_order``) then seed."""
    runs = [json.loads(f.read_text()) for f in sorted(results.glob("*_seed*.json"))]
    order = {v: i for i, v in enumerate(variant_order)}
    runs.sort(key=lambda r: (order.get(r["variant"], 99), r["seed"]))
    return runs


def run_dir(args: argparse.Namespace, variant: str, seed: int) -> pathlib.Path:
    """The trainer's workdir of one run: ``<workdir>/<preset>/<variant>_seed<seed>`` (checkpoints, metrics)."""
    return pathlib.Path(args.workdir) / args.preset / f"{variant}_seed{seed}"


def command_line(run_file: str, argv: Sequence[str] | None) -> str:
    """The command recorded with each run: ``experiments/<name>/run.py`` and its arguments (``argv``, or the
    process's own when None)."""
    name = pathlib.Path(run_file).resolve().parent.name
    return " ".join([f"experiments/{name}/run.py", *(sys.argv[1:] if argv is None else argv)])


def run_all(args: argparse.Namespace, experiment: str, config_lib: ModuleType, variants: Sequence[str],
            seeds: Sequence[int], results: pathlib.Path, command: str,
            measure: Callable[..., dict[str, Any]],
            after: Callable[[dict[str, Any], pathlib.Path], None] | None = None) -> list[dict[str, Any]]:
    """Trains every (variant, seed) not already in ``results`` and writes ``<variant>_seed<seed>.json``.

    Each run: ``config.get_config('<preset>,<variant>')`` with ``seed`` and ``data.seed`` set, trained from scratch
    in ``<workdir>/<preset>/<variant>_seed<seed>`` with the library's trainer, final checkpoint restored, then
    ``measure(config=, state=, final=, variant=, seed=)`` returns the experiment's own record fields. The record
    adds wall-clock (training and total, measure included), jax version, machine, code version, command and
    config. ``after(record, workdir)`` (plots, logs; not timed) runs once the JSON is written. jax's in-memory
    caches are cleared after each run. A run the trainer reports as preempted (SIGTERM) writes no JSON and ends
    the sweep with ``SystemExit(143)``.
    """
    import jax

    from moejax.training.checkpoint import read_checkpoint
    from moejax.training.loop import to_jsonable, train_and_evaluate
    host, code = machine(), code_version()
    runs = []
    for variant in variants:
        for seed in seeds:
            out = results / f"{variant}_seed{seed}.json"
            if out.exists():
                runs.append(json.loads(out.read_text()))
                continue
            config = config_lib.get_config(f"{args.preset},{variant}")
            config.seed = seed
            config.data.seed = seed
            workdir = run_dir(args, variant, seed)
            shutil.rmtree(workdir, ignore_errors=True)
            start = time.perf_counter()
            final = train_and_evaluate(config, workdir)
            if final.get("preempted"):
                # The trainer saved a checkpoint and stopped early on SIGTERM: the model is not the run's. Record
                # nothing for it (the same command reruns it) and stop the sweep, as the signal asked.
                print(f"{experiment}: {variant} seed {seed} preempted by SIGTERM at step {final.get('step')}; "
                      f"not recorded; rerun the same command to continue the sweep", file=sys.stderr, flush=True)
                raise SystemExit(143)
            train_s = time.perf_counter() - start
            state, _ = read_checkpoint(workdir)
            fields = measure(config=config, state=state, final=final, variant=variant, seed=seed)
            record = {
                "experiment": experiment, "preset": args.preset, "variant": variant, "seed": seed, **fields,
                "wall_clock_s": time.perf_counter() - start, "train_wall_clock_s": train_s,
                "jax_version": jax.__version__, "machine": host, "code": code, "command": command,
                "config": to_jsonable(config),
            }
            out.write_text(json.dumps(record, indent=2))
            if after is not None:
                after(record, workdir)
            runs.append(record)
            # Drop this run's compiled programs. The mc_smoe sweep (dozens of compilations per run) kept them all
            # and died in its third run with LLVM "Cannot allocate memory" and a segfault (24 GB machine),
            # most likely out of memory mappings (vm.max_map_count 65530); the persistent compilation cache
            # still serves later runs.
            jax.clear_caches()
    return runs
