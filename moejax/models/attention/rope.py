"""Rotary position embeddings (RoFormer), in the two channel layouts pretrained models use.

Shapes: ``B`` batch, ``L`` length, ``H`` heads, ``Dh`` rotated width (even).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_angles(positions: jax.Array, head_dim: int, base: float = 10000.0) -> jax.Array:
    """float32[..., Dh/2] rotation angles ``pos * base^(-2i / Dh)`` for int positions [...]."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: rotary embeddings need an even head width")
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def deinterleave(x: jax.Array) -> jax.Array:
    """x[..., Dh] with channels ``(x_0, x_1, x_2, ...)`` -> ``(x_0, x_2, ..., x_1, x_3, ...)``.

    Turns adjacent-pair rotary layout (GPT-J, DeepSeek's ``rope_interleave``) into the half-split layout of
    :func:`apply_rope`; applied to queries and keys alike it leaves every dot product unchanged.
    """
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, base: "float | Rope" = 10000.0, *,
               interleaved: bool = False) -> jax.Array:
    """Rotates x: [B, L, H, Dh] by position (GPT-NeoX half-split pairs ``(x_i, x_{i + Dh/2})``).

    ``positions``: int[L] or int[B, L]. Each pair is rotated by the angle ``pos * base^(-2i / Dh)``, so
    ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only, and norms are preserved. ``interleaved``: the
    pairs are adjacent channels ``(x_{2i}, x_{2i+1})``; the result is returned in the half-split layout (as
    Hugging Face's DeepSeek-V3 does), which queries and keys share. ``base`` may be a :class:`Rope` (scaled
    frequencies, and YaRN's factor on cos and sin). Computed in float32, returned in x's dtype.
    """
    if interleaved:
        x = deinterleave(x)
    rope = base if isinstance(base, Rope) else Rope(float(base))
    if rope.scaling is None:
        angles = rope_angles(positions, x.shape[-1], rope.base)   # [(B,) L, Dh/2]
    else:
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope.inv_freq(x.shape[-1]))
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]   # [B, L, 1, Dh/2]
    if rope.cos_sin_factor != 1.0:
        cos, sin = cos * rope.cos_sin_factor, sin * rope.cos_sin_factor
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ROPE_SCALINGS = ("linear", "yarn")


def _mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 m ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Context-extension scaling of the rotary frequencies, as pretrained checkpoints declare it.

    ``linear`` (position interpolation): every frequency divided by ``factor``. ``yarn`` (Peng et al. 2023, YaRN):
    frequencies that complete fewer than ``beta_slow`` rotations over ``original_max_position_embeddings`` are
    interpolated (divided by ``factor``), those with more than ``beta_fast`` kept, a linear ramp in between; cos and
    sin are multiplied by ``attention_factor`` (default ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
    when both are set, else ``mscale(factor)``, with ``mscale(s, m) = 0.1 m ln s + 1``). Multi-head latent attention
    also multiplies its softmax scale by ``mscale(factor, mscale_all_dim)^2`` (:meth:`Rope.softmax_factor`).
    """

    kind: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling.kind={self.kind!r}: must be one of {list(ROPE_SCALINGS)}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"rope_scaling.factor={self.factor!r}: must be a number >= 1")
        if self.kind == "yarn" and (self.original_max_position_embeddings is None
                                    or self.original_max_position_embeddings < 1):
            raise ValueError(f"rope_scaling.original_max_position_embeddings={self.original_max_position_embeddings!r}:"
                             f" yarn needs the pretraining context length (an integer >= 1)")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings: the base ``theta`` and an optional :class:`RopeScaling`."""

    base: float = 10000.0
    scaling: RopeScaling | None = None

    def inv_freq(self, dim: int) -> np.ndarray:
        """float32[dim / 2] angular frequencies per rotated pair (static: computed in numpy at trace time)."""
        if dim % 2:
            raise ValueError(f"head_dim={dim}: rotary embeddings need an even head width")
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        freq = (1.0 / np.power(np.float32(self.base), exponents)).astype(np.float32)
        s = self.scaling
        if s is None:
            return freq
        if s.kind == "linear":
            return (freq / np.float32(s.factor)).astype(np.float32)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.base))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        keep = 1 - ramp                                                  # 1: extrapolate (keep), 0: interpolate
        return (freq / np.float32(s.factor) * (1 - keep) + freq * keep).astype(np.float32)

    @property
    def cos_sin_factor(self) -> float:
        """The factor on cos and sin (YaRN's attention factor; 1 otherwise)."""
        s = self.scaling
        if s is None or s.kind != "yarn":
            return 1.0
        if s.attention_factor is not None:
            return float(s.attention_factor)
        if s.mscale and s.mscale_all_dim:
            return _mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim)
        return _mscale(s.factor)

    @property
    def softmax_factor(self) -> float:
        """DeepSeek's multi-head latent attention multiplies its softmax scale by ``mscale(factor, mscale_all_dim)^2``
        under YaRN (1 otherwise)."""
        s = self.scaling
        if s is None or s.kind != "yarn" or not s.mscale_all_dim:
            return 1.0
        return _mscale(s.factor, s.mscale_all_dim) ** 2
