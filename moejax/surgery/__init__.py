"""Expert surgery: profile, steer, prune, merge, compress, quantize and upcycle the experts of a trained moejax model
or an imported Hugging Face MoE.

Every tool is a function over a :class:`SurgeryModel` (typed config + variables + where it came from) that returns
a new one; :func:`save` writes it into a new directory in the form it was loaded from (a workdir the trainer
resumes, or a Hugging Face directory), never touching the input. The command line wires them all::

    python -m moejax.surgery <tool> --model=<workdir | HF dir> --out=<new dir> [options]

Modules (the tool functions live there; the package re-exports the model API only, so that ``surgery.steer`` or
``surgery.prune`` stay the modules): :mod:`.model` (layers, their arrays, rewriting experts), :mod:`.io` (load,
save), :mod:`.profile`
(routing statistics), :mod:`.steer` (router-logit offsets, SteerMoE's detection), :mod:`.prune` (frequency, list,
reconstruction), :mod:`.merge` (M-SMoE and baselines), :mod:`.compress` (low rank, shared basis),
:mod:`.quantize` (weight-only round-to-nearest) and :mod:`.upcycle` (dense -> MoE).
"""
from moejax.surgery.io import load, save
from moejax.surgery.model import (LayerUpdate, MoELayerRef, Origin, SurgeryModel, check_remappable, check_sparse,
                                  config_with_experts, layer_experts, layer_variables, moe_layers, replace_experts,
                                  resolve_layer, router_arrays, router_kernel, select_experts, selection_bias)

__all__ = ["LayerUpdate", "MoELayerRef", "Origin", "SurgeryModel", "check_remappable", "check_sparse",
           "config_with_experts", "layer_experts", "layer_variables", "load", "moe_layers", "replace_experts",
           "resolve_layer", "router_arrays", "router_kernel", "save", "select_experts", "selection_bias"]
