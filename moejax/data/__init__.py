"""Datasets and deterministic batching for moejax.

Reading goes through TFDS for every dataset: the builders moejax ships (no network) and any TFDS
name (downloaded when the machine can). Training batches are pure functions of ``(seed, step)``,
so resuming needs no iterator state.

Shipped datasets (short name -> TFDS builder):

| name | builder | splits | features |
|---|---|---|---|
| ``digits`` | ``moejax_digits`` | train 1437 / test 360 | ``image`` float32[8, 8, 1] in [0, 1], ``label`` (10) |
| ``mnist1d`` | ``moejax_mnist1d`` | train 4000 / test 1000 | ``x`` float32[40, 1], ``label`` (10) |
| ``synthetic_clusters`` | ``moejax_synthetic_clusters`` | train 8192 / test 2048 | ``x`` float32[8], ``label`` (4), ``cluster`` (16) |
| ``translated_digits`` | ``moejax_translated_digits`` | train 5748 / test 1440 | ``image`` float32[24, 24, 1], ``label`` (10), ``position`` int32[2], ``position_class`` (4) |
| ``stdlib_bytes`` | ``moejax_stdlib_bytes`` | train / validation by file | ``text`` bytes, ``path`` bytes |

Main entry points: :func:`load_split` (a random-access source), :class:`ClassificationBatches`,
:class:`ClassificationEval`, :func:`byte_stream`, :class:`LMBatches`, :class:`LMEval`, and
:func:`from_config` which wires them from the ``data`` section of a config.
"""
from moejax.data.batching import ClassificationBatches, ClassificationEval, epoch_permutation, gather
from moejax.data.builders import (SHIPPED_BUILDERS, MoejaxDigits, MoejaxMnist1d, MoejaxStdlibBytes,
                                  MoejaxSyntheticClusters, MoejaxTranslatedDigits)
from moejax.data.lm import VOCAB_SIZE, LMBatches, LMEval, byte_stream
from moejax.data.pipeline import DATASETS, DataConfig, DatasetMeta, DatasetSpec, Pipeline, from_config
from moejax.data.reader import (SHIPPED_NAMES, SHORT_NAMES, ArraySource, Source, default_data_dir, is_shipped,
                                load_split, materialize, prepare, resolve_name)

__all__ = [
    "ArraySource", "ClassificationBatches", "ClassificationEval", "DATASETS", "DataConfig", "DatasetMeta",
    "DatasetSpec", "LMBatches", "LMEval", "MoejaxDigits", "MoejaxMnist1d", "MoejaxStdlibBytes",
    "MoejaxSyntheticClusters", "MoejaxTranslatedDigits", "Pipeline", "SHIPPED_BUILDERS", "SHIPPED_NAMES",
    "SHORT_NAMES", "Source", "VOCAB_SIZE", "byte_stream", "default_data_dir", "epoch_permutation",
    "from_config", "gather", "is_shipped", "load_split", "materialize", "prepare", "resolve_name",
]
