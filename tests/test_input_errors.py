"""Bad input found by a probe run is one clear line naming what is wrong, raised before anything compiles.

A truncated safetensors file (``python -m moejax.generate``, ``--debug`` for the traceback), a data directory that
is a file, an override inside a section an earlier override set to None, routing groups in dropless mode, prompts
longer than the model's positions (``--truncate_prompts``).
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import pytest

from moejax import cli
from moejax.config import DispatchConfig, MoEConfig
from moejax.data import DataConfig, load_split
from moejax.errors import command_main
from moejax.generation import fit_prompts, for_decoding, generate
from moejax.generation.sources import ByteTokenizer, LanguageModel
from moejax.hf.files import CheckpointFiles
from moejax.models import LMConfig, TransformerLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"

pytestmark = pytest.mark.usefixtures("quick_compiles")   # conftest: tiny models compile faster unoptimised


def run_command(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root on the CPU, XLA optimisations off (tiny models)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a command that refused its input (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def cut(path: pathlib.Path, keep: int) -> None:
    """Truncates ``path`` to its first ``keep`` bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.fixture
def truncated_hf(tmp_path) -> pathlib.Path:
    """A copy of the tiny Mixtral fixture whose model.safetensors was cut in half."""
    model = tmp_path / "mixtral"
    shutil.copytree(FIXTURES / "mixtral", model)
    weights = model / "model.safetensors"
    cut(weights, weights.stat().st_size // 2)
    return model


# ---- 1. a truncated safetensors file -------------------------------------------------------------------------------

def test_generate_names_a_truncated_safetensors_file_in_one_line(truncated_hf):
    line = one_error_line(run_command("moejax.generate", f"--model={truncated_hf}", "--prompt=x"))
    weights = truncated_hf / "model.safetensors"
    size = weights.stat().st_size
    assert line == (f"error: {weights}: not a readable safetensors file (truncated: {size} of the {2 * size} bytes "
                    f"its header describes); re-download or re-export it")


def test_generate_debug_shows_the_traceback(truncated_hf):
    proc = run_command("moejax.generate", f"--model={truncated_hf}", "--prompt=x", "--debug")
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert f"ValueError: {truncated_hf / 'model.safetensors'}: not a readable safetensors file" in proc.stderr


@pytest.mark.parametrize("keep,why", [(0, "truncated: 0 bytes, shorter than the 8-byte header length"),
                                      (100, "truncated: 100 bytes, its header alone claims"),
                                      (-1, "truncated: ")])
def test_every_cut_of_a_shard_is_an_error_naming_the_file(tmp_path, keep, why):
    model = tmp_path / "qwen3_moe"
    shutil.copytree(FIXTURES / "qwen3_moe", model)         # sharded: three files and an index
    shard = model / "model-00002-of-00003.safetensors"
    cut(shard, keep if keep >= 0 else shard.stat().st_size + keep)
    with pytest.raises(ValueError) as err:
        CheckpointFiles(str(model))
    message = str(err.value)
    assert message.startswith(f"{shard}: not a readable safetensors file (") and why in message, message
    assert "\n" not in message


def test_a_broken_index_is_an_error_naming_it(tmp_path):
    model = tmp_path / "qwen3_moe"
    shutil.copytree(FIXTURES / "qwen3_moe", model)
    index = model / "model.safetensors.index.json"
    cut(index, 40)
    with pytest.raises(ValueError, match=rf"^{index}: not a readable safetensors index \(JSONDecodeError"):
        CheckpointFiles(str(model))


def test_command_main_prints_one_line_or_with_debug_raises(capsys):
    def run(argv):
        raise ValueError(f"field={argv[0]}: bad\nsecond line")

    assert command_main(run, ["3"]) == 2
    assert capsys.readouterr().err == "error: field=3: bad\n"
    with pytest.raises(ValueError, match="field=4: bad"):
        command_main(run, ["4"], debug=True)


# ---- 2. a data directory that is a file ----------------------------------------------------------------------------

def test_main_refuses_a_data_dir_that_is_a_file_before_anything_is_built(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    workdir = tmp_path / "run"
    line = one_error_line(run_command("moejax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
                                      f"--config.data.data_dir={afile}"))
    assert line.startswith(f"error: data.data_dir='{afile}': is a file, not a directory; give a directory"), line
    assert not workdir.exists()      # refused with the config checks, before the workdir, mesh, data and model


def test_data_dir_checks(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=rf"^data\.data_dir='{afile}': is a file, not a directory"):
        DataConfig(data_dir=str(afile))
    with pytest.raises(ValueError, match=rf"^data\.data_dir='{afile}/sub': {afile} is a file, so the directory "
                                         r"cannot be created"):
        DataConfig(data_dir=str(afile / "sub"))
    assert DataConfig(data_dir=str(tmp_path / "new" / "dir")).data_dir.endswith("dir")   # created when used
    monkeypatch.setenv("MOEJAX_DATA_DIR", str(afile))
    with pytest.raises(ValueError, match=rf"^\$MOEJAX_DATA_DIR='{afile}': is a file"):
        load_split("digits", "train")
    with pytest.raises(ValueError, match=rf"^data_dir='{afile}': is a file"):        # lm_eval's --data_dir
        load_split("digits", "train", str(afile))


# ---- 3. an override inside a section an earlier override set to None -----------------------------------------------

def lm_like() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"model": {"kind": "transformer_lm", "moe": {"num_experts": 4},
                                                  "layers": [{"router": {"k": 1}}], "extra": None}})
    config.lock()
    return config


