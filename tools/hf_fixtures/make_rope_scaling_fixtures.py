"""Reference logits of fixture checkpoints run with rope scaling (linear, YaRN), for ``tests/test_hf.py``.

Needs torch and transformers (like ``make_fixtures.py``; same environment)::

    /work/fixenv/bin/python tools/hf_fixtures/make_rope_scaling_fixtures.py

For each case it copies a fixture directory from ``tests/fixtures/hf/<family>``, adds a ``rope_scaling`` entry to
its ``config.json`` (the Hub's legacy form, which transformers standardises), loads it with transformers and stores
the logits of the fixture's prompts 0 and 1 in ``tests/fixtures/hf/rope_scaling/<case>.npz`` together with the
``rope_scaling`` dict (as JSON). Small original context lengths make the YaRN ramp cover the rotary dimensions.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"

CASES = {
    "deepseek_v3_yarn": ("deepseek_v3", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 6,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}),
    "qwen3_moe_yarn": ("qwen3_moe", {"type": "yarn", "factor": 3.0, "original_max_position_embeddings": 5}),
    "mixtral_linear": ("mixtral", {"type": "linear", "factor": 2.0}),
}


def main() -> None:
    out_dir = FIXTURES / "rope_scaling"
    out_dir.mkdir(exist_ok=True)
    for case, (family, scaling) in CASES.items():
        ref = np.load(FIXTURES / family / "reference.npz")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            for f in (FIXTURES / family).iterdir():
                shutil.copy(f, tmp / f.name)
            config = json.loads((tmp / "config.json").read_text())
            config["rope_scaling"] = scaling
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            model = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
            logits = {}
            for i in (0, 1):
                n = int(ref["prompt_lengths"][i])
                with torch.no_grad():
                    ids = torch.tensor(ref["prompts"][i][:n][None], dtype=torch.long)
                    logits[f"logits_{i}"] = model(ids).logits[0].float().numpy()
        np.savez_compressed(out_dir / f"{case}.npz", family=family, rope_scaling=json.dumps(scaling),
                            transformers_version=transformers.__version__, **logits)
        print(case, {k: v.shape for k, v in logits.items()})


if __name__ == "__main__":
    main()
