"""moejax: sparse Mixture-of-Experts in JAX/Flax.

One install entry for users, CI and notebooks: ``pip install -e ".[test]"``.
``kernels/`` is installed as the import path ``moejax.kernels`` (it depends on jax only).
"""
from setuptools import setup

PACKAGES = [
    "moejax",
    "moejax.routing",
    "moejax.experts",
    "moejax.dispatch",
    "moejax.layers",
    "moejax.kernels",
]

setup(
    name="moejax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts research code in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={"moejax": "moejax", "moejax.kernels": "kernels"},
    install_requires=[
        # Compatible ranges: jax 0.10-0.12 is what CI (PyPI) and the lent GPUs (0.11) run.
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "chex>=0.1.87,<0.2",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
        ],
    },
)
