"""How ``python -m moejax.main`` fails (issue 28): a checkpoint directory that stops accepting writes ends the run in
one line, without hanging, with the last good checkpoint intact; the errors a run can name (a training blow-up, no
usable checkpoint) are one line with exit status 2 (``--debug`` for the traceback); third-party tracebacks go to
``<workdir>/moejax.log``, not the console; SIGTERM always ends the process.

Command-line runs are subprocesses bounded in time: a hang fails the test with what the process printed, it never
stalls the suite. They run the tiny quickstart model on one device, with XLA's optimisations off.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.training import checkpoint as checkpoint_lib
from moejax.training.checkpoint import Checkpointer, CheckpointWriteError, read_checkpoint
from test_trainer_safety import data_file, ruin
from test_training import _main_cmd

TIMEOUT = 300          # seconds: a run that needs longer hangs (a run takes 10-40 s on a loaded 2-core machine)


def _env() -> dict[str, str]:
    # Every run compiles the same tiny programs: the session's compilation cache (tests/conftest.py) keeps them all,
    # however quick, so that only the first run of a worker compiles.
    return dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", XLA_FLAGS="", JAX_PLATFORMS="cpu",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _main(workdir, data_dir, *overrides, prelude: str = "", debug: bool = False) -> subprocess.CompletedProcess:
    """``python -m moejax.main`` on the tiny quickstart (8 steps, checkpoints every 2), after ``prelude`` (Python run
    first in the same process: the failing-filesystem stand-ins)."""
    argv = _main_cmd(workdir, data_dir, "--config.train.steps=8", "--config.train.checkpoint_every=2",
                     "--config.train.keep_checkpoints=4", "--config.train.log_every=2", "--config.train.eval_every=1000",
                     "--config.mesh.num_devices=1", *overrides, *(["--debug"] if debug else []))[3:]
    code = prelude + textwrap.dedent(f"""
        import sys
        from moejax.main import run
        run({["moejax.main", *argv]!r})
    """)
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                              env=_env())
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the run hung (killed after {TIMEOUT} s); it printed:\n{err.stdout}\n{err.stderr}")


def _third_party_lines(stderr: str) -> list[str]:
    """Log lines of other libraries on the console (absl's format: ``E1207 12:00:00.000 123 file.py:1] ...``),
    and any line of a traceback."""
    return [line for line in stderr.splitlines()
            if re.match(r"^[IWEF]\d{4} ", line) and "] moejax: " not in line or line.startswith(("  File ", "Traceback"))]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's ``error:`` line, after checking that stderr holds no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    return errors[0]


# Makes orbax's background save fail for every step after the first, as a directory made unwritable mid-run does
# (the write-probe file still succeeds: the failure must be caught on orbax's side too).
_FAIL_ORBAX_WRITES_AFTER_STEP_2 = textwrap.dedent("""
    import os
    _makedirs = os.makedirs
    def _failing(path, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in str(path) and "/2.orbax-checkpoint-tmp" not in str(path):
            raise PermissionError(1, "Operation not permitted (test stand-in)", str(path))
        return _makedirs(path, *args, **kwargs)
    os.makedirs = _failing
""")


def test_a_checkpoint_directory_that_stops_accepting_writes_ends_the_run_in_one_line(tmp_path, data_dir):
    # Before: orbax's background save failed, training went on, and the next save deadlocked (SIGTERM ignored).
    proc = _main(tmp_path, data_dir, prelude=_FAIL_ORBAX_WRITES_AFTER_STEP_2)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert line.startswith(f"error: checkpoint: could not write step 4 to {tmp_path / 'checkpoints'} (PermissionError"), line
    assert line.endswith("last good checkpoint: step 2"), line
    assert not _third_party_lines(proc.stderr), proc.stderr            # orbax's tracebacks are in moejax.log
    assert "PermissionError" in (tmp_path / "moejax.log").read_text()
    assert str(tmp_path / "moejax.log") in proc.stderr
    tree, step = read_checkpoint(tmp_path)                              # intact, checksums verified
    assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in np.asarray(tree["step"]).reshape(-1))


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, data_dir):
    # Stand-in for ENOSPC at the metrics file (452 console lines before): the error names the errno and the file.
    prelude = textwrap.dedent("""
        import errno, os
        from moejax.training import metrics
        _write = metrics.MetricWriter.write
        def _full(self, step, split, record):
            if step >= 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return _write(self, step, split, record)
        metrics.MetricWriter.write = _full
    """)
    proc = _main(tmp_path, data_dir, prelude=prelude)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert line == f"error: OSError: [Errno 28] No space left on device: '{tmp_path / 'metrics.jsonl'}'", line
    assert read_checkpoint(tmp_path)[1] == 2


def _tree():
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(1)}


def test_an_unwritable_checkpoint_directory_is_found_before_orbax_starts(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, _tree())
    ckpt.wait()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied (test stand-in)")

    monkeypatch.setattr(checkpoint_lib.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(CheckpointWriteError, match=r"^checkpoint: could not write step 2 to .*checkpoints "
                                                   r"\(PermissionError: .*\); last good checkpoint: step 1$"):
        ckpt.save(2, _tree())
    with pytest.raises(CheckpointWriteError, match="step 2"):      # no further save is tried
        ckpt.save(3, _tree())
    ckpt.close()                                                     # returns: nothing of orbax's is waited for
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_an_immutable_checkpoint_directory(tmp_path):
    # The probe's case on a real filesystem: chattr +i (root on ext4/xfs; elsewhere the test has nothing to run).
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, _tree())
    ckpt.wait()
    directory = tmp_path / "checkpoints"
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)],
                                                         capture_output=True).returncode != 0:
        ckpt.close()
        pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag)")
    try:
        with pytest.raises(CheckpointWriteError, match=r"could not write step 2 .*last good checkpoint: step 1$"):
            ckpt.save(2, _tree())
        ckpt.close()
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    assert read_checkpoint(tmp_path)[1] == 1


# What libraries print outside logging, during the run: an exception Python cannot raise (orbax's asyncio coroutines
# collected with a pending error print "Exception ignored in: ...") and one in a library's thread.
_PYTHON_PRINTED_TRACEBACKS = textwrap.dedent("""
    import threading
    from moejax.training import metrics
    class _Doomed:
        def __del__(self):
            raise RuntimeError("unraisable (test stand-in)")
    def _fail_in_thread():
        raise RuntimeError("thread (test stand-in)")
    _init = metrics.MetricWriter.__init__
    def _init_and_litter(self, *args, **kwargs):      # once the run has started, before its first step
        _Doomed()
        thread = threading.Thread(target=_fail_in_thread, name="library-thread")
        thread.start()
        thread.join()
        _init(self, *args, **kwargs)
    metrics.MetricWriter.__init__ = _init_and_litter
""")


def test_a_training_blow_up_is_one_line_and_python_printed_tracebacks_go_to_the_log(tmp_path, data_dir):
    proc = _main(tmp_path, data_dir, "--config.optimizer.learning_rate=1e30", prelude=_PYTHON_PRINTED_TRACEBACKS)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert "the update was not applied and the run stops" in line and "Last good checkpoint" in line, line
    assert "Exception ignored" not in proc.stderr and "stand-in" not in proc.stderr, proc.stderr
    log = (tmp_path / "moejax.log").read_text()
    assert "unraisable (test stand-in)" in log and "uncaught exception in thread library-thread" in log


def test_no_usable_checkpoint_and_a_truncated_checkpoint_on_the_console(tmp_path, data_dir):
    assert _main(tmp_path, data_dir).returncode == 0
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [2, 4, 6, 8]
    # A truncated array file in the newest step: moved aside, the run resumes from step 6 and finishes. The console
    # gets moejax's lines and the log file's path, not the third-party tracebacks of the failed read.
    newest = data_file(tmp_path / "checkpoints" / "8")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = _main(tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "checkpoint at step 8 could not be restored" in proc.stderr
    assert not _third_party_lines(proc.stderr), proc.stderr
    # Every checkpoint unusable: one line, exit 2, and no fresh start.
    for step in (2, 4, 6, 8):
        ruin(tmp_path / "checkpoints" / str(step))
    proc = _main(tmp_path, data_dir)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert "could not be used" in line and "Not starting over at step 0" in line, line
    proc = _main(tmp_path, data_dir, debug=True)                    # --debug: the traceback
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "NoUsableCheckpointError" in proc.stderr


def test_a_second_sigterm_ends_the_process_at_once():
    # The trainer's handler only records the first SIGTERM (it checkpoints between steps); when a step or a save
    # never returns, the second one must still end the process.
    code = textwrap.dedent("""
        import os, signal, time
        from moejax.training.loop import install_sigterm_handler
        assert install_sigterm_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        print("first recorded", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        print("still alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "first recorded\n", (proc.returncode, proc.stdout)
