"""The family plug-in contract of :mod:`moejax.hf`: one registered :class:`Family` per Hugging Face ``model_type``.

A family knows three things, each a small method: how its ``config.json`` becomes an
:class:`~moejax.models.LMConfig` (:meth:`Family.read_config`, with every key claimed, see
:mod:`moejax.hf.config_keys`), how an ``LMConfig`` is written back as its keys (:meth:`Family.write_config`), and
which HF tensor holds which moejax array (:meth:`Family.tensors`, a list of :class:`~moejax.hf.layout.TensorMap`).
Import and export (:mod:`moejax.hf.io`) only ever call these; they never branch on a family. A new family is one
new file in ``moejax/hf/families/`` registered with :func:`register_family`.

Export checks that a config is expressible generically: the written ``config.json`` is read back and must give
the same model as the ``LMConfig`` (up to dtypes, dispatch and training-only settings); the first field that
differs is named.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from moejax.config import MoEConfig
from moejax.hf.config_keys import HFConfig
from moejax.hf.layout import TensorMap
from moejax.models.config import LMConfig
from moejax.registry import Registry

FAMILIES: Registry["Family"] = Registry("HF family", "config.json: model_type", name_of=lambda f: f.model_type)
# Router settings that act only in training (deterministic=False): an exported model computes the same without them.
TRAINING_ONLY_ROUTER_FIELDS = ("bias_update_rate", "jitter_noise", "gumbel_noise", "gate_dropout")


class Family:
    """One Hugging Face model family. Subclasses set ``model_type`` and ``architecture`` and implement the three
    methods; :func:`register_family` makes the family available to :func:`moejax.hf.load` and :func:`moejax.hf.save`.
    """

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}
    """Other spellings of config keys -> the Hub's key (transformers' ``attribute_map``)."""

    def read_config(self, c: HFConfig) -> LMConfig:
        """The moejax config of a ``config.json`` (``c`` ticks off every key read; refusals are raised here)."""
        raise NotImplementedError

    def write_config(self, cfg: LMConfig) -> dict[str, Any]:
        """The family's ``config.json`` keys for ``cfg`` (Hub form), without ``model_type``/``architectures``/dtype.

        Raises ``model.<field>=...: ...`` for a feature the family has no key for."""
        raise NotImplementedError

    def tensors(self, cfg: LMConfig) -> list[TensorMap]:
        """Every moejax array of ``cfg``'s variables and the HF tensor(s) that hold it."""
        raise NotImplementedError

    def skipped(self, name: str, hf_config: Mapping[str, Any]) -> bool:
        """True for a tensor of the files that moejax deliberately does not load (e.g. multi-token prediction)."""
        return False


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: registers ``cls()`` under ``cls.model_type`` (a second class for one name is an error)."""
    FAMILIES.add(cls())
    return cls


def family_for(model_type: Any) -> Family:
    """The registered family of ``model_type``; a one-line error lists the supported ones."""
    import moejax.hf.families  # noqa: F401  (registers the built-in families)
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type={model_type!r}: not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def lm_config_from_hf(hf_config: Mapping[str, Any]) -> LMConfig:
    """The :class:`LMConfig` of a Hugging Face ``config.json`` mapping (either the Hub or the transformers-5 form).

    Every key is mapped, declared without effect on inference, or refused; unknown keys are errors."""
    family = family_for(hf_config.get("model_type"))
    c = HFConfig(hf_config, family.model_type, family.aliases)
    try:
        cfg = family.read_config(c)
    except ValueError as e:
        if str(e).startswith("config.json"):
            raise
        raise ValueError(f"config.json (model_type={family.model_type!r}): {e}") from e
    c.finish()
    return cfg


def fail_export(family: Family, field: str, value: Any, why: str) -> ValueError:
    """``model.<field>=<value>: cannot be exported as <model_type> (<why>)`` as a ValueError."""
    return ValueError(f"model.{field}={value!r}: cannot be exported as model_type={family.model_type!r} ({why})")


def check_expressible(family: Family, cfg: LMConfig, written: LMConfig) -> None:
    """Raises naming the first field where ``written`` (the exported config read back) differs from ``cfg``."""
    want, got = describe(cfg), describe(written)
    for key in want:
        if want[key] != got.get(key):
            raise fail_export(family, key, want[key], f"its config.json would load as {got.get(key)!r}")


def describe(cfg: LMConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that change what the model computes at inference, flat (``moe.router.k``), with
    equivalent spellings made equal: dtypes, dispatch, dropout and training-only router settings are left out;
    which blocks are MoE replaces ``moe_every``/``dense_layers``; dense-FFN fields are left out when no block is
    dense; shared experts are described by their total width; an attention's defaults are resolved."""
    out: dict[str, Any] = {}
    skip = {"dtype", "param_dtype", "dropout_rate", "moe", "attention", "moe_every", "dense_layers"}
    for f in dataclasses.fields(cfg):
        if f.name not in skip:
            out[f.name] = getattr(cfg, f.name)
    specs = cfg.ffn_specs()
    out["moe_blocks"] = tuple(isinstance(s, MoEConfig) for s in specs)
    if all(isinstance(s, MoEConfig) for s in specs):
        for name in ("dense_hidden_dim", "ffn_kind", "activation", "use_bias"):
            out.pop(name)
    else:
        out["dense_hidden_dim"] = cfg.dense_width
    att = cfg.attention
    for name, value in att.to_dict().items():
        out[f"attention.{name}"] = value
    if hasattr(att, "head_width"):
        out["attention.head_dim"] = att.head_width(cfg.d_model, cfg.num_heads)
    if hasattr(att, "kv_heads"):
        out["attention.num_kv_heads"] = att.kv_heads(cfg.num_heads)
    if cfg.moe is not None:
        out.update(_describe_moe(cfg.moe))
    return out


def _describe_moe(moe: MoEConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(moe):
        if f.name in ("router", "dispatch", "dtype", "param_dtype", "num_shared_experts", "shared_hidden_dim"):
            continue
        out[f"moe.{f.name}"] = getattr(moe, f.name)
    out["moe.shared_width"] = moe.shared_width
    for name, value in moe.router.to_dict().items():
        if name not in TRAINING_ONLY_ROUTER_FIELDS:
            out[f"moe.router.{name}"] = value
    return out
