"""Entry point: ``python -m moejax.main --config=configs/quickstart.py --workdir=/tmp/run``.

Any config field can be overridden on the command line (``--config.model.num_experts=16``), also one the
config file does not write out (``--config.model.moe.router.kind=sinkhorn``; :mod:`moejax.cli`); a config file
may take an argument after a colon (``--config=experiments/x/config.py:tiny``). A run resumes from the
newest good checkpoint in ``workdir``; SIGTERM saves a checkpoint and exits with status 143 (a second SIGTERM ends the
process at once). Errors the run can name are printed as one line with exit status 2, ``--debug`` shows their
traceback: a configuration error (a ``ValueError`` naming the field), a checkpoint of another model, a training
blow-up caught by the non-finite guard, a workdir whose checkpoints are all unusable, a checkpoint or file that cannot
be written (e.g. a full disk).

Third-party log records (JAX, TFDS, orbax: their warnings and the tracebacks they log) go to ``<workdir>/moejax.log``
with moejax's own lines, not to the console; the console shows moejax's lines and, when third-party warnings or
errors were logged, the file's path. ``--verbose`` shows everything on the console as well.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys
import threading
import traceback

from absl import app, flags
from ml_collections import config_flags

from moejax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config used.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of the errors printed as one line too.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show third-party logging (JAX, TFDS, orbax; INFO and up) on the "
                             "console too.")
flags.mark_flags_as_required(["config", "workdir"])
_OVERRIDES: list[tuple[str, str]] = []      # the --config.<path>=<value> arguments, applied by main()


def summary_lines(result: dict) -> list[str]:
    lines = [f"final step {result['step']}: eval loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}"
             + (f", perplexity {result['perplexity']:.3f}" if "perplexity" in result else "")]
    for i, (load, dropped) in enumerate(zip(result.get("expert_load", []), result.get("dropped_fraction", []))):
        loads = " ".join(f"{x:.3f}" for x in load)
        lines.append(f"layer {i}: expert load [{loads}]  dropped {dropped:.3f}")
    return lines


class _RunLog(logging.Handler):
    """Every log record, tracebacks included, appended to ``<workdir>/moejax.log`` (opened on the first record, so
    that the workdir exists by then). A record that cannot be written (a full disk) is dropped without a word: the
    log must never add its own traceback to the failure it records."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.third_party_problems = 0       # third-party WARNING and above, written here and not on the console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(self.format(record) + "\n")
            self._file.flush()
            if not _is_moejax(record) and record.levelno >= logging.WARNING:
                self.third_party_problems += 1
        except Exception:  # noqa: BLE001 - see the class doc
            pass

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        super().close()


def _is_moejax(record: logging.LogRecord) -> bool:
    return record.name == "moejax" or record.name.startswith("moejax.")


def _route_logging(workdir: str, verbose: bool) -> _RunLog:
    """moejax's INFO lines to the console; everything to ``<workdir>/moejax.log``; third-party records to the
    console only with ``--verbose`` (see the module doc)."""
    root = logging.getLogger()
    if not verbose:
        root.setLevel(logging.WARNING)
        for handler in root.handlers:     # absl's stderr handler, installed by app.run
            handler.addFilter(_is_moejax)
    logging.getLogger("moejax").setLevel(logging.INFO)
    if not verbose:
        # Tracebacks Python prints itself, outside logging: an exception in a library's thread, and one it cannot
        # raise (orbax's asyncio coroutines collected with a pending error print "Exception ignored in: ...").
        sys.unraisablehook = _log_unraisable
        threading.excepthook = _log_thread_exception
    for old in [h for h in root.handlers if isinstance(h, _RunLog)]:     # a previous run in this process
        root.removeHandler(old)
        old.close()
    run_log = _RunLog(pathlib.Path(workdir).absolute() / "moejax.log")
    root.addHandler(run_log)
    return run_log


def _log_unraisable(report) -> None:
    """``sys.unraisablehook``: the report as a log record of a third-party logger (to ``moejax.log``)."""
    exc = (report.exc_type, report.exc_value, report.exc_traceback) if report.exc_type else None
    logging.getLogger("python.unraisable").warning("%s: %r", report.err_msg or "Exception ignored in", report.object,
                                                   exc_info=exc)


def _log_thread_exception(args) -> None:
    """``threading.excepthook``: an uncaught exception of a thread as a log record (to ``moejax.log``)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("python.thread").error("uncaught exception in thread %s", name,
                                             exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _run_errors() -> tuple[type[BaseException], ...]:
    """The errors printed as one line: each names what went wrong and what to do (see the module doc)."""
    from moejax.training.checkpoint import NoUsableCheckpointError
    from moejax.training.steps import NonFiniteError
    return ValueError, NonFiniteError, NoUsableCheckpointError, OSError


def _exit(status: int) -> None:
    """Exits with ``status``. When threads of a third-party library are still running (orbax's after a failed
    save may wait on each other until its coordination timeout, an hour), the interpreter would wait for them at
    exit: then the process ends at once, after flushing, instead of hanging."""
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


def main(argv: list[str]) -> None:
    del argv
    run_log = _route_logging(_WORKDIR.value, _VERBOSE.value)
    from moejax.training import train_and_evaluate
    config = _CONFIG.value
    cli.apply_or_exit(config, _OVERRIDES)
    try:
        result = train_and_evaluate(config, _WORKDIR.value)
    except _run_errors() as e:
        if _DEBUG.value:      # the traceback, then the same exit (leftover third-party threads must not hang it)
            traceback.print_exc()
            _exit(1)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and not message.startswith("checkpoint:"):
            message = f"{type(e).__name__}: {message}"      # a file the run could not write or read
        print(f"error: {message}", file=sys.stderr)
        if run_log.third_party_problems:
            print(f"error: third-party details ({run_log.third_party_problems} warnings or errors) in {run_log.path}",
                  file=sys.stderr)
        _exit(2)
    if run_log.third_party_problems:
        print(f"moejax: {run_log.third_party_problems} third-party warnings or errors logged to {run_log.path}")
    if result["preempted"]:
        print(f"preempted at step {result['step']}: checkpoint saved in {_WORKDIR.value}")
        _exit(143)
    for line in summary_lines(result):
        print(line)


def run(argv: list[str] | None = None) -> None:
    """Parses ``argv`` (default ``sys.argv``), taking the config overrides out first, and runs :func:`main`."""
    rest, _OVERRIDES[:] = cli.split_or_exit(sys.argv if argv is None else argv)
    from moejax.training.loop import install_sigterm_handler
    install_sigterm_handler()     # a SIGTERM while the config, data or checkpoint load still leads to exit 143
    sys.argv = rest          # config_flags reads sys.argv itself for --config.* overrides of written fields
    try:
        app.run(main, argv=rest)
    finally:
        # The trainer acts on SIGTERM between steps; once it is done, SIGTERM must end the process as usual (it
        # would otherwise be recorded and ignored while the interpreter shuts down).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    run()
