import os
import pytest

# Tests run on CPU; 8 simulated devices are available for the sharding tests that need them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh TFDS data directory per test session (per xdist worker): datasets are built once into it."""
    return str(tmp_path_factory.mktemp("tfds"))
