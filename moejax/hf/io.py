"""Import and export of Hugging Face directories: :func:`load` and :func:`save`.

Import: ``config.json`` -> :class:`~moejax.models.LMConfig` (its family, :mod:`moejax.hf.family`), then every moejax
array is built from its HF tensors (:class:`~moejax.hf.layout.TensorMap`) read lazily from the safetensors. With a
mesh, each array is created with ``jax.make_array_from_callback`` and its ``NamedSharding`` (the parameter's
logical axes through the rules table), so every device reads only its own block from the files (stacked experts:
only its experts) and no array is ever gathered on one device.

Export: the family's ``config.json`` (Hub form) and the tensors under their Hub names and layouts, sharded above a
size limit with an index, fetched from the devices one file at a time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moejax.hf.config_keys import to_hub_form
from moejax.hf.family import Family, check_expressible, family_for, lm_config_from_hf
from moejax.hf.files import DEFAULT_SHARD_BYTES, FLOAT_DTYPES, CheckpointFiles, existing_weights, write_checkpoint
from moejax.hf.layout import TensorMap
from moejax.models.config import LMConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel.mesh import DEFAULT_RULES, Rules
from moejax.parallel.sharding import state_shardings

log = logging.getLogger("moejax")
COLLECTIONS = ("params", "moe_state")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """An imported checkpoint.

    Attributes:
      config: the moejax model (``TransformerLM(config)``), dropless MoE dispatch, dtypes of the loaded arrays.
      variables: ``{'params': ..., 'moe_state': ...}`` of plain (unboxed) arrays, sharded when loaded with a mesh;
        ``moe_state`` holds DeepSeek's selection biases (empty for the other families).
      hf_config: the directory's ``config.json`` as read.
      path: the directory.
    """

    config: LMConfig
    variables: dict[str, Any]
    hf_config: dict[str, Any]
    path: str


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face directory."""
    fname = os.path.join(path, "config.json")
    if not os.path.exists(fname):
        raise ValueError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        with open(fname, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:     # json's ValueError names a line and column, not the file
        raise ValueError(f"{fname}: not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{fname}: must hold a JSON object, not a {type(config).__name__}")
    return config


def with_dtype(cfg: LMConfig, dtype: str) -> LMConfig:
    """``cfg`` with parameters and computation in ``dtype`` (the MoE layers too)."""
    moe = None if cfg.moe is None else dataclasses.replace(cfg.moe, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, moe=moe)


def abstract_variables(cfg: LMConfig) -> dict[str, Any]:
    """The variables of ``TransformerLM(cfg)`` as shapes, parameters still boxed with their logical axes (nothing is
    computed: ``jax.eval_shape`` of init); only the ``params`` and ``moe_state`` collections."""
    tree = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return {k: tree[k] for k in COLLECTIONS if k in tree} | {k: {} for k in COLLECTIONS if k not in tree}


def _paths(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` with boxes kept as leaves."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _unbox(leaf: Any) -> Any:
    return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def check_maps(maps: list[TensorMap], abstract: dict[str, Any], family: Family) -> dict[tuple[str, ...], TensorMap]:
    """The maps by path, after checking that they cover the model's variables exactly, with the right shapes (a
    failure here is a bug of the family's mapping, not of the checkpoint)."""
    by_path = {m.path: m for m in maps}
    want = _paths(abstract)
    for path in sorted(set(want) | set(by_path)):
        if path not in by_path or path not in want:
            where = "has no HF tensor" if path not in by_path else "is not a variable of the model"
            raise RuntimeError(f"moejax.hf {family.model_type}: {'/'.join(path)} {where}")
        if tuple(_unbox(want[path]).shape) != by_path[path].full_shape:
            raise RuntimeError(f"moejax.hf {family.model_type}: {'/'.join(path)} is {_unbox(want[path]).shape}, the "
                               f"mapping builds {by_path[path].full_shape}")
    return by_path


def check_files(files: CheckpointFiles, maps: list[TensorMap], family: Family, hf_config: Mapping[str, Any]) -> None:
    """Every tensor the mapping needs exists with its shape and a float dtype; every tensor in the files is used
    (or deliberately skipped by the family). The first problem is a one-line error naming the tensor."""
    used = set()
    for m in maps:
        for name in m.hf_names:
            used.add(name)
            if name not in files.names:
                raise ValueError(f"{name}: missing from {files.path}")
            shape = files.shape(name)
            if shape != m.hf_shape:
                raise ValueError(f"{name}: shape {shape}, expected {m.hf_shape}")
            if files.dtype(name) not in FLOAT_DTYPES:
                raise ValueError(f"{name}: dtype {files.dtype(name)} not supported (quantized weights; use a "
                                 f"bf16/fp16/fp32 checkpoint)")
    extra = sorted(files.names - used)
    skipped = [n for n in extra if family.skipped(n, hf_config)]
    unused = [n for n in extra if n not in set(skipped)]
    if unused:
        raise ValueError(f"{unused[0]}: in {files.path} but not part of a {family.model_type} model as configured "
                         f"({len(unused)} such tensor(s))")
    if skipped:
        log.info("moejax.hf: skipping %d tensors of %s that the causal LM does not use (e.g. %s)", len(skipped),
                 files.path, skipped[0])


def checkpoint_dtype(files: CheckpointFiles, maps: list[TensorMap]) -> str:
    """The float dtype holding most of the mapped parameters (fp32 / bf16 / fp16)."""
    count: dict[str, int] = {}
    for m in maps:
        for name in m.hf_names:
            count[files.dtype(name)] = count.get(files.dtype(name), 0) + int(np.prod(m.hf_shape))
    dtype = FLOAT_DTYPES[max(count, key=count.get)]
    return "float32" if dtype == "float64" else dtype


def load(path: str, *, mesh: Mesh | None = None, dtype: str | None = None, rules: Rules | None = None
         ) -> LoadedModel:
    """Imports a Hugging Face directory (``config.json`` + ``model.safetensors`` or shards with their index).

    Args:
      path: the directory.
      mesh: place every array directly with its ``NamedSharding`` on this mesh (its parameters' logical axes through
        ``rules``; e.g. expert weights [E, D, F] split over ``expert``); each device reads only its block. None: the
        default device.
      dtype: parameter and computation dtype (``float32``, ``bfloat16``, ``float16``); default: the checkpoint's
        (float32 stays float32, bf16 stays bf16). Non-gradient state (selection biases) stays float32.
      rules: logical-axis rules (default :data:`moejax.parallel.mesh.DEFAULT_RULES`).

    Returns a :class:`LoadedModel`. Errors are one line: an unsupported or unknown ``config.json`` key, a missing
    or misshaped tensor, a tensor in the files that the model does not use.
    """
    hf_config = read_config(path)
    cfg = lm_config_from_hf(hf_config)
    family = family_for(hf_config["model_type"])
    with CheckpointFiles(path) as files:
        maps = family.tensors(cfg)
        check_files(files, maps, family, hf_config)
        cfg = with_dtype(cfg, str(jnp.dtype(dtype)) if dtype is not None else checkpoint_dtype(files, maps))
        abstract = abstract_variables(cfg)
        by_path = check_maps(maps, abstract, family)
        shardings = None if mesh is None else _paths(state_shardings(abstract, mesh, rules or DEFAULT_RULES))

        def build(path_: tuple[str, ...], leaf: Any) -> jax.Array:
            m, target = by_path[path_], _unbox(leaf)
            if shardings is None:
                return jnp.asarray(m.read(files.read).astype(target.dtype))
            return place(m, files, target.dtype, shardings[path_])

        arrays = {p: build(p, leaf) for p, leaf in _paths(abstract).items()}
    variables = _nest(arrays)
    return LoadedModel(config=cfg, variables={k: variables.get(k, {}) for k in COLLECTIONS}, hf_config=hf_config,
                       path=path)


def place(m: TensorMap, files: CheckpointFiles, dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """One array created on its devices from the files: each device's block is read on its own (replicated blocks
    once)."""
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, m.full_shape))
        if key not in cache:
            cache[key] = m.read(files.read, index).astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(m.full_shape, sharding, block)


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


# ---- export ------------------------------------------------------------------------------------------------------

def hf_config_for(config: LMConfig, model_type: str, hf_config: Mapping[str, Any] | None = None,
                  dtype: str = "float32") -> dict[str, Any]:
    """The Hub-form ``config.json`` of ``config`` as ``model_type``: ``hf_config`` (e.g. the imported one) with the
    family's keys rewritten from ``config``, or derived from ``config`` alone. Raises naming the first ``model.*``
    field the family cannot express (the written config is read back and must describe the same model)."""
    family = family_for(model_type)
    out = to_hub_form(hf_config or {})
    if out.get("model_type", model_type) != model_type:
        raise ValueError(f"model_type={model_type!r}: hf_config is a {out['model_type']!r} config")
    for alias, key in family.aliases.items():        # e.g. transformers-5's num_local_experts -> the Hub's key
        if alias in out:
            out[key] = out.pop(alias)
    if hf_config is None:     # token ids are not part of the model; do not inherit transformers' class defaults
        out.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    out.update(family.write_config(config))
    out.update(model_type=model_type, architectures=[family.architecture])
    out["dtype" if "dtype" in out and "torch_dtype" not in out else "torch_dtype"] = dtype
    try:
        written = lm_config_from_hf(out)
    except ValueError as e:
        raise ValueError(f"model: cannot be exported as model_type={model_type!r}: {e}") from e
    check_expressible(family, config, written)
    return out


def save(path: str, config: LMConfig, variables: Mapping[str, Any], *, model_type: str | None = None,
         hf_config: Mapping[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         copy_files_from: str | None = None, overwrite: bool = False) -> list[str]:
    """Exports a moejax LM as a Hugging Face directory that transformers loads (``from_pretrained(path)``).

    Args:
      path: the directory (created).
      config: the model; variables: ``{'params': ..., 'moe_state': ...}`` (arrays on any devices, plain or boxed).
      model_type: the family (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``); default
        ``hf_config['model_type']``.
      hf_config: a config to keep keys from (token ids, ...), e.g. ``LoadedModel.hf_config``; its model keys are
        rewritten from ``config``.
      max_shard_bytes: above this, tensors go into several files with ``model.safetensors.index.json``.
      copy_files_from: a directory to copy the tokenizer and generation config files from (those present).
      overwrite: replace the safetensors of an earlier export in ``path`` (otherwise an error names them).

    Returns the safetensors file names. Tensors keep the dtype of their arrays. Errors are one line naming the
    ``model.*`` field the family cannot express, or the variable that is missing or not exported.
    """
    model_type = model_type or (hf_config or {}).get("model_type")
    if model_type is None:
        raise ValueError("model_type: needed (or an hf_config with one), e.g. model_type='mixtral'")
    family = family_for(model_type)
    dtype = str(jnp.dtype(jax.tree_util.tree_leaves(variables["params"])[0].dtype))
    out_config = hf_config_for(config, model_type, hf_config, dtype)       # first: names an inexpressible field
    leaves = {p: _unbox(v) for p, v in _paths({k: variables[k] for k in COLLECTIONS if k in variables}).items()}
    maps = family.tensors(config)
    by_path = {m.path: m for m in maps}
    missing, extra = sorted(set(by_path) - set(leaves)), sorted(set(leaves) - set(by_path))
    if missing:
        raise ValueError(f"variables: {'/'.join(missing[0])}: missing (needed for {model_type!r})")
    if extra:
        raise ValueError(f"variables: {'/'.join(extra[0])}: has no place in a {model_type!r} checkpoint")
    for p, m in by_path.items():
        if tuple(leaves[p].shape) != m.full_shape:
            raise ValueError(f"variables: {'/'.join(p)}: shape {tuple(leaves[p].shape)}, expected {m.full_shape}")
    old = existing_weights(path)
    if old and not overwrite:
        raise ValueError(f"{path}: already holds {old[0]}; pass overwrite=True or choose an empty directory")
    for fname in old:
        os.remove(os.path.join(path, fname))
    tensors = [(name, int(np.prod(m.hf_shape)) * jnp.dtype(leaves[m.path].dtype).itemsize,
                _exporter(m, leaves[m.path], e)) for m in maps for e, name in enumerate(m.hf_names)]
    names = write_checkpoint(path, tensors, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(out_config, f, indent=2, sort_keys=True)
        f.write("\n")
    for fname in COPIED_FILES if copy_files_from else ():
        src = os.path.join(copy_files_from, fname)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, fname)):
            shutil.copyfile(src, os.path.join(path, fname))
    return names


def _exporter(m: TensorMap, array: Any, expert: int):
    """A function making one HF tensor of ``array`` (expert ``expert`` of a stacked one) on the host."""
    def make() -> np.ndarray:
        part = array if m.experts is None else array[expert]
        return m.to_hf_one(np.asarray(jax.device_get(part)))
    return make
