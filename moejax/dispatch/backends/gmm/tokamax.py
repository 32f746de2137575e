"""``dispatch.gmm=tokamax``: ``tokamax.ragged_dot`` of openxla/tokamax, the maintained Pallas kernel library (optional:
``pip install -e ".[tokamax]"``; ``auto``'s first choice on GPU and TPU when it imports).

What runs: tokamax picks its own implementation per call, in its order ``mosaic`` (Mosaic GPU kernels on sm90/sm100,
the Megablox-derived Mosaic TPU kernel on TPU v5+), then ``triton`` (Pallas Triton, any CUDA GPU), then ``xla``
(``jax.lax.ragged_dot_general``); a kernel that cannot take a call (dtype, shape, architecture) raises
``NotImplementedError`` at trace time and the next one is tried. Its VJP is tokamax's own (the same kernels for the
input and the weight gradients), wrapped so that rows past all groups are zero (:func:`gmm_tokamax`). On CPU only
``xla`` applies: correct, but a dense product over all experts there, so ``auto`` never picks it on CPU.
``gmm_tokamax(..., implementation=...)`` forces one implementation (what ``benchmarks/accelerator_check.py``
measures one by one). On a GPU, left to itself, it is given only ``mosaic`` and ``triton``: never the ``xla``
fallback, which is a dense product over all experts there; a call neither kernel takes runs moejax's own Pallas
Triton kernel instead, with a warning.

tokamax decides which kernels it may use from the *host's* jax backend, not from the program's target: compiling
for an H100 from a CPU host (``moejax.aot``), its GPU kernels raise "Not supported on cpu" and only the dense XLA
fallback is left (found with ``moejax.aot``, tokamax 0.0.12). So on such a host this backend does not offer the
``gpu`` platform: ``auto`` goes on to ``pallas_triton`` and ``dispatch.gmm=tokamax`` is a one-line error.

The Mosaic TPU kernel needs the row count to be a multiple of its row tile (128 unless tokamax's tuned table says
otherwise for that exact shape, and those shapes are multiples of 1024), so on TPU the rows are padded to a multiple
of 128; the padded rows belong to no group and are sliced off. Without that, tokamax would silently fall back to XLA
for most row counts.

Why ``auto`` tries tokamax first on GPU and TPU, before moejax's own Pallas kernels and ``jax.lax.ragged_dot`` (the
evidence, read 2026-12; re-decide from ``benchmarks/accelerator_check.py``'s results when an accelerator is lent):

* GPU, ``jax.lax.ragged_dot``: on current JAX/XLA (jaxlib 0.10.1 and 0.10.2, and NVIDIA's JAX 26.05 container) it
  is lowered to a dense product over all experts on NVIDIA GPUs: 22.6-25.9 TFLOP/s against ~1,500 for a grouped
  GEMM on a B200 (https://github.com/marin-community/marin/issues/7012); on H100 with JAX 0.9.x its backward
  needed ~54 GiB of compile temporaries against ~7 GiB with Pallas Triton kernels, and a Grug MoE train step ran
  3.1x faster with Triton kernels (derived from tokamax's) for forward, ``dlhs`` and ``drhs``
  (https://github.com/marin-community/marin/pull/5350, issue #5394); the forward alone ran 5.2x faster on one
  H100, 78% against 15% MFU (https://github.com/marin-community/marin/pull/4297). XLA's own Triton ragged-dot
  emitter is still behind a flag that defaults to off (https://github.com/openxla/xla/pull/46000).
* GPU, tokamax: ``tokamax/_src/ops/ragged_dot/api.py`` orders Mosaic GPU (``pallas_mosaic_gpu_kernel_sm90.py``,
  ``..._sm100.py``) before Triton before XLA; its benchmark specs include exactly the issue's shapes families
  (``arg_specs.py``: Mixtral 8x7B ``8 x 4096 x 14336``, DeepSeek-V3 ``256 x 7168 x 2048``). tokamax publishes no
  GPU numbers in the repository (``docs/benchmarking.md`` describes the method, not results), hence the check.
* TPU: MaxText's dropless MoE runs ``tokamax.ragged_dot(..., implementation="mosaic")`` under
  ``use_tokamax_gmm`` ("Recommended for dropless configurations", ``docs/reference/core_concepts/
  moe_configuration.md``; ``src/maxtext/layers/moe.py``; MaxText validates it as TPU-only,
  ``src/maxtext/configs/pyconfig_deprecated.py``), the maintained successor of MaxText's Megablox kernel; the Mosaic
  TPU kernel ships tuned tiles for DeepSeek-V3 shapes (``pallas_mosaic_tpu.py``, ``GMM_TILING_TUNED_LUT``).
  ``jax.lax.ragged_dot`` remains MaxText's fallback, so it stays next in ``auto``'s order here.
* moejax's own Pallas kernels (``pallas_triton``, ``pallas_mosaic``) have been compiled for H100 and TPU v4-v6e
  (``moejax.aot``, ``tests/test_aot.py``) but never run on an accelerator, and their tiles are untuned.
  ``pallas_triton`` still comes before ``ragged_dot`` on GPU: XLA lowers ``ragged_dot`` to a dense product over all
  experts on NVIDIA (marin-community/marin#7012), E times the routed work, which no untuned kernel loses to.

So ``auto`` on GPU is ``tokamax`` (when it imports) -> ``pallas_triton`` -> ``blocked``, on TPU ``tokamax`` ->
``ragged_dot`` -> ``blocked``; on CPU it is unchanged.

Tests (``tests/test_gmm_backends.py``): the contract (``tests/gmm_contract.py``) through tokamax's XLA path on CPU,
and the forward of its Mosaic TPU kernel in JAX's TPU interpret mode (tokamax gates that kernel to TPU devices, and
its ``optimize_remat`` VJP cannot differentiate the interpreter's callbacks, so the kernels' gradients are left to
``benchmarks/accelerator_check.py`` on a device).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.dispatch.backends.gmm.base import GmmBackend, register_gmm_backend
from moejax.dispatch.backends.registry import ANY, current_platform
from moejax.dispatch.gmm_args import check_gmm_args

log = logging.getLogger("moejax")
INSTALL_HINT = "pip install -e \".[tokamax]\""
# The Mosaic TPU kernel's default row tile: on TPU the rows are padded to a multiple of it.
ROW_MULTIPLE = 128


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """None when tokamax imports here, else why not (one line). Imported on first use: ~2 s, so never at
    ``import moejax``."""
    try:
        _tokamax()
    except Exception as err:           # ImportError, or tokamax failing against this jax
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _tokamax() -> Any:
    """The tokamax module. tokamax reads absl flags of its own and, when the program has not parsed absl flags,
    parses ``sys.argv`` itself, failing on any other program's options (``--smoke``, pytest's): mark the flags
    parsed first, so that tokamax's keep their defaults (a later ``absl.app.run`` still parses the command line)."""
    from absl import flags
    import tokamax
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def available() -> bool:
    """Whether ``dispatch.gmm=tokamax`` can run here (tokamax imports)."""
    return import_error() is None


