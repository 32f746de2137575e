"""Metrics sinks: JSON lines, TensorBoard event files, and a progress bar on interactive terminals."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """Arrays and nested lists of arrays -> JSON-friendly floats and lists."""
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricWriter:
    """Appends ``{"step": ..., "split": ..., **metrics}`` to ``metrics.jsonl`` and scalars to TensorBoard.

    With ``enabled=False`` (every process but the first of a multi-process run) nothing is written, but
    ``write`` still returns the record.
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, enabled: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self._tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step``: after a resume they would otherwise appear twice.

        A line that does not parse (the tail of a record being written when the process was killed) is dropped.
        """
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)      # atomic: a kill now leaves the old file or the new one, never half of it

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), "split": split, **{k: to_python(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "split"):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
                elif isinstance(value, list):   # per-layer values: scalars or per-expert vectors
                    for layer, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{split}/{key}/layer{layer}", v, step)
                        else:
                            self._tb.add_histogram(f"{split}/{key}/layer{layer}", np.asarray(v), step)
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int):
    """A tqdm bar when stdout is a terminal, else None."""
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
