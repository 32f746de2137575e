"""TFDS builders that moejax ships: no network, fixed content, array_record files.

Each builder is a thin wrapper around a deterministic generator in :mod:`moejax.data.synthetic`,
:mod:`moejax.data.mnist1d` or :mod:`moejax.data.stdlib_corpus`. Examples are written in generation
order (``disable_shuffling=True``), so index ``i`` of a split is the ``i``-th generated example.
Importing this module registers the builders with TFDS under their snake-case names
(``moejax_digits``, ...). Prepare them through :func:`moejax.data.prepare`, which adds a file lock.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import mnist1d, stdlib_corpus, synthetic

_V1 = tfds.core.Version("1.0.0")
_NOTES = {"1.0.0": "Initial release."}
_Examples = Iterator[tuple[int, dict[str, Any]]]


def _rows(columns: dict[str, np.ndarray]) -> _Examples:
    """Yields ``(i, {name: column[i]})`` for columns of equal length."""
    n = len(next(iter(columns.values())))
    for i in range(n):
        yield i, {k: v[i] for k, v in columns.items()}


def _info(builder: tfds.core.DatasetBuilder, description: str, features: dict[str, Any],
          supervised: tuple[str, str] | None, metadata: dict[str, Any] | None = None,
          homepage: str | None = None, citation: str | None = None) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=builder, description=description, features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised, disable_shuffling=True, homepage=homepage, citation=citation,
        metadata=tfds.core.MetadataDict(metadata or {}))


class _ShippedBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the shipped builders (abstract, so TFDS does not register it)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks next to a builder's code for download checksums; these builders download
        # nothing. Skipping the lookup also avoids TFDS 4.9's unconditional use of the
        # `importlib_resources` backport for builders defined inside a package.
        return None


class MoejaxDigits(_ShippedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits; splits train 1437 / test 360."""

    VERSION = _V1
    RELEASE_NOTES = _NOTES

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            "scikit-learn's bundled 8x8 digits (UCI optdigits test set, 1797 images), pixels scaled "
            "from 0..16 to [0, 1]; split 1437/360 by a RandomState(0) permutation.",
            {"image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
             "label": tfds.features.ClassLabel(num_classes=10)},
            ("image", "label"), homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html")

    def _split_generators(self, dl_manager: Any) -> dict[str, _Examples]:
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str) -> _Examples:
        images, labels = synthetic.digits_split(split)
        yield from _rows({"image": images, "label": labels})


class MoejaxMnist1d(_ShippedBuilder):
    """MNIST-1D with the paper's default parameters; ``x`` is float32[40, 1] (length, channel)."""

    VERSION = _V1
    RELEASE_NOTES = _NOTES

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            "MNIST-1D (Greydanus 2020) generated procedurally with the reference defaults "
            "(5000 sequences, 4000 train / 1000 test, length 40, seed 42). x is float32[40, 1], "
            "standardised over the whole set.",
            {"x": tfds.features.Tensor(shape=(40, 1), dtype=np.float32),
             "label": tfds.features.ClassLabel(num_classes=10)},
            ("x", "label"), homepage="https://github.com/greydanus/mnist1d",
            citation="Greydanus, S. Scaling down deep learning. arXiv:2011.14439, 2020.")

    def _split_generators(self, dl_manager: Any) -> dict[str, _Examples]:
        data = mnist1d.make_mnist1d()
        return {s: self._generate_examples(data[f"x_{s}"][..., None], data[f"y_{s}"]) for s in ("train", "test")}

    def _generate_examples(self, x: np.ndarray, y: np.ndarray) -> _Examples:
        yield from _rows({"x": x, "label": y})