# tokamax's GPU kernels, in its own order; its "xla" implementation is left out on purpose (see gmm_tokamax).
GPU_KERNELS = ("mosaic", "triton")


def _zero_rows_past(x: jax.Array, total: jax.Array) -> jax.Array:
    """x[M, ...] with rows ``>= total`` set to zero."""
    keep = jnp.arange(x.shape[0]) < total
    return jnp.where(keep.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros((), x.dtype))


def _ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, implementation: Any) -> jax.Array:
    # 16-bit operands at DEFAULT precision: otherwise tokamax's Mosaic TPU kernel takes jax's default matmul precision
    # config, and under "highest" Mosaic refuses a bf16 matmul at fp32 contract precision ("Bad lhs type"; found
    # compiling for TPU v5e/v5p with moejax.aot, tokamax 0.0.12, jax 0.10.2). 32-bit operands keep the config's.
    precision = jax.lax.Precision.DEFAULT if jnp.dtype(lhs.dtype).itemsize < 4 else None
    return _tokamax().ragged_dot(lhs, rhs, group_sizes, precision=precision, preferred_element_type=lhs.dtype,
                                 implementation=implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _masked_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, implementation: Any) -> jax.Array:
    """tokamax's ragged dot with rows past all groups zeroed, in the value and in ``lhs``'s gradient."""
    return _zero_rows_past(_ragged_dot(lhs, rhs, group_sizes, implementation), jnp.sum(group_sizes))


def _masked_fwd(lhs, rhs, group_sizes, implementation):
    # tokamax's own VJP (its kernels for both gradients), kept as the residual.
    out, vjp = jax.vjp(lambda a, b: _ragged_dot(a, b, group_sizes, implementation), lhs, rhs)
    total = jnp.sum(group_sizes)
    return _zero_rows_past(out, total), (vjp, total, group_sizes)


