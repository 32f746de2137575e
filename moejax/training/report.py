"""What the trainer prints: a header, one line per ``train.log_every`` steps, evaluation lines.

Printed by the lead process to stdout whether or not it is a terminal (on a terminal through the progress bar, so
that the bar stays intact); ``workdir/metrics.jsonl`` and TensorBoard get every number as before.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

import jax
import numpy as np

from moejax.config import MoEConfig


def config_digest(jsonable: Any) -> str:
    """12 hex digits of the sha256 of the config as JSON (sorted keys): the same config, the same digest."""
    return hashlib.sha256(json.dumps(jsonable, sort_keys=True).encode()).hexdigest()[:12]


def header_lines(digest: str, model: Any, example: jax.Array, params: Any, mesh: Any, start: int, total: int
                 ) -> list[str]:
    """Config digest, devices and mesh, total and active parameters (``params``: the train state's), each MoE
    layer's dispatch."""
    from moejax.dispatch.gmm import resolve_name
    from moejax.models import param_counts
    counts = param_counts(model, jax.ShapeDtypeStruct(example.shape, example.dtype), params=params)
    devices = jax.devices()
    mesh_text = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    active = f"{counts.active_max:,}" + ("" if counts.active_mean in (None, counts.active_max)
                                         else f" (mean {counts.active_mean:,.0f})")
    lines = [f"moejax: config {digest}; {len(devices)} x {devices[0].platform} device(s), mesh {mesh_text}; "
             f"steps {start} -> {total}",
             f"moejax: parameters {counts.total:,} total, {active} active per token"]
    cfg = getattr(model, "config", None)
    specs = cfg.ffn_specs() if hasattr(cfg, "ffn_specs") else ()
    dispatch = []
    for i, spec in enumerate(specs):
        if isinstance(spec, MoEConfig) and spec.layer in ("sparse", "chain"):
            d = spec.dispatch
            how = f"dropless/{resolve_name(d.gmm)}" if d.mode == "dropless" else f"capacity/{d.capacity_impl}"
            dispatch.append(f"{i}: E={spec.num_experts} k={spec.router.k} {spec.router.kind} {how}")
        elif isinstance(spec, MoEConfig):
            dispatch.append(f"{i}: E={spec.num_experts} {spec.layer}")
    if dispatch:
        lines.append("moejax: MoE layers " + "; ".join(dispatch))
    return lines


def _load_stats(record: Mapping[str, Any]) -> str:
    loads = [np.asarray(x, np.float64) for x in record.get("expert_load", [])]
    loads = [x for x in loads if x.size > 1]
    if not loads:
        return ""
    dropped = float(np.mean([float(x) for x in record.get("dropped_fraction", [0.0])]))
    peak = max(float(x.max() * x.size) for x in loads)       # max load over mean load, worst layer
    return f"  dropped {dropped:.3f}  load max/mean {peak:.2f}"


def train_line(step: int, total: int, record: Mapping[str, Any], task: str) -> str:
    """``step 100/1500  loss 0.4213  acc 0.871  3120 ex/s  MFU 41.3%  dropped 0.000  load max/mean 1.63`` (LMs:
    ``ppl``; tokens/s next to examples/s when an example has several tokens (LM, ViT); MFU where the device's peak is
    known, :mod:`moejax.training.throughput`)."""
    quality = (f"ppl {float(np.exp(float(record['ce']))):.3f}" if task == "lm" and "ce" in record
               else f"acc {float(record.get('accuracy', float('nan'))):.3f}")
    examples = float(record.get('examples_per_sec', record.get('items_per_sec', 0.0)))
    speed = f"{examples:.0f} ex/s"
    tokens = float(record.get("tokens_per_sec", record.get("items_per_sec", 0.0) if task == "lm" else examples))
    if task == "lm" or tokens != examples:
        speed += f"  {tokens:.0f} tok/s"
    if "mfu" in record:
        speed += f"  MFU {100 * float(record['mfu']):.1f}%"
    return f"step {step}/{total}  loss {float(record['loss']):.4f}  {quality}  {speed}{_load_stats(record)}"


def eval_line(step: int, result: Mapping[str, Any], task: str) -> str:
    quality = (f"ppl {float(result['perplexity']):.3f}" if task == "lm" and "perplexity" in result
               else f"acc {float(result['accuracy']):.4f}")
    return f"eval step {step}  loss {float(result['loss']):.4f}  {quality}{_load_stats(result)}"


def printer(bar: Any, enabled: bool) -> Callable[[str], None]:
    """A line printer that keeps a tqdm bar intact (``bar.write``), or prints; a no-op unless ``enabled``."""
    def emit(line: str) -> None:
        if not enabled:
            return
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)
    return emit
