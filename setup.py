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
    # moejax.aot's GPU target descriptions and the pretrained architectures it compiles (--hf=<name>).
    package_data={"moejax.aot": ["gpu_targets/*.txtpb", "hf_architectures/*.json"]},
    # Lower bounds are the oldest versions tested: what CI's first pass (Python 3.11, the README's test command)
    # installs, the newest releases for Python 3.11 on 2026-12-07 (jax 0.10.2 is the last jax for 3.11). CI's second
    # pass (.ci/run) tests the newest releases for Python 3.12 (on 2026-12-07: jax/jaxlib 0.12.1, flax 0.12.12,
    # numpy 2.5.5, tokamax 0.0.17). No upper bounds: none of these has a known break; the second pass finds one.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1",
        "numpy>=2.4",
        "absl-py>=2.3",
        # Data: TFDS reads array_record files without TensorFlow. TFDS 4.9.x imports importlib_resources
        # but declares it only for old Pythons (tensorflow/datasets#11212).
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "importlib_resources>=7",
        "scikit-learn>=1.9",
        "scipy>=1.17",
        # Metrics: TensorBoard event files without TensorFlow; progress bar.
        "tensorboardX>=2.6.5",
        "tqdm>=4.70",
        # Pretrained models (moejax.hf, moejax.generate): Hugging Face checkpoints read lazily through the numpy API
        # of safetensors; their tokenizer.json through tokenizers. Neither pulls in torch.
        "safetensors>=0.8",
        "tokenizers>=0.23",
    ],
    extras_require={
        # The maintained grouped-matmul kernels (dispatch.gmm=tokamax; auto's first choice on GPU/TPU). Tested:
        # 0.0.12 (the newest for Python 3.11) and 0.0.17 (Python 3.12), whose ragged_dot no longer wraps a lone Op
        # passed as `implementation` (moejax wraps it).
        "tokamax": ["tokamax>=0.0.12"],
        # Ahead-of-time compilation (python -m moejax.aot): libtpu compiles for TPU topologies on any x86-64 Linux
        # host (~700 MB; in the test extra so that the suite compiles every kernel for TPU). jax's CUDA plugin
        # compiles for NVIDIA GPUs without one (~5 GB: opt-in). "jax[tpu]"/"jax[cuda12]" pin the libtpu / plugin
        # release that matches the installed jax.
        "aot-gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2", "tokamax>=0.0.12"],
        "gpu": ["jax[cuda12]>=0.10.2", "tokamax>=0.0.12"],
        "test": [
            "jax[tpu]>=0.10.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "pytest>=9",
            "pytest-xdist>=3.8",
            "hypothesis>=6.150",
            "chex>=0.1.92",          # tree assertions (tests/trees.py); the library itself does not import it
            # Executing notebooks/ in tests/test_notebooks.py: a Jupyter kernel for this Python, and the plots.
            "nbclient>=0.11",
            "nbformat>=5.11",
            "ipykernel>=7.4",
            "matplotlib>=3.11",
            # The tokamax backend's contract tests (they skip without it); installs beside the pins above.
            "tokamax>=0.0.12",
        ],
    },
)
