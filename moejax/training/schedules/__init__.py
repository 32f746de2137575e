"""The built-in k schedules (:mod:`moejax.training.plugin`): importing this package registers them."""
from moejax.training.schedules import smoe_dropout  # noqa: F401
