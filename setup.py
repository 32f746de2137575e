"""moejax: sparse Mixture-of-Experts in JAX/Flax.

One install entry for users, CI and notebooks: ``pip install -e ".[test]"``.
``kernels/`` is installed as the import path ``moejax.kernels`` (it depends on jax only).
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["moejax", "moejax.*"]) + ["moejax.kernels"]

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
        "absl-py>=1.0",
        # Data: TFDS reads array_record files without TensorFlow. TFDS 4.9.x imports importlib_resources
        # but declares it only for old Pythons (tensorflow/datasets#11212).
        "tensorflow-datasets>=4.9.4,<5",
        "array-record>=0.5",
        "importlib_resources>=5",
        "scikit-learn>=1.0",
        "scipy>=1.7",
        # Metrics: TensorBoard event files without TensorFlow; progress bar.
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        # Pretrained models (moejax.hf, moejax.generate): Hugging Face checkpoints read lazily through the numpy API
        # of safetensors; their tokenizer.json through tokenizers. Neither pulls in torch.
        "safetensors>=0.4",
        "tokenizers>=0.15",
    ],
    extras_require={
        # The maintained grouped-matmul kernels (dispatch.gmm=tokamax; auto's first choice on GPU/TPU). tokamax
        # 0.0.12 needs jax>=0.9.2 and pins typeguard==2.13.3; its qwix needs flax>=0.12.
        "tokamax": ["tokamax>=0.0.12"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            # Executing notebooks/ in tests/test_notebooks.py: a Jupyter kernel for this Python, and the plots.
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # The tokamax backend's contract tests (they skip without it); installs beside the pins above.
            "tokamax>=0.0.12",
        ],
    },
)
