"""Loading a model for expert surgery and saving the result into a new directory, in the form it came in.

:func:`load` reads a moejax workdir (its experiment config and newest checkpoint; any model kind) or a Hugging Face
directory into a :class:`~moejax.surgery.model.SurgeryModel`. :func:`save` writes a model into a NEW directory:
a workdir whose checkpoint is exactly the train state the trainer builds for the new config (so
``train_and_evaluate`` resumes it and ``evaluate_at_k`` / ``load_language_model`` restore it), or a Hugging Face
directory. The input is never written.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import MoEConfig
from moejax.models.build import model_config, sizes_from_params
from moejax.models.config import LMConfig, ModelConfig, ViTConfig
from moejax.surgery.model import HF, WORKDIR, Origin, SurgeryModel, moe_layers


def load(path: str | os.PathLike, *, step: int | None = None) -> SurgeryModel:
    """The model in ``path``: a moejax workdir (its checkpoint at ``step``, default the newest; any model kind) or a
    Hugging Face directory (``config.json`` with ``model_type``). Nothing in ``path`` is written. One-line errors
    name the path."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model={str(path)!r}: has no config.json (expected a moejax workdir or a Hugging Face "
                         f"directory)")
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model={str(path)!r}: config.json is not readable JSON ({e})") from None
    if "model_type" in meta:
        return _load_hf(path)
    if "model" in meta:
        return _load_workdir(path, meta, step)
    raise ValueError(f"model={str(path)!r}: config.json has neither 'model' (moejax workdir) nor 'model_type' "
                     f"(Hugging Face)")


def _load_hf(path: pathlib.Path) -> SurgeryModel:
    from moejax import hf
    loaded = hf.load(str(path))
    variables = {k: v for k, v in loaded.variables.items() if k == "params" or jax.tree_util.tree_leaves(v)}
    origin = Origin(HF, str(path), loaded.config, hf_config=dict(loaded.hf_config))
    return SurgeryModel(loaded.config, variables, origin)


def _load_workdir(path: pathlib.Path, experiment: dict[str, Any], step: int | None) -> SurgeryModel:
    from moejax.training.checkpoint import read_checkpoint
    raw, step = read_checkpoint(path, step)
    params = raw["params"]
    config = model_config(experiment["model"], **sizes_from_params(experiment, params))
    variables = {"params": params, **{k: v for k, v in (raw.get("moe_state") or {}).items()
                                       if jax.tree_util.tree_leaves(v)}}
    origin = Origin(WORKDIR, str(path), config, experiment=experiment, step=step, rng=np.asarray(raw["rng"]))
    return SurgeryModel(config, variables, origin)


# ----------------------------------------------------------------------------- saving