@pytest.mark.parametrize("overrides,match", [
    ([("model.moe", "None"), ("model.moe.router.k", "2")],
     r"^model\.moe\.router\.k='2': model\.moe is None \(set by --config\.model\.moe=None\); drop that override"),
    ([("model", "None"), ("model.moe.router.k", "2")], r"^model\.moe\.router\.k='2': model is None \(set by "
                                                      r"--config\.model=None\)"),
    ([("model.layers[0]", "None"), ("model.layers[0].router.k", "2")],
     r"^model\.layers\[0\]\.router\.k='2': model\.layers\[0\] is None \(set by --config\.model\.layers\[0\]=None\)"),
])
def test_an_override_under_a_section_set_to_none_by_an_earlier_override_is_an_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        cli.apply_overrides(lm_like(), overrides)


def test_sections_that_may_still_be_created():
    config = lm_like()
    cli.apply_overrides(config, [("model.extra.x", "2")])              # None written by the config file: a placeholder
    assert config.model.extra.x == 2
    config = lm_like()
    cli.apply_overrides(config, [("model.moe", "None"), ("model.moe", "{'num_experts': 2}"),
                                 ("model.moe.router.k", "2")])          # set again before the field inside it
    assert config.model.moe.to_dict() == {"num_experts": 2, "router": {"k": 2}}


def test_main_prints_the_none_section_override_as_one_line(tmp_path):
    line = one_error_line(run_command("moejax.main", "--config=configs/lm_tiny.py", f"--workdir={tmp_path / 'run'}",
                                      "--config.model.moe=None", "--config.model.moe.router.k=2"))
    assert line.startswith("error: --config.model.moe.router.k='2': model.moe is None (set by --config.model.moe="
                           "None)"), line


# ---- 4. routing groups in dropless mode ----------------------------------------------------------------------------

def test_routing_groups_in_dropless_mode_are_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"^dispatch\.groups=4: ignored by dispatch\.mode='dropless'"):
        DispatchConfig(groups=4)
    with pytest.raises(ValueError, match=r"^dispatch\.groups=2: ignored by dispatch\.mode='dropless'"):
        MoEConfig.from_dict({"dispatch": {"mode": "dropless", "groups": 2}})
    assert DispatchConfig(mode="capacity", groups=4).num_groups(64) == 4
    assert DispatchConfig(mode="dropless", groups=1).num_groups(64) == 1


