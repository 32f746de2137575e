"""The benchmark scripts run end to end on tiny shapes and write well-formed results (no timing is asserted)."""
from __future__ import annotations

import json
import math
import pathlib
import runpy
import sys

import chex
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")


def test_moe_layer_benchmark_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "layer.json"
    run_script("moe_layer.py", ["--smoke", "--rounds", "1", "--routings", "balanced,zipf", "--kinds", "glu",
                                "--only", "bulk_t16,capacity_index_cf1.0", "--layers", "dropless_auto,capacity_index_cf1.25",
                                "--json", str(out)], monkeypatch)
    learned = json.loads(out.read_text())["learned"]
    assert [(r["kind"], r["routing"]) for r in learned] == [("glu", "balanced"), ("glu", "zipf")]
    for r in learned:      # the 'experts alone' row is a row of balanced settings only
        assert set(r["impls"]) == {"dropless_auto", "capacity_index_cf1.25"} | (
            {"experts_alone"} if r["routing"] == "balanced" else set())
        assert r["dense_peak_mib"] > 0
        for row in r["impls"].values():
            assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"] and row["peak_mib"] > 0
    # The Zipf-skewed router really skews the load (balanced-at-init routers do not, up to sampling noise).
    assert learned[1]["impls"]["dropless_auto"]["load_max_over_mean"] > learned[0]["impls"]["dropless_auto"][
        "load_max_over_mean"]
    results = json.loads(out.read_text())["results"]
    assert [r["routing"] for r in results] == ["balanced", "zipf"]
    for r in results:
        assert any(impl.startswith("dropless_bulk") for impl in r["impls"])
        assert any(impl.startswith("capacity_index") for impl in r["impls"])
        assert not any(impl.startswith("capacity_einsum") for impl in r["impls"])
        for row in r["impls"].values():
            assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
            assert math.isfinite(row["ratio_median"]) and row["ratio_median"] > 0
        # A balanced routing makes bulk's slabs exactly hold every row: no padding work.
        if r["routing"] == "balanced":
            bulk = [row for impl, row in r["impls"].items() if impl.startswith("dropless_bulk")]
            assert all(row["block_work_ratio"] == pytest.approx(1.0) for row in bulk)
    assert "dense/moe" in capsys.readouterr().out


def test_gmm_benchmark_smoke(tmp_path, monkeypatch):
    out = tmp_path / "gmm.json"
    run_script("gmm.py", ["--m", "64", "--k", "8", "--n", "16", "--e", "4", "--tile", "4", "--rounds", "1",
                          "--impls", "slabs,bulk,padded", "--json", str(out)], monkeypatch)
    rows = json.loads(out.read_text())["results"]
    got = {(r["skew"], r["impl"]) for r in rows}
    # The slab ceiling is only defined (and timed) for equal group sizes.
    assert got == {("balanced", "slabs"), ("balanced", "bulk"), ("balanced", "padded"), ("zipf", "bulk"),
                   ("zipf", "padded")}
    assert all(r["ms"] > 0 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] for r in rows)


