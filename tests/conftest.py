import gc
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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's caches of compiled programs after every test module. Each XLA:CPU executable keeps its machine
    code in memory mappings; a test worker that keeps every program of ~600 tests alive approached the kernel's
    limit of 65,530 mappings per process (``vm.max_map_count``), and LLVM then failed inside compilation (a
    segfault while unwinding its error). Programs are rarely shared across modules, so little is recompiled."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def quick_compiles():
    """XLA with most optimisations off, for one test module (``pytestmark = pytest.mark.usefixtures(
    "quick_compiles")``): the models in end-to-end tests are tiny, so XLA's optimisation passes cost more compile
    time than they save at run time, and the numbers are the same to the tests' tolerances. Restored after the
    module, so that the kernel, benchmark and FLOP-count tests in the same worker compile as users do."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh TFDS data directory per test session (per xdist worker): datasets are built once into it."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def triton_modules(monkeypatch):
    """The Triton (tt dialect) modules that lowering for CUDA builds, as text, each checked by the MLIR verifier.

    The custom call alone does not prove the module is valid: jax 0.10.2 emitted an ``scf.for`` with an i1 bound
    for a ``where`` of two literals, which only the verifier (or Triton's compiler, on a GPU) rejects.
    """
    from jax._src.pallas.triton import pallas_call_registration as registration   # private: no public hook
    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()                # raises with the MLIR diagnostic if invalid
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return modules
