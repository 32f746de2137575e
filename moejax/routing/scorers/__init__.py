"""The built-in scorers (:mod:`moejax.routing.scorer`): importing this package registers them."""
from moejax.routing.scorers import attention, linear  # noqa: F401
