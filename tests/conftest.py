import gc
import os
import shutil
import tempfile

import pytest

# Tests run on CPU; 8 simulated devices are available for the sharding tests that need them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One persistent XLA compilation cache per test session, shared by the xdist workers and every subprocess the tests
# start (through the environment): the same tiny models compile in many tests (the trainer's train and eval steps of
# each run and resume, the CLI and notebook subprocesses), and only the first pays. The controller (or a run without
# xdist) makes the directory before the workers start and removes it at the end; a cache directory the caller set is
# left alone. Programs that compile in under 0.3 s are not written (the disk round trip would cost as much).
_OWN_CACHE = "PYTEST_XDIST_WORKER" not in os.environ and "MOEJAX_TEST_XLA_CACHE" not in os.environ \
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["MOEJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="moejax-test-xla-cache-")
if "MOEJAX_TEST_XLA_CACHE" in os.environ:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MOEJAX_TEST_XLA_CACHE"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# Importing moejax prepares libtpu's environment (moejax.libtpu_env: no lock file between the xdist workers that compile
# for TPU, no warnings) before jax first loads it.
import moejax  # noqa: E402,F401
import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ.pop("MOEJAX_TEST_XLA_CACHE"), ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
    """Every compilation of the test reaches XLA (no persistent cache hit): for tests that count compilations."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.values["jax_enable_compilation_cache"]
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


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
