"""The variable trees (every collection's paths, shapes and dtypes) of every shipped config and experiment preset.

A refactor of the library must not change what a config builds, so ``tests/fixtures/param_trees.json`` records a
digest of each tree and ``tests/test_param_trees.py`` rebuilds and compares them. A change that alters a tree on
purpose regenerates the record in the same commit and says why:

    python tests/param_trees.py --write        # rewrites tests/fixtures/param_trees.json
    python tests/param_trees.py --show=NAME    # prints one config's tree (to diff two commits by hand)

Models are built from shapes only (``jax.eval_shape`` of ``init``). Datasets are not read: classification inputs
come from the table below (the shipped builders' shapes and the named TFDS datasets' shapes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
from typing import Any, Iterator, Mapping

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "fixtures" / "param_trees.json"

# (input shape, classes) of the classification datasets configs name, by base name (no "/config" or ":version").
CLASSIFICATION = {
    "digits": ((8, 8, 1), 10), "moejax_digits": ((8, 8, 1), 10),
    "translated_digits": ((24, 24, 1), 10), "moejax_translated_digits": ((24, 24, 1), 10),
    "mnist1d": ((40, 1), 10), "moejax_mnist1d": ((40, 1), 10),
    "synthetic_clusters": ((8,), 4), "moejax_synthetic_clusters": ((8,), 4),
    "mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10), "kmnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100), "svhn_cropped": ((32, 32, 3), 10),
}


def configs() -> Iterator[tuple[str, Any]]:
    """(name, experiment config) of every shipped config file and every experiment preset x variant."""
    from moejax import sweep
    for path in sorted((ROOT / "configs").rglob("*.py")):
        mod = sweep.load_sibling(str(path), "_param_trees", path.stem)
        if hasattr(mod, "get_config") and "data" in (config := mod.get_config()):   # not configs/hf_finetune.py
            yield str(path.relative_to(ROOT)), config
    for path in sorted((ROOT / "experiments").glob("*/config.py")):
        exp = path.parent.name
        mod = sweep.load_sibling(str(path), exp, "config")       # the name the experiment's run.py uses
        presets = getattr(mod, "PRESETS", (None,))
        variants = getattr(mod, "VARIANTS", (None,))
        for preset in presets:
            for variant in variants:
                arg = preset if variant is None else f"{preset},{variant}"
                try:
                    config = mod.get_config(arg)
                except ValueError:      # a variant that a preset does not offer
                    continue
                if "model" in config and "data" in config:    # theory_cl's own simulator builds no moejax model
                    yield f"experiments/{exp}:{arg}", config


def _meta(data: Mapping[str, Any]) -> dict[str, Any]:
    from moejax.data.pipeline import DataConfig
    cfg = DataConfig.from_dict(data)
    if cfg.spec.task == "lm":
        from moejax.data.lm import VOCAB_SIZE
        return {"vocab_size": VOCAB_SIZE, "input_shape": (cfg.seq_len,), "x": ((2, cfg.seq_len), "int32")}
    base = cfg.name.split("/")[0].split(":")[0]
    shape, classes = CLASSIFICATION[base]
    return {"num_classes": classes, "input_shape": shape, "x": ((2, *shape), "float32")}


def tree_lines(config: Mapping[str, Any]) -> list[str]:
    """``collection/path shape dtype`` for every variable the config's model creates."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from moejax.models import build_model
    from moejax.parallel.sharding import path_name
    meta = _meta(config["data"])
    shape, dtype = meta.pop("x")
    model = build_model(config["model"], **meta)
    x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    key = jax.random.key(0)
    variables = nn.unbox(jax.eval_shape(lambda k, x: model.init({"params": k, "dropout": k, "jitter": k}, x,
                                                                 deterministic=True), key, x))
    return sorted(f"{path_name(p)} {tuple(v.shape)} {v.dtype}"
                  for p, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0])


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def record() -> dict[str, Any]:
    out = {}
    for name, config in configs():
        lines = tree_lines(config)
        out[name] = {"leaves": len(lines), "sha": digest(lines)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true")
    p.add_argument("--show", default=None)
    args = p.parse_args(argv)
    if args.show:
        for name, config in configs():
            if name == args.show:
                print("\n".join(tree_lines(config)))
                return
        raise SystemExit(f"--show={args.show!r}: no such config")
    rec = record()
    if args.write:
        RECORD.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(rec)} trees to {RECORD.relative_to(ROOT)}")
    else:
        print(json.dumps(rec, indent=1, sort_keys=True))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