def test_gmm_benchmark_bfloat16_forward_reports_tflops(tmp_path, monkeypatch):
    # The accelerator command's options (bf16, forward only) on a tiny shape: ragged_dot runs everywhere.
    out = tmp_path / "gmm.json"
    run_script("gmm.py", ["--m", "64", "--k", "16", "--n", "16", "--e", "4", "--rounds", "1", "--dtype", "bfloat16",
                          "--mode", "fwd", "--skews", "zipf", "--impls", "ragged_dot", "--json", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["results"]
    assert row["impl"] == "ragged_dot" and row["skew"] == "zipf"
    assert row["tflops"] > 0 and row["dense_tflops"] > 0


def test_accelerator_check_smoke(tmp_path, monkeypatch, capsys):
    # The one command a lent GPU/TPU runs, at tiny shapes on CPU: every item runs and is recorded, the results go
    # to --out (never into benchmarks/results), and the backend auto should pick is printed.
    results = ROOT / "benchmarks" / "results"
    before = set(results.iterdir())
    run_script("accelerator_check.py", ["--smoke", "--out", str(tmp_path)], monkeypatch)
    assert set(results.iterdir()) == before
    (path,) = tmp_path.glob("accelerator_cpu_*.json")
    data = json.loads(path.read_text())
    assert path.with_suffix(".md").exists() and data["smoke"] and data["auto_now"] == "bulk"
    items = data["items"]
    assert [(name, item["status"]) for name, item in items.items()] == \
        [("contract", "ok"), ("gmm", "ok"), ("layer", "ok"), ("train", "ok")]
    contract = items["contract"]["rows"]
    assert {r["dtype"] for r in contract} == {"float32", "bfloat16"} and all(r["ok"] for r in contract)
    timed = [r for r in items["gmm"]["rows"] if "ratio" in r]
    assert {(r["shape"], r["skew"]) for r in timed} == {(s, k) for s in ("mixtral", "deepseek_v3")
                                                       for k in ("balanced", "zipf")}
    # XLA:CPU lowers ragged_dot to a dense product over all experts: refused, with the reason, not timed.
    dense = [r for r in items["gmm"]["rows"] if r["backend"] == "ragged_dot"]
    assert dense and all("XLA counts" in r["error"] and "ms" not in r for r in dense)
    assert all(r["ratio"] > 0 for r in items["layer"]["rows"])
    (train,) = items["train"]["rows"]
    assert train["tokens_per_sec"] > 0 and train["train_flops_per_token"] > 0 and "mfu" not in train
    assert data["recommended_auto"]["backend"] == "bulk"
    assert "auto should pick: bulk" in capsys.readouterr().out
    with pytest.raises(SystemExit):              # --smoke never writes into benchmarks/results
        run_script("accelerator_check.py", ["--smoke"], monkeypatch)


def test_moe_layer_experts_alone_row_is_every_expert_on_its_own_rows():
    """The 'experts alone' row's batched matmuls equal a loop over experts, each on its own T*K/E consecutive rows of
    the K-fold tiled input, in values and gradients (MLP and SwiGLU experts)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from moejax.experts.ffn import activation_fn
    bench = runpy.run_path(str(ROOT / "benchmarks" / "moe_layer.py"))
    t, d, f, e, k = 6, 4, 8, 4, 2
    x = jax.random.normal(jax.random.key(0), (t, d))
    cot = jax.random.normal(jax.random.key(1), (t, d))

    def loop(params, x, kind, act):
        rows, r, fn = jnp.tile(x, (k, 1)), t * k // e, activation_fn(act)
        outs = []
        for i in range(e):
            xs = rows[i * r:(i + 1) * r]
            h = fn(xs @ params["up"][i]) if kind == "mlp" else fn(xs @ params["gate"][i]) * (xs @ params["up"][i])
            outs.append(h @ params["down"][i])
        return jnp.sum(jnp.concatenate(outs).reshape(k, t, d).sum(0) * cot)

    for kind, act in (("glu", "silu"), ("mlp", "gelu")):
        params = bench["_experts_alone_params"](jax.random.key(2), kind, e, d, f)
        want = jax.value_and_grad(loop, argnums=(0, 1))(params, x, kind, act)
        got = jax.value_and_grad(bench["_experts_alone_loss"], argnums=(0, 1))(params, x, kind=kind, act=act, k=k,
                                                                               cot=cot)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_matmul_shapes_smoke(tmp_path, monkeypatch):
    out = tmp_path / "mm.json"
    run_script("matmul_shapes.py", ["--rounds", "1", "--shrink", "16", "--json", str(out)], monkeypatch)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["setting"], r["impl"]) for r in rows} == {("S1", "xla"), ("S1", "numpy"), ("S2", "xla"), ("S2", "numpy")}
    assert len(rows) == 10 and all(r["ms"] > 0 and r["gflops"] > 0 for r in rows)
