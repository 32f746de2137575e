"""Training: optimiser, train/eval steps, orbax checkpoints, metrics and the loop behind ``moejax.main``."""
from moejax.training.checkpoint import Checkpointer
from moejax.training.config import TrainConfig, train_settings
from moejax.training.loop import NonFiniteError, evaluate, train_and_evaluate
from moejax.training.optim import make_optimizer
from moejax.training.steps import TrainState, make_eval_step, make_train_step

__all__ = ["Checkpointer", "NonFiniteError", "TrainConfig", "TrainState", "evaluate", "make_eval_step",
           "make_optimizer", "make_train_step", "train_and_evaluate", "train_settings"]
