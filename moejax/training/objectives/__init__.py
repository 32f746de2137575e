"""The built-in training objectives (:mod:`moejax.training.plugin`): importing this package registers them."""
from moejax.training.objectives import consistency, standard  # noqa: F401
