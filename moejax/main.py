"""Entry point: ``python -m moejax.main --config=configs/quickstart.py --workdir=/tmp/run``.

Any config field can be overridden on the command line (``--config.model.num_experts=16``), also one the
config file does not write out (``--config.model.moe.router.kind=sinkhorn``; :mod:`moejax.cli`); a config file
may take an argument after a colon (``--config=experiments/x/config.py:tiny``). A run resumes from the
newest good checkpoint in ``workdir``; SIGTERM saves a checkpoint and exits with status 143. A configuration error
(a ``ValueError``: one line naming the field) is printed as that one line with exit status 2; ``--debug`` shows its
traceback.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from moejax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config used.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of configuration errors (ValueError) too.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show third-party INFO logging (JAX, TFDS, orbax) too.")
flags.mark_flags_as_required(["config", "workdir"])
_OVERRIDES: list[tuple[str, str]] = []      # the --config.<path>=<value> arguments, applied by main()


def summary_lines(result: dict) -> list[str]:
    lines = [f"final step {result['step']}: eval loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}"
             + (f", perplexity {result['perplexity']:.3f}" if "perplexity" in result else "")]
    for i, (load, dropped) in enumerate(zip(result.get("expert_load", []), result.get("dropped_fraction", []))):
        loads = " ".join(f"{x:.3f}" for x in load)
        lines.append(f"layer {i}: expert load [{loads}]  dropped {dropped:.3f}")
    return lines


def main(argv: list[str]) -> None:
    del argv
    if not _VERBOSE.value:      # third-party INFO off; moejax's own INFO lines stay
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("moejax").setLevel(logging.INFO)
    from moejax.training import train_and_evaluate
    config = _CONFIG.value
    try:
        cli.apply_overrides(config, _OVERRIDES)
    except ValueError as e:
        print(f"error: --config.{e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = train_and_evaluate(config, _WORKDIR.value)
    except ValueError as e:     # a config error (one line naming the field), a checkpoint of another model, ...
        if _DEBUG.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result["preempted"]:
        print(f"preempted at step {result['step']}: checkpoint saved in {_WORKDIR.value}")
        sys.exit(143)
    for line in summary_lines(result):
        print(line)


def run(argv: list[str] | None = None) -> None:
    """Parses ``argv`` (default ``sys.argv``), taking the config overrides out first, and runs :func:`main`."""
    try:
        rest, overrides = cli.split_overrides(sys.argv if argv is None else argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _OVERRIDES[:] = overrides
    from moejax.training.loop import install_sigterm_handler
    install_sigterm_handler()     # a SIGTERM while the config, data or checkpoint load still leads to exit 143
    sys.argv = rest          # config_flags reads sys.argv itself for --config.* overrides of written fields
    app.run(main, argv=rest)


if __name__ == "__main__":
    run()