class MoejaxSyntheticClusters(_ShippedBuilder):
    """Four classes, each the union of four Gaussian clusters on a grid; ``cluster`` is kept for analysis."""

    VERSION = _V1
    RELEASE_NOTES = _NOTES

    def _info(self) -> tfds.core.DatasetInfo:
        s = synthetic
        return _info(
            self,
            f"Gaussian mixture: {s.CLUSTERS_GRID ** 2} clusters (std {s.CLUSTERS_STD}) on a 4x4 grid "
            f"(spacing {s.CLUSTERS_SPACING}) in a random 2-D plane of R^{s.CLUSTERS_DIM}; cluster j has "
            f"class cluster_labels()[j] (four clusters per class, not linearly separable). "
            f"Splits: train {s.CLUSTERS_SIZES['train']}, test {s.CLUSTERS_SIZES['test']}.",
            {"x": tfds.features.Tensor(shape=(s.CLUSTERS_DIM,), dtype=np.float32),
             "label": tfds.features.ClassLabel(num_classes=s.CLUSTERS_NUM_CLASSES),
             "cluster": tfds.features.ClassLabel(num_classes=s.CLUSTERS_GRID ** 2)},
            ("x", "label"),
            metadata={"cluster_labels": s.cluster_labels().tolist(),
                      "cluster_centres": s.cluster_centres().tolist()})

    def _split_generators(self, dl_manager: Any) -> dict[str, _Examples]:
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str) -> _Examples:
        yield from _rows(synthetic.synthetic_clusters(split))


class MoejaxTranslatedDigits(_ShippedBuilder):
    """sklearn digits pasted at random positions on a 24x24 canvas (where/what task)."""

    VERSION = _V1
    RELEASE_NOTES = _NOTES

    def _info(self) -> tfds.core.DatasetInfo:
        s = synthetic
        return _info(
            self,
            f"Each digit of moejax_digits' split pasted {s.TRANSLATED_COPIES} times on a "
            f"{s.CANVAS}x{s.CANVAS} zero canvas: a uniform quadrant (position_class = 2*row + col of "
            f"the quadrant) and a uniform offset in 0..4 inside it. position is the (row, col) of the "
            f"digit's top-left pixel. Splits: train {s.TRANSLATED_COPIES * s.DIGITS_NUM_TRAIN}, "
            f"test {s.TRANSLATED_COPIES * (s.DIGITS_TOTAL - s.DIGITS_NUM_TRAIN)}.",
            {"image": tfds.features.Tensor(shape=(s.CANVAS, s.CANVAS, 1), dtype=np.float32),
             "label": tfds.features.ClassLabel(num_classes=10),
             "position": tfds.features.Tensor(shape=(2,), dtype=np.int32),
             "position_class": tfds.features.ClassLabel(num_classes=4)},
            ("image", "label"))

    def _split_generators(self, dl_manager: Any) -> dict[str, _Examples]:
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str) -> _Examples:
        yield from _rows(synthetic.translated_digits(split))


class MoejaxStdlibBytes(_ShippedBuilder):
    """The Python standard library's ``.py`` files, one example per file; train / validation by file."""

    VERSION = _V1
    RELEASE_NOTES = _NOTES
    # One config per interpreter version: the corpus differs between them, so they must not share files.
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name=stdlib_corpus.python_tag(), description=f"Python {sys.version.split()[0]} standard library")]

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            f"Raw bytes of the .py files under {stdlib_corpus.stdlib_root()} (Python {sys.version}), "
            "sorted by relative path, without site-packages, test suites, config-* and _sysconfigdata*. "
            f"About {stdlib_corpus.VALIDATION_PERCENT}% of files go to 'validation' by a SHA-256 of "
            "the relative path. text is the file's bytes (not decoded), path its relative path.",
            {"text": tfds.features.Text(), "path": tfds.features.Text()},
            None,
            metadata={"python_version": sys.version, "stdlib_root": str(stdlib_corpus.stdlib_root())})

    def _split_generators(self, dl_manager: Any) -> dict[str, _Examples]:
        # Saved with the dataset: tells whether two machines built the same corpus.
        self.info.metadata["fingerprint_sha256"] = stdlib_corpus.corpus_fingerprint()
        return {s: self._generate_examples(s) for s in ("train", "validation")}

    def _generate_examples(self, split: str) -> _Examples:
        for i, (path, data) in enumerate(stdlib_corpus.iter_split(split)):
            yield i, {"text": data, "path": path}


SHIPPED_BUILDERS: dict[str, type[_ShippedBuilder]] = {
    b.name: b for b in (MoejaxDigits, MoejaxMnist1d, MoejaxSyntheticClusters,
                        MoejaxTranslatedDigits, MoejaxStdlibBytes)
}
