"""moejax.kernels: Pallas kernels for grouped expert matmul and capacity dispatch (depends on jax only).

Installed from the top-level ``kernels/`` directory as the import path ``moejax.kernels``. The kernels
themselves arrive with the kernels issue; dispatch already takes any grouped matmul through
``moejax.dispatch.register_gmm``.
"""
__all__: list[str] = []