def test_decoding_a_capacity_model_with_routing_groups_drops_the_groups():
    moe = MoEConfig(num_experts=4, hidden_dim=8, dispatch=DispatchConfig(mode="capacity", groups=4))
    cfg = for_decoding(LMConfig(vocab_size=16, d_model=8, num_heads=2, num_layers=1, moe=moe))
    assert cfg.moe.dispatch.mode == "dropless" and cfg.moe.dispatch.groups == 1


# ---- 5. prompts longer than the model's positions ------------------------------------------------------------------

def test_fit_prompts_refuses_or_truncates(caplog):
    prompts = [[1, 2, 3], list(range(10))]
    assert fit_prompts(prompts, 100, None) == prompts                   # no limit stated: nothing to check
    assert fit_prompts(prompts, 2, 12) == prompts
    with pytest.raises(ValueError, match=r"^prompts\[1\]: 10 tokens \+ max_new_tokens=4 = 14, more than the model's "
                                         r"12 positions; shorten it to 8 tokens or lower max_new_tokens to 2, or pass "
                                         r"truncate_prompts=True \(--truncate_prompts\) to keep its last 8$"):
        fit_prompts(prompts, 4, 12)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: 10 tokens \+ max_new_tokens=1 = 11, more than the model's "
                                         r"8 positions; shorten it to 7 tokens, or pass"):
        fit_prompts(prompts, 1, 8)
    with pytest.raises(ValueError, match=r"^max_new_tokens=8: leaves no room for a prompt in the model's 8 "
                                         r"positions; must be <= 7"):
        fit_prompts(prompts, 8, 8, truncate=True)
    with caplog.at_level(logging.WARNING, logger="moejax"):
        fitted = fit_prompts(prompts, 4, 12, truncate=True)
    assert fitted == [[1, 2, 3], list(range(2, 10))]
    assert [r.getMessage() for r in caplog.records] == [
        "prompts[1]: cut 2 of its 10 tokens (kept the last 8) to fit the model's 12 positions with max_new_tokens=4"]


@pytest.fixture(scope="module")
def tiny_lm() -> LanguageModel:
    """A one-block byte-level LM that says it handles 8 positions."""
    cfg = LMConfig(vocab_size=256, d_model=8, num_heads=2, num_layers=1, moe=None)
    variables = jax.jit(TransformerLM(cfg).init)(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), jax.numpy.int32))
    return LanguageModel(cfg, variables, ByteTokenizer(), None, "tiny", max_positions=8)


def test_generate_cli_refuses_a_long_prompt_unless_truncate_prompts(tiny_lm, monkeypatch, caplog, capsys):
    from moejax import generate as command
    monkeypatch.setattr(command, "load_language_model", lambda path, dtype=None: tiny_lm)
    argv = ["--model=tiny", "--prompt=abcdefghij", "--max_new_tokens=3", "--stop_token=none"]
    with pytest.raises(ValueError, match=r"^prompts\[0\]: 10 tokens \+ max_new_tokens=3 = 13, more than the model's 8 "
                                         r"positions"):
        command.run(argv)
    with caplog.at_level(logging.WARNING, logger="moejax"):
        texts = command.run(argv + ["--truncate_prompts"])
    assert "prompts[0]: cut 5 of its 10 tokens (kept the last 5)" in caplog.text
    kept = generate(tiny_lm.config, tiny_lm.variables, [list(b"fghij")], max_new_tokens=3)
    assert texts == [ByteTokenizer().decode(kept.as_lists()[0])]     # the same as giving only the last 5 tokens


def test_generate_reads_the_limit_of_a_hugging_face_directory():
    prompt = "ab " * 100                   # 202 tokens with the fixture's tokenizer; max_position_embeddings=256
    line = one_error_line(run_command("moejax.generate", f"--model={FIXTURES / 'mixtral'}", f"--prompt={prompt}",
                                      "--max_new_tokens=60"))
    assert line.startswith("error: prompts[0]: 202 tokens + max_new_tokens=60 = 262, more than the model's 256 "
                           "positions;"), line