def save(model: SurgeryModel, out_dir: str | os.PathLike, *, step: int | None = None) -> pathlib.Path:
    """Writes ``model`` into the new directory ``out_dir`` (refused when it exists and is not empty), in the form it
    was loaded from, and returns its path.

    * workdir origin: ``config.json`` (the experiment config with the rewritten model section), a checkpoint at
      ``step`` (default: the step it was loaded from) holding the train state the trainer builds for the new model
      (the parameters and ``moe_state``, a fresh optimiser state from the config's optimiser, so its schedule and
      moments start over, and the run's rng), ``config.py`` (``python -m moejax.main --config=<out>/config.py
      --workdir=<out>`` resumes it) and ``surgery.json`` (source and history). ``train_and_evaluate``,
      ``evaluate_at_k`` and ``load_language_model`` restore it.
    * hf origin: :func:`moejax.hf.save` (tokenizer files copied) and ``surgery.json``.

    Everything is written into a hidden sibling directory first and renamed at the end, so a failure leaves no
    half-written ``out_dir``.
    """
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out={str(out)!r}: exists and is not empty; surgery writes a new directory and never "
                         f"modifies an existing one")
    origin = model.origin
    if origin is None:
        raise ValueError("model.origin: None (a model built in memory); load it from a workdir or a Hugging Face "
                         "directory to save it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        if origin.kind == WORKDIR:
            _save_workdir(model, tmp, origin.step if step is None else int(step))
        else:
            _save_hf(model, tmp)
        summary = {"source": origin.path, "source_kind": origin.kind, "history": list(model.history)}
        (tmp / "surgery.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)


def _save_hf(model: SurgeryModel, out: pathlib.Path) -> None:
    from moejax import hf
    if not isinstance(model.config, LMConfig):
        raise ValueError(f"config: a {type(model.config).__name__} cannot be exported as a Hugging Face directory")
    hf.save(str(out), model.config, model.variables, hf_config=model.origin.hf_config,
            copy_files_from=model.origin.path)


_CONFIG_PY = '''"""The experiment config of this workdir (written by moejax.surgery): its config.json.

    python -m moejax.main --config=<this workdir>/config.py --workdir=<this workdir> --config.train.steps=<N>
"""
import json
import pathlib

import ml_collections
{imports}

def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((pathlib.Path(__file__).parent / "config.json").read_text()))
'''


def _save_workdir(model: SurgeryModel, out: pathlib.Path, step: int) -> None:
    from moejax.training.checkpoint import Checkpointer
    origin = model.origin
    experiment = copy.deepcopy(dict(origin.experiment))
    sizes = sizes_from_params(experiment, model.params)
    experiment["model"] = model_section(origin.experiment["model"], origin.config, model.config)
    reloaded = model_config(experiment["model"], **sizes)
    if reloaded != model.config:      # a section written in a form the minimal rewrite cannot extend: write specs whole
        experiment["model"] = model_section(origin.experiment["model"], origin.config, model.config, whole=True)
        reloaded = model_config(experiment["model"], **sizes)
    if reloaded != model.config:
        raise RuntimeError(f"moejax.surgery: the rewritten model section does not rebuild the model's config "
                           f"({_first_field_difference(reloaded, model.config)})")
    state = train_state(model, experiment, step)
    ckpt = Checkpointer(out, keep=1, async_save=False)
    try:
        ckpt.save(step, state)
    finally:
        ckpt.close()
    (out / "config.json").write_text(json.dumps(experiment, indent=2, sort_keys=True) + "\n")
    steered = any(r.spec.router.steer for r in moe_layers(model))
    (out / "config.py").write_text(_CONFIG_PY.format(
        imports="import moejax.routing.transforms.steer  # registers router.steer\n" if steered else ""))


def _first_field_difference(a: Any, b: Any) -> str:
    for f in dataclasses.fields(a):
        if getattr(a, f.name) != getattr(b, f.name):
            return f"model.{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
    return "equal fields"


def model_section(old: Mapping[str, Any], old_config: ModelConfig, new_config: ModelConfig, *,
                  whole: bool = False) -> dict[str, Any]:
    """The experiment config's ``model`` section ``old`` with the fields where ``new_config`` differs from
    ``old_config`` rewritten: inside an MoE spec only the entries that changed (``num_experts``, ``router.k``,
    ``router.steer``, ...), a spec that is new (upcycling) or every changed spec with ``whole`` in full; the other
    fields stay as written."""
    if type(old_config) is not type(new_config):
        raise ValueError(f"config: a {type(old_config).__name__} cannot become a {type(new_config).__name__}")
    out = _jsonable(dict(old.items()))
    for f in dataclasses.fields(new_config):
        before, after = getattr(old_config, f.name), getattr(new_config, f.name)
        if before == after:
            continue
        written = out.get(f.name)
        if f.name == "layers" and not whole and isinstance(written, list) and len(written) == len(before) == len(after):
            out[f.name] = [w if b == a else _rewritten(f"layers[{i}]", w, b, a)        # MLPConfig: one spec per layer
                           for i, (w, b, a) in enumerate(zip(written, before, after))]
        else:
            out[f.name] = _rewritten(f.name, None if whole else written, before, after)
    return _jsonable(out)


def _rewritten(name: str, written: Any, before: Any, after: Any) -> Any:
    """A changed field: only the changed entries of an MoE spec written as a mapping, anything else in full."""
    if isinstance(before, MoEConfig) and isinstance(after, MoEConfig) and isinstance(written, dict):
        return _changed_entries(written, _jsonable(before.to_dict()), _jsonable(after.to_dict()))
    return _plain_field(name, after)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _changed_entries(section: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """``section`` (a config mapping as written) with the entries where the full form ``after`` differs from
    ``before`` set, recursively; entries that ``after`` no longer has are removed."""
    out = dict(section)
    for key, value in after.items():
        prev = before.get(key)
        if isinstance(prev, dict) and isinstance(value, dict):
            sub = section.get(key) if isinstance(section.get(key), dict) else {}
            new_sub = _changed_entries(sub, prev, value)
            if new_sub != sub:
                out[key] = new_sub
        elif key not in before or prev != value:
            out[key] = value
    for key in before:
        if key not in after:
            out.pop(key, None)
    return out


def _plain_field(name: str, value: Any) -> Any:
    if isinstance(value, MoEConfig):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain_field(name, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"model.{name}: expert surgery does not rewrite this field (a {type(value).__name__})")


def _example_input(config: ModelConfig, experiment: Mapping[str, Any], params: Mapping[str, Any]
                   ) -> jax.ShapeDtypeStruct:
    """The shape of a training batch (what the trainer's init traces with; parameters do not depend on it, the
    dispatch's routing groups must divide its tokens)."""
    from moejax.data import DataConfig
    data = DataConfig.from_dict(experiment["data"])
    if isinstance(config, LMConfig):
        return jax.ShapeDtypeStruct((data.batch_size, data.seq_len or 1), jnp.int32)
    if isinstance(config, ViTConfig):
        return jax.ShapeDtypeStruct((data.batch_size, *config.image_size, config.channels), jnp.float32)
    return jax.ShapeDtypeStruct((data.batch_size, int(np.shape(params["input"]["kernel"])[0])), jnp.float32)


def train_state(model: SurgeryModel, experiment: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The train state (as the trainer checkpoints it: ``step``, ``params``, ``opt_state``, ``moe_state``, ``rng``)
    of ``model`` at ``step``: a fresh optimiser state from ``experiment``'s optimiser, the run's rng.

    Its tree (every path, shape and dtype) is checked against the state the trainer initialises for the new config
    (traced, not computed), so a checkpoint the trainer could not restore is never written.
    """
    from moejax.training import loop, optim
    from moejax.training.checkpoint import first_difference, tree_layout
    from moejax.training.config import train_settings
    settings = train_settings(experiment)
    tx = optim.make_optimizer(experiment.get("optimizer", {}), settings.steps)
    params = jax.tree_util.tree_map(jnp.asarray, model.params)
    rng = model.origin.rng
    state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": tx.init(params),
             "moe_state": {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in model.variables.items()
                           if k != "params"},
             "rng": jnp.asarray(rng) if rng is not None else jax.random.key_data(jax.random.key(0))}
    example = _example_input(model.config, experiment, model.params)
    module = model.module()
    expected = jax.eval_shape(lambda key, x: loop.init_fn(module, tx, x, boxed=False)(key), jax.random.key(0),
                              example)
    diff = first_difference(tree_layout(loop.state_dict(expected)), tree_layout(state))
    if diff is not None:
        raise RuntimeError(f"moejax.surgery: the new model's train state is not the one the trainer builds for its "
                           f"config: {diff}")
    return state
