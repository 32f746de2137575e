"""The built-in auxiliary losses (:mod:`moejax.routing.loss`): importing this package registers them, in this order
(the order a router config lists them in)."""
from moejax.routing.aux_losses import load_balance, z_loss, importance, router_entropy  # noqa: F401
