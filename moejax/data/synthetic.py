"""Array generators behind the shipped image and synthetic builders (pure NumPy, deterministic).

Every random choice comes from ``numpy.random.RandomState`` with a fixed seed: its stream is frozen
across NumPy versions, so the datasets are the same on every machine.

- :func:`digits_split`: scikit-learn's bundled 8x8 digits, split 1437/360 by a fixed permutation.
- :func:`translated_digits`: those digits pasted at random positions on a 24x24 canvas, for the
  "where/what" experiment of Eigen et al. 2013 (Learning Factored Representations in a Deep Mixture
  of Experts).
- :func:`synthetic_clusters`: a Gaussian mixture whose classes are unions of well-separated
  clusters, so that the ideal partition of the inputs among experts is known.
"""
from __future__ import annotations

import numpy as np

DIGITS_SEED = 0
DIGITS_TOTAL = 1797
DIGITS_NUM_TRAIN = 1437  # 360 test

CANVAS = 24  # translated digits: canvas side
CELL = 12  # side of a quadrant; an 8x8 digit fits at 5x5 offsets inside it
TRANSLATED_COPIES = 4  # placements per source digit
TRANSLATED_SEEDS = {"train": 1, "test": 2}

CLUSTERS_DIM = 8
CLUSTERS_NUM_CLASSES = 4
CLUSTERS_GRID = 4  # 4x4 = 16 clusters, four per class
CLUSTERS_SPACING = 4.0  # distance between neighbouring centres
CLUSTERS_STD = 0.5  # isotropic std inside a cluster
CLUSTERS_SIZES = {"train": 8192, "test": 2048}
CLUSTERS_SEEDS = {"centres": 3, "train": 4, "test": 5}


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits for ``split`` in {"train", "test"}.

    Returns:
      ``(images float32[N, 8, 8, 1] in [0, 1], labels int64[N])`` with N = 1437 (train) or 360 (test).
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: must be 'train' or 'test'")
    d = load_digits()
    order = np.random.RandomState(DIGITS_SEED).permutation(len(d.target))
    idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    images = (d.images[idx] / 16.0).astype(np.float32)[..., None]  # sklearn pixels are 0..16
    return images, d.target[idx].astype(np.int64)


def translated_digits(split: str) -> dict[str, np.ndarray]:
    """Digits of ``split`` pasted at random positions on a ``CANVAS x CANVAS`` canvas.

    Each source digit is placed ``TRANSLATED_COPIES`` times. A placement picks one of the four
    quadrants uniformly (the coarse "where", ``position_class`` = 2 * quadrant_row + quadrant_col)
    and then a uniform offset in ``{0..4}^2`` inside it, so a digit never straddles quadrants.

    Returns:
      ``{"image": float32[N, 24, 24, 1], "label": int64[N], "position": int32[N, 2] (row, col of the
      digit's top-left pixel), "position_class": int64[N]}`` with N = 4 * 1437 or 4 * 360.
    """
    digits, labels = digits_split(split)
    rng = np.random.RandomState(TRANSLATED_SEEDS[split])
    n = len(labels) * TRANSLATED_COPIES
    quadrant = rng.randint(0, 4, size=n)
    offset = rng.randint(0, CELL - 8 + 1, size=(n, 2))
    position = (np.stack([quadrant // 2, quadrant % 2], axis=1) * CELL + offset).astype(np.int32)
    source = np.repeat(np.arange(len(labels)), TRANSLATED_COPIES)
    images = np.zeros((n, CANVAS, CANVAS, 1), np.float32)
    for i, (r, c) in enumerate(position):
        images[i, r:r + 8, c:c + 8] = digits[source[i]]
    return {"image": images, "label": labels[source], "position": position,
            "position_class": quadrant.astype(np.int64)}


def cluster_centres() -> np.ndarray:
    """Centres ``float64[16, CLUSTERS_DIM]``: a 4x4 grid with spacing ``CLUSTERS_SPACING`` in a 2-D plane.

    The plane is spanned by two fixed random orthonormal directions, so no input coordinate is
    special. Cluster ``j`` sits at grid cell ``(j // 4, j % 4)``.
    """
    cells = np.stack(np.divmod(np.arange(CLUSTERS_GRID ** 2), CLUSTERS_GRID), axis=1)
    plane = (cells - (CLUSTERS_GRID - 1) / 2) * CLUSTERS_SPACING
    basis, _ = np.linalg.qr(np.random.RandomState(CLUSTERS_SEEDS["centres"]).randn(CLUSTERS_DIM, 2))
    return plane @ basis.T


def cluster_labels() -> np.ndarray:
    """``int64[16]``: the class of each cluster, ``(row + 2 * col) % 4`` of its grid cell.

    Every class owns four cells, neighbouring cells always have different classes, and no linear
    map separates the classes, so a model must in effect find the clusters.
    """
    row, col = np.divmod(np.arange(CLUSTERS_GRID ** 2), CLUSTERS_GRID)
    return (row + 2 * col) % CLUSTERS_NUM_CLASSES


def synthetic_clusters(split: str) -> dict[str, np.ndarray]:
    """Samples of the cluster mixture for ``split`` in {"train", "test"} (same centres, other draws).

    Clusters are equally likely; ``x = centre[cluster] + CLUSTERS_STD * N(0, I)`` in all
    ``CLUSTERS_DIM`` dimensions. Neighbouring centres are ``CLUSTERS_SPACING / CLUSTERS_STD = 8``
    standard deviations apart, so the cluster (and hence the label) is recoverable from ``x``.

    Returns:
      ``{"x": float32[N, 8], "label": int64[N], "cluster": int64[N]}``, N = 8192 (train) or 2048 (test).
    """
    rng = np.random.RandomState(CLUSTERS_SEEDS[split])
    n = CLUSTERS_SIZES[split]
    cluster = rng.randint(0, CLUSTERS_GRID ** 2, size=n)
    x = cluster_centres()[cluster] + CLUSTERS_STD * rng.randn(n, CLUSTERS_DIM)
    return {"x": x.astype(np.float32), "label": cluster_labels()[cluster], "cluster": cluster.astype(np.int64)}