def _masked_bwd(implementation, res, d_out):
    vjp, total, group_sizes = res
    d_lhs, d_rhs = vjp(_zero_rows_past(d_out, total))
    return _zero_rows_past(d_lhs, total), d_rhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_masked_ragged_dot.defvjp(_masked_fwd, _masked_bwd)


def gmm_tokamax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, implementation: Any = None) -> jax.Array:
    """``tokamax.ragged_dot(lhs[M, K], rhs[E, K, N], group_sizes[E]) -> [M, N]`` in ``lhs``'s dtype (every tokamax
    implementation accumulates in float32).

    implementation: tokamax's (None: its own order, see the module docstring; ``"mosaic"``, ``"triton"``, ``"xla"``,
    an ``Op`` instance, or a sequence of them tried in order).

    Rows at or past ``sum(group_sizes)``, and their input gradients, are set to zero here: tokamax's Mosaic TPU
    kernel never writes them (they come out as whatever the buffer held; NaN in the TPU interpreter), and nothing in
    tokamax promises otherwise for the GPU kernels. Dropless dispatch has such rows when slots are invalid
    (dynamic k, zero-computation experts); a NaN there would survive the zero combine weight.
    """
    m, _, _, n = check_gmm_args(lhs, rhs, group_sizes)
    if m == 0:
        return jnp.zeros((0, n), lhs.dtype)
    x = lhs
    platform = current_platform()
    if platform == "tpu" and m % ROW_MULTIPLE:
        x = jnp.pad(lhs, ((0, -m % ROW_MULTIPLE), (0, 0)))
    if platform == "gpu" and implementation is None:
        # Never tokamax's XLA fallback on a GPU: jax.lax.ragged_dot, a dense product over all experts there. When
        # neither of its GPU kernels takes the call (dtype, shape), moejax's own Triton kernel does.
        try:
            out = _masked_ragged_dot(x, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), GPU_KERNELS)
        except NotImplementedError as err:
            log.warning("moejax: tokamax has no GPU kernel for lhs %s %s, rhs %s (%s); using pallas_triton",
                        lhs.shape, lhs.dtype, rhs.shape, str(err).splitlines()[0] if str(err) else "")
            from moejax.kernels import gmm_gpu
            return gmm_gpu(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32))
    else:
        out = _masked_ragged_dot(x, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), _hashable(implementation))
    return out[:m] if out.shape[0] != m else out


def _hashable(implementation: Any) -> Any:
    """``implementation`` as tokamax takes it and as a static argument of the custom VJP must be (hashable): None and a
    name as given, a sequence as a tuple, one ``Op`` instance as a 1-tuple (tokamax 0.0.17 iterates over anything that
    is not a name; 0.0.12 wrapped a lone instance itself)."""
    if implementation is None or isinstance(implementation, str):
        return implementation
    if isinstance(implementation, (list, tuple)):
        return tuple(implementation)
    return (implementation,)


@dataclasses.dataclass(frozen=True)
class TokamaxBackend(GmmBackend):
    """A grouped matmul backend that exists only when its optional library imports: elsewhere it supports no
    platform, so ``auto`` passes over it and ``dispatch.gmm=tokamax`` is a one-line error saying how to install."""

    def supports(self, platform: str) -> bool:
        return available() and super().supports(platform) and (platform != "gpu" or host_is_gpu())

    def where(self) -> str:
        if not available():
            return f"an install with the optional package tokamax ({INSTALL_HINT}; here {import_error()})"
        if not host_is_gpu():
            return ("tpu, or gpu from a host whose jax backend is a GPU (tokamax picks its GPU kernels from "
                    "jax.default_backend(): compiled for a GPU from this host it could only emit its XLA fallback, "
                    "a dense product over all experts)")
        return super().where()


def host_is_gpu() -> bool:
    """Whether this process's default jax backend is a GPU: tokamax's GPU kernels refuse ("Not supported on cpu")
    anywhere else, even when the program is compiled for a GPU (``moejax.aot`` from a CPU host; tokamax 0.0.12)."""
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


BACKEND = register_gmm_backend(TokamaxBackend("tokamax", gmm_tokamax, platforms=(ANY,), kernel="tokamax kernels"),
                               prefer_for=("gpu", "tpu"))
