"""MNIST-1D, generated procedurally (Greydanus 2020, "Scaling down deep learning", arXiv:2011.14439).

Ten hand-made 1-D templates of length 12 (one per digit) are each turned into 500 noisy sequences of
length 40 by: zero-padding on the right, linear resampling to 72 points, a random amplitude scale,
a random circular shift, correlated (Gaussian-smoothed) noise where the signal is exactly zero, iid
noise everywhere, a random linear shear, and linear resampling to 40 points. The 5000 sequences are
shuffled, standardised with the mean and standard deviation of the whole set, and split 4000/1000.

This module is an independent implementation of that procedure with the paper's default parameters.
It draws from ``numpy.random.RandomState(42)`` in the same order as the reference generator, so the
result matches the published ``mnist1d_data.pkl`` (checked once by hand: labels identical, values
equal to float64 rounding; see ``tests/test_data.py`` for the invariants that are tested).
``RandomState`` is used rather than ``Generator`` because its stream is frozen across NumPy versions.

Where this can differ from the reference: linear resampling uses ``numpy.interp`` instead of
``scipy.interpolate.interp1d`` (differences of order 1e-16), and the result is stored as float32
(the reference keeps float64).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter1d

# The paper's ten digit templates (values only; they are the dataset's definition).
_RAW_TEMPLATES = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)


@dataclasses.dataclass(frozen=True)
class Mnist1dArgs:
    """Generation parameters; the defaults are the paper's.

    Attributes:
      num_samples: total sequences (split into train and test), ``num_samples // 10`` per class.
      train_split: fraction of the shuffled sequences that go to train.
      template_len: length of each template.
      padding: inclusive range of the number of zeros appended before resampling.
      scale_coeff: amplitude scale is drawn from ``1 + scale_coeff * U(-0.5, 0.5)``.
      max_translation: circular shift drawn from ``{0, ..., max_translation - 1}``.
      corr_noise_scale: std of the noise (before Gaussian smoothing with sigma 2) on zero samples.
      iid_noise_scale: std of the iid noise added everywhere.
      shear_scale: slope of the shear is drawn from ``shear_scale * U(-0.5, 0.5)``.
      final_seq_length: ``L`` of the output sequences.
      seed: seed of the ``RandomState`` that drives everything.
    """

    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    final_seq_length: int = 40
    seed: int = 42


def templates() -> np.ndarray:
    """The ten templates as ``float64[10, 12]``: standardised per digit, starting at 0, divided by 6."""
    x = np.asarray(_RAW_TEMPLATES, dtype=np.float64)
    # Same operation order as the reference so the templates agree bit for bit.
    x = x - x.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of ``float64[M]`` onto ``n`` evenly spaced points spanning the same interval."""
    return np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(x)), x)


def _transform(x: np.ndarray, args: Mnist1dArgs, rng: np.random.RandomState) -> np.ndarray:
    """One noisy sequence ``float64[final_seq_length]`` from a template ``float64[template_len]``.

    The order of the ``rng`` draws is part of the dataset's definition: pad, scale, shift,
    correlated noise, iid noise, shear.
    """
    lo, hi = args.padding
    num_zeros = lo + int(rng.rand() * (hi - lo + 1))
    # The tiny offset keeps template samples that are exactly 0 out of the "no signal" mask below.
    x = np.concatenate([x + 1e-8, np.zeros(num_zeros)])
    x = _resample(x, args.template_len + hi)
    x = x * (1 + args.scale_coeff * (rng.rand() - 0.5))
    x = np.roll(x, rng.randint(0, args.max_translation))
    corr = gaussian_filter1d(args.corr_noise_scale * rng.randn(len(x)), 2.0)
    x = np.where(x != 0, x, corr)
    x = x + args.iid_noise_scale * rng.randn(len(x))
    slope = args.shear_scale * (rng.rand() - 0.5)
    x = x - slope * np.linspace(-0.5, 0.5, len(x))
    return _resample(x, args.final_seq_length)


def make_mnist1d(args: Mnist1dArgs = Mnist1dArgs()) -> dict[str, np.ndarray]:
    """Generates the dataset.

    Returns:
      ``{"x_train": float32[4000, 40], "y_train": int64[4000], "x_test": float32[1000, 40],
      "y_test": int64[1000]}`` for the default arguments; ``x`` is standardised over all sequences.
    """
    rng = np.random.RandomState(args.seed)
    tmpl = templates()
    per_class = args.num_samples // len(tmpl)
    xs = np.stack([_transform(tmpl[c], args, rng) for c in range(len(tmpl)) for _ in range(per_class)])
    ys = np.repeat(np.arange(len(tmpl)), per_class)
    order = rng.permutation(len(ys))
    xs, ys = xs[order], ys[order]
    xs = (xs - xs.mean()) / xs.std()
    cut = int(len(ys) * args.train_split)
    return {"x_train": xs[:cut].astype(np.float32), "y_train": ys[:cut].astype(np.int64),
            "x_test": xs[cut:].astype(np.float32), "y_test": ys[cut:].astype(np.int64)}
