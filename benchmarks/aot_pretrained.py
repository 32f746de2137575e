"""The pretrained MoE architectures at their real sizes, compiled for TPU slices and H100/H200s by ``moejax.aot``.

    python benchmarks/aot_pretrained.py --run [--only=ROW,...] [--gpu_python=/path/to/venv/bin/python]
    python benchmarks/aot_pretrained.py --table

``--run`` compiles every row below (``python -m moejax.aot``, one process per row; GPU rows with ``--gpu_python``, a
Python with jax's CUDA plugin installed, and skipped without it) and writes its report and printed table to
``benchmarks/results/aot_pretrained/<row>.json`` / ``.txt``. ``--table`` prints the markdown table of
``docs/accelerator.md`` from those files. Every row is a command a user can run alone (``command``).

Rows: generation in bf16 (prefill of 8 prompts of 4,096 tokens into a cache of 4,224 slots, then one-token decode
steps), and full fine-tuning (AdamW, float32 parameters and moments, bf16 compute, one 2,048-token sequence per
token shard, no rematerialisation: the trainer has none yet), each on the smallest slice or GPU count expected to
hold it. A row that does not fit is reported as such, with the compiler's numbers.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "aot_pretrained"
GEN = ["--programs=prefill,decode", "--gen_batch=8", "--gen_prompt_len=4096", "--gen_new_tokens=128"]


def mesh(**axes: int) -> list[str]:
    return [f"--config.mesh.{a}={n}" for a, n in ({"data": 1} | axes).items()]


def finetune(batch: int, seq: int = 2048) -> list[str]:
    return ["--programs=train", f"--config.data.batch_size={batch}", f"--config.data.eval_batch_size={batch}",
            f"--config.data.seq_len={seq}"]


# row id -> (architecture, target, arguments)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "olmoe_gen_v5e": ("olmoe_1b_7b", "tpu:v5e:2x2", GEN + mesh(expert=4)),
    "olmoe_gen_h100": ("olmoe_1b_7b", "gpu:h100:1", GEN),
    "olmoe_gen_h100x2": ("olmoe_1b_7b", "gpu:h100:2", GEN + mesh(data=2)),
    "mixtral_gen_v5p": ("mixtral_8x7b", "tpu:v5p:2x2x1", GEN + mesh(expert=4)),
    "mixtral_gen_h100": ("mixtral_8x7b", "gpu:h100:4", GEN + mesh(expert=4)),
    "qwen3_30b_gen_v5p": ("qwen3_30b_a3b", "tpu:v5p:2x2x1", GEN + mesh(expert=4)),
    "qwen3_30b_gen_h100x2": ("qwen3_30b_a3b", "gpu:h100:2", GEN + mesh(expert=2)),
    "qwen3_30b_gen_h100": ("qwen3_30b_a3b", "gpu:h100:4", GEN + mesh(expert=4)),
    "qwen3_30b_gen_h100x8": ("qwen3_30b_a3b", "gpu:h100:8", GEN + mesh(expert=8)),
    "qwen2_57b_gen_v5p": ("qwen2_57b_a14b", "tpu:v5p:2x2x1", GEN + mesh(expert=4)),
    "qwen2_57b_gen_h100": ("qwen2_57b_a14b", "gpu:h100:4", GEN + mesh(expert=4)),
    "qwen2_57b_gen_h100x8": ("qwen2_57b_a14b", "gpu:h100:8", GEN + mesh(expert=8)),
    "deepseek_v3_gen_v5e": ("deepseek_v3", "tpu:v5e:2x2", ["--programs=decode", "--gen_batch=8",
                                                            "--gen_prompt_len=4096"] + mesh(expert=4)),
    "deepseek_v3_gen_v5p": ("deepseek_v3", "tpu:v5p:4x4x2", GEN + mesh(expert=8, tensor=4)),
    "deepseek_v3_gen_h200": ("deepseek_v3", "gpu:h200:16", GEN + mesh(expert=8, tensor=2)),
    "olmoe_ft_v5p": ("olmoe_1b_7b", "tpu:v5p:2x2x1", finetune(4) + mesh(expert=4)),
    "olmoe_ft_v5p_4096": ("olmoe_1b_7b", "tpu:v5p:2x2x1", finetune(4, 4096) + mesh(expert=4)),
    "olmoe_ft_h100": ("olmoe_1b_7b", "gpu:h100:8", finetune(8) + mesh(expert=8)),
    "mixtral_ft_v5p": ("mixtral_8x7b", "tpu:v5p:4x4x1", finetune(16) + mesh(expert=8, fsdp=2)),
    "mixtral_ft_h100": ("mixtral_8x7b", "gpu:h100:16", finetune(16) + mesh(expert=8, fsdp=2)),
    "qwen3_30b_ft_v5p": ("qwen3_30b_a3b", "tpu:v5p:2x2x2", finetune(8) + mesh(expert=8)),
    "qwen3_30b_ft_h100": ("qwen3_30b_a3b", "gpu:h100:8", finetune(8) + mesh(expert=8)),
    "qwen2_57b_ft_v5p": ("qwen2_57b_a14b", "tpu:v5p:4x4x1", finetune(16) + mesh(expert=8, fsdp=2)),
}


def command(row: str) -> list[str]:
    arch, target, args = ROWS[row]
    return ["-m", "moejax.aot", "--config=configs/hf_finetune.py", f"--hf={arch}", f"--target={target}", *args,
            f"--json=benchmarks/results/aot_pretrained/{row}.json"]


def run(rows: list[str], gpu_python: str | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = ROWS[row][1]
        python = gpu_python if target.startswith("gpu:") else sys.executable
        if python is None:
            print(f"{row}: skipped (a GPU row needs --gpu_python with jax's CUDA plugin)", flush=True)
            continue
        (OUT / f"{row}.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        out = subprocess.run([python, *command(row)], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        text = out.stdout + out.stderr + f"[exit {out.returncode}, {seconds:.0f} s]\n"
        (OUT / f"{row}.txt").write_text(text)
        if out.returncode == 2 or not (OUT / f"{row}.json").exists():
            (OUT / f"{row}.json").write_text(json.dumps({"error": out.stderr.strip().splitlines()[-1:],
                                                         "exit": out.returncode}, indent=2))
        print(f"{row}: exit {out.returncode} in {seconds:.0f} s", flush=True)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f}"


def table() -> str:
    lines = ["| architecture | what | target | mesh | per-device GiB (state / total) of | fits | command |",
             "|---|---|---|---|---|---|---|"]
    for row, (arch, target, _) in ROWS.items():
        path = OUT / f"{row}.json"
        cmd = "`python " + " ".join(shlex.quote(a) for a in command(row)[:-1]) + "`"
        if not path.exists():
            lines.append(f"| {arch} | | {target} | | not run | | {cmd} |")
            continue
        r = json.loads(path.read_text())
        if "programs" not in r:
            lines.append(f"| {arch} | | {target} | | error: {' '.join(r.get('error', []))} | | {cmd} |")
            continue
        what = "generate" if r["generation"] else "fine-tune " + "x".join(str(n) for n in r["input_shape"])
        mesh_text = " ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1)
        cells = []
        for p in r["programs"]:
            if "refused" in p:
                cells.append(f"{p['name']}: refused by the compiler ({p['refused'].split(': ', 1)[-1][:160]})")
            else:
                cells.append(f"{p['name']}: {_gib(p['memory']['state'])} / {_gib(p['memory']['total'])}")
        fits = "yes" if r["fits"] else "**no**"
        lines.append(f"| {arch} | {what} | {target} | {mesh_text} | {'; '.join(cells)} of "
                     f"{_gib(r['memory_per_device'])} | {fits} | {cmd} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated row ids (default: every row)")
    parser.add_argument("--gpu_python", default=None)
    args = parser.parse_args()
    rows = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; rows: {', '.join(ROWS)}")
    if args.run:
        run(rows, args.gpu_python)
    if args.table or not args.run:
        print(table())


if __name__ == "__main__":
    main()
