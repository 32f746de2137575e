"""moejax.data: shipped TFDS builders, the reader, deterministic batching, LM windows, config.

Datasets are built once per test session, on first use, into a temporary directory (shared by
xdist workers, which also exercises the prepare lock) and ``data_dir`` is always passed explicitly; ``$MOEJAX_DATA_DIR`` points at another temporary directory meanwhile, so nothing can
reach the real cache. The network path (``tfds.data_source``) is exercised with a fake.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st

import moejax.data as md
from moejax.data import mnist1d, stdlib_corpus, synthetic

SIZES = {
    "digits": {"train": 1437, "test": 360},
    "mnist1d": {"train": 4000, "test": 1000},
    "synthetic_clusters": {"train": 8192, "test": 2048},
    "translated_digits": {"train": 5748, "test": 1440},
}
FEATURES = {  # name -> {feature: (dtype, shape)}
    "digits": {"image": (np.float32, (8, 8, 1)), "label": (np.int64, ())},
    "mnist1d": {"x": (np.float32, (40, 1)), "label": (np.int64, ())},
    "synthetic_clusters": {"x": (np.float32, (8,)), "label": (np.int64, ()), "cluster": (np.int64, ())},
    "translated_digits": {"image": (np.float32, (24, 24, 1)), "label": (np.int64, ()),
                          "position": (np.int32, (2,)), "position_class": (np.int64, ())},
}


@pytest.fixture(scope="module", autouse=True)
def _no_real_cache(tmp_path_factory):
    old = os.environ.get("MOEJAX_DATA_DIR")
    os.environ["MOEJAX_DATA_DIR"] = str(tmp_path_factory.mktemp("guard"))
    tfds.disable_progress_bar()
    yield
    if old is None:
        os.environ.pop("MOEJAX_DATA_DIR")
    else:
        os.environ["MOEJAX_DATA_DIR"] = old


def _build_all(root) -> str:
    for name in md.SHORT_NAMES:
        md.prepare(name, str(root))
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One directory per test session; datasets are built on first use by load_split/prepare."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by this session's workers: prepare() locks, one builds, others wait
    path = base / "moejax_tfds"
    path.mkdir(exist_ok=True)
    return str(path)


def _all(source) -> list[dict]:
    return source.__getitems__(list(range(len(source))))


def _columns(name: str, split: str, data_dir: str) -> dict[str, np.ndarray]:
    src = md.load_split(name, split, data_dir)
    return md.materialize(src, list(FEATURES[name])).columns


# --- shipped builders ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SIZES))
def test_array_builders_shapes_dtypes_sizes(name, data_dir):
    for split, size in SIZES[name].items():
        src = md.load_split(name, split, data_dir)
        assert len(src) == size
        assert sorted(src[0]) == sorted(FEATURES[name])
        for ex in (src[0], src[size - 1], src[-1]):
            for key, (dtype, shape) in FEATURES[name].items():
                assert ex[key].dtype == dtype and ex[key].shape == shape, (key, ex[key].dtype, ex[key].shape)
        cols = _columns(name, split, data_dir)
        num_classes = src.info.features["label"].num_classes
        assert set(np.unique(cols["label"])) == set(range(num_classes))  # every class, nothing else
        assert np.isfinite(cols[next(iter(FEATURES[name]))]).all()


def test_digits_values(data_dir):
    cols = _columns("digits", "train", data_dir)
    assert cols["image"].min() == 0.0 and cols["image"].max() == 1.0
    assert np.all(np.isin(cols["image"] * 16, np.arange(17)))  # sklearn pixels are 0..16


def test_mnist1d_matches_reference_and_is_standardised(data_dir):
    train, test = _columns("mnist1d", "train", data_dir), _columns("mnist1d", "test", data_dir)
    # The first labels and values of the reference generator's published mnist1d_data.pkl.
    np.testing.assert_array_equal(train["label"][:20], [2, 6, 4, 5, 6, 6, 6, 0, 3, 1, 6, 9, 4, 3, 4, 5, 1, 9, 0, 3])
    np.testing.assert_allclose(train["x"][0, :3, 0], [-0.33200567, -0.47191037, -0.77869708], atol=1e-6)
    x = np.concatenate([train["x"], test["x"]]).astype(np.float64)
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5
    assert np.bincount(np.concatenate([train["label"], test["label"]])).tolist() == [500] * 10
    t = mnist1d.templates()
    assert t.shape == (10, 12) and np.all(t[:, 0] == 0)


def test_synthetic_clusters_structure(data_dir):
    cols = _columns("synthetic_clusters", "train", data_dir)
    np.testing.assert_array_equal(cols["label"], synthetic.cluster_labels()[cols["cluster"]])
    centres = synthetic.cluster_centres()
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 1e9
    assert gaps.min() >= 8 * synthetic.CLUSTERS_STD - 1e-9  # well separated
    nearest = np.argmin(np.linalg.norm(cols["x"][:, None] - centres[None], axis=-1), axis=1)
    assert (nearest == cols["cluster"]).mean() > 0.999  # the ideal partition is recoverable
    assert np.bincount(synthetic.cluster_labels()).tolist() == [4] * 4
    info = md.load_split("synthetic_clusters", "train", data_dir).info
    assert info.metadata["cluster_labels"] == synthetic.cluster_labels().tolist()


def test_translated_digits_paste(data_dir):
    cols = _columns("translated_digits", "test", data_dir)
    digits, labels = synthetic.digits_split("test")
    pos = cols["position"]
    assert pos.min() >= 0 and pos.max() <= synthetic.CANVAS - 8
    np.testing.assert_array_equal(cols["position_class"], 2 * (pos[:, 0] // 12) + pos[:, 1] // 12)
    assert set(np.unique(cols["position_class"])) == {0, 1, 2, 3}
    for i in range(0, len(pos), 97):
        r, c = pos[i]
        img = cols["image"][i].copy()
        np.testing.assert_array_equal(img[r:r + 8, c:c + 8], digits[i // synthetic.TRANSLATED_COPIES])
        assert cols["label"][i] == labels[i // synthetic.TRANSLATED_COPIES]
        img[r:r + 8, c:c + 8] = 0
        assert not img.any()  # nothing outside the pasted digit


def test_stdlib_bytes_split_by_file(data_dir):
    train = _all(md.load_split("stdlib_bytes", "train", data_dir))
    val = _all(md.load_split("stdlib_bytes", "validation", data_dir))
    train_paths, val_paths = [e["path"].decode() for e in train], [e["path"].decode() for e in val]
    assert not set(train_paths) & set(val_paths)
    assert train_paths == sorted(train_paths) and val_paths == sorted(val_paths)
    assert sorted(train_paths + val_paths) == stdlib_corpus.stdlib_files()
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15
    for p in train_paths + val_paths:
        parts = p.split("/")
        assert not set(parts[:-1]) & {"test", "tests", "idle_test", "site-packages"}, p
        assert not parts[-1].startswith("_sysconfigdata")
    root = stdlib_corpus.stdlib_root()
    for e in (train[0], train[len(train) // 2], val[-1]):
        assert isinstance(e["text"], bytes) and e["text"] == (root / e["path"].decode()).read_bytes()
    info = md.load_split("stdlib_bytes", "train", data_dir).info
    assert info.metadata["python_version"] == sys.version and sys.version in info.description
    assert info.metadata["fingerprint_sha256"] == stdlib_corpus.corpus_fingerprint()


def test_builders_are_deterministic(data_dir, tmp_path):
    # Compare decoded examples, not file bytes: array_record's byte layout is not part of the contract
    # (a byte comparison once failed under heavy machine load with identical examples on both sides).
    _build_all(data_dir)
    other = _build_all(tmp_path)
    for name in md.SHORT_NAMES:
        for split in ("train", "validation" if name == "stdlib_bytes" else "test"):
            mine, theirs = _all(md.load_split(name, split, data_dir)), _all(md.load_split(name, split, other))
            assert len(mine) == len(theirs) > 0, (name, split)
            for i in range(len(mine)):
                assert mine[i].keys() == theirs[i].keys()
                for key in mine[i]:
                    np.testing.assert_array_equal(np.asarray(mine[i][key]), np.asarray(theirs[i][key]),
                                                  err_msg=f"{name}/{split}[{i}].{key}")


def test_prepare_is_idempotent(data_dir):
    version_dir = os.path.join(data_dir, "moejax_digits", "1.0.0")
    before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    md.prepare("digits", data_dir)
    md.prepare("moejax_digits", data_dir)
    assert before == {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}


def test_concurrent_prepare_does_not_crash(tmp_path):
    script = textwrap.dedent(f"""
        import moejax.data as md
        b = md.prepare("synthetic_clusters", {str(tmp_path)!r})
        print("OK", b.info.splits["train"].num_examples)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "OK 8192" in out
    assert not [d for d in os.listdir(tmp_path / "moejax_synthetic_clusters") if d.startswith("incomplete")]


# --- reader ---------------------------------------------------------------------------------------

def test_names_resolve():
    assert md.resolve_name("digits") == "moejax_digits"
    assert md.resolve_name("moejax_mnist1d") == "moejax_mnist1d"
    assert md.resolve_name("mnist") == "mnist"
    assert md.is_shipped("stdlib_bytes") and not md.is_shipped("cifar10")
    assert set(md.SHORT_NAMES) == {"digits", "mnist1d", "stdlib_bytes", "synthetic_clusters", "translated_digits"}


def test_unknown_name_and_split_errors(data_dir):
    with pytest.raises(ValueError, match=r"data\.name='no_such_dataset_xyz'.*digits"):
        md.load_split("no_such_dataset_xyz", "train", data_dir)
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
        md.load_split("digits", "validation", data_dir)


class _FakeInfo:
    def __init__(self, num_classes: int):
        self.features = {"label": tfds.features.ClassLabel(num_classes=num_classes)}


class _FakeSource(list):
    """What tfds.data_source returns: a random-access sequence of decoded examples."""

    dataset_info = _FakeInfo(10)


def _fake_data_source(calls):
    def data_source(name, *, split, data_dir, download):
        calls.append(dict(name=name, split=split, data_dir=data_dir, download=download))
        if name == "tiny_shakespeare":
            return _FakeSource([{"text": f"{split} text. " * 50}])
        rng = np.random.RandomState(len(split))
        n = 50 if split == "train" else 30
        return _FakeSource([{"image": rng.randint(0, 256, (28, 28, 1)).astype(np.uint8), "label": i % 10}
                            for i in range(n)])
    return data_source


def test_named_dataset_goes_through_tfds_data_source(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tfds, "data_source", _fake_data_source(calls))
    src = md.load_split("mnist", "train", str(tmp_path))
    assert calls == [dict(name="mnist", split="train", data_dir=str(tmp_path), download=True)]
    assert len(src) == 50 and src[3]["label"].dtype.kind == "i" and src[3]["image"].dtype == np.uint8

    p = md.from_config(dict(name="mnist", batch_size=10, data_dir=str(tmp_path)))
    assert [c["split"] for c in calls[1:]] == ["train", "test"]
    assert p.meta.num_classes == 10 and p.meta.input_shape == (28, 28, 1) and p.meta.task == "classification"
    batch = p.train.batch(0)
    assert batch["inputs"].dtype == np.float32 and 0 <= batch["inputs"].min() and batch["inputs"].max() <= 1

    p = md.from_config(dict(name="tiny_shakespeare", batch_size=4, seq_len=16, data_dir=str(tmp_path)))
    assert calls[-1]["split"] == "validation" and p.meta.vocab_size == 256
    assert bytes(p.train.stream[:11]) == b"train text."


def test_named_dataset_errors_are_wrapped(monkeypatch, tmp_path):
    def broken(name, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(tfds, "data_source", broken)
    with pytest.raises(RuntimeError, match=r"data\.name='cifar10'.*network unreachable"):
        md.load_split("cifar10", "train", str(tmp_path))


# --- classification batching ----------------------------------------------------------------------

def _toy(n: int) -> md.ArraySource:
    """Example i has input [i, -i] and label i, so batches reveal their indices."""
    i = np.arange(n)
    return md.ArraySource({"x": np.stack([i, -i], 1).astype(np.float32), "label": i})


def test_batch_is_pure_function_of_seed_and_step():
    a = md.ClassificationBatches(_toy(103), 16, seed=3, input_key="x")
    b = md.ClassificationBatches(_toy(103), 16, seed=3, input_key="x")
    later = [a.batch(s)["labels"] for s in (9, 0, 5)]  # out of order, as after a restart
    for s, got in zip((9, 0, 5), later):
        np.testing.assert_array_equal(got, b.batch(s)["labels"])
    c = md.ClassificationBatches(_toy(103), 16, seed=4, input_key="x")
    assert not np.array_equal(a.batch(0)["labels"], c.batch(0)["labels"])
    batch = a.batch(2)
    assert batch["inputs"].dtype == np.float32 and batch["inputs"].shape == (16, 2)
    assert batch["labels"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 0], batch["labels"])


@given(n=st.integers(1, 60), batch_size=st.integers(1, 24), seed=st.integers(-2**40, 2**40),
       process_count=st.sampled_from([1, 2, 3]))
def test_every_example_once_per_epoch_and_processes_partition(n, batch_size, seed, process_count):
    batch_size *= process_count
    src = _toy(n)
    full = md.ClassificationBatches(src, batch_size, seed, input_key="x")
    steps = -(-3 * n // batch_size) + 1  # a bit over three epochs
    stream = np.concatenate([full.batch(s)["labels"] for s in range(steps)])
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    for s in (0, steps - 1):
        parts = [md.ClassificationBatches(src, batch_size, seed, input_key="x", process_index=p,
                                          process_count=process_count).batch(s)["labels"]
                 for p in range(process_count)]
        np.testing.assert_array_equal(np.concatenate(parts), full.batch(s)["labels"])


def test_epochs_are_reshuffled():
    b = md.ClassificationBatches(_toy(64), 64, seed=0, input_key="x")
    assert not np.array_equal(b.batch(0)["labels"], b.batch(1)["labels"])
    np.testing.assert_array_equal(md.epoch_permutation(64, 0, 1), b.batch(1)["labels"])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_counts_each_example_once(process_count):
    n, bs = 103, 16
    src = _toy(n)
    evals = [md.ClassificationEval(src, bs, input_key="x", process_index=p, process_count=process_count)
             for p in range(process_count)]
    seen = []
    for ev in evals:
        assert len(ev) == 7
        for batch in ev:
            assert batch["inputs"].shape == (bs // process_count, 2) and batch["mask"].dtype == np.float32
            keep = batch["mask"] == 1
            seen += batch["labels"][keep].tolist()
            assert not batch["inputs"][~keep].any() and not batch["labels"][~keep].any()
    assert sorted(seen) == list(range(n))
    assert list(evals[0]) and len(list(evals[0])) == 7  # re-iterable


def test_in_memory_and_tfds_reads_agree(data_dir):
    cfg = dict(name="digits", batch_size=32, seed=5, data_dir=data_dir)
    a, b = md.from_config(cfg), md.from_config({**cfg, "in_memory": False})
    for s in (0, 50):
        for k in ("inputs", "labels"):
            np.testing.assert_array_equal(a.train.batch(s)[k], b.train.batch(s)[k])
    for x, y in zip(a.eval, b.eval):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


# --- language modelling ---------------------------------------------------------------------------

def test_byte_stream_concatenates_with_separator():
    docs = [{"text": b"ab"}, {"text": "c\u00e9"}, {"text": np.frombuffer(b"xyz", np.uint8)}]
    assert bytes(md.byte_stream(docs)) == b"ab\0c\xc3\xa9\0xyz"
    assert bytes(md.byte_stream(docs, separator=10)) == b"ab\nc\xc3\xa9\nxyz"
    assert bytes(md.byte_stream(docs, separator=None, max_bytes=4)) == b"abc\xc3"
    assert md.byte_stream(docs).dtype == np.uint8


def test_lm_windows_inside_stream_and_deterministic():
    stream = (np.arange(500) % 251).astype(np.uint8)
    lm = md.LMBatches(stream, 8, 31, seed=1)
    for step in (0, 1, 77):
        tok = lm.batch(step)["tokens"]
        assert tok.shape == (8, 32) and tok.dtype == np.int32
        off = lm.offsets(step)
        assert off.min() >= 0 and off.max() + 32 <= len(stream)
        np.testing.assert_array_equal(tok, stream[off[:, None] + np.arange(32)])
        np.testing.assert_array_equal(tok, md.LMBatches(stream, 8, 31, seed=1).batch(step)["tokens"])
    assert not np.array_equal(lm.offsets(0), md.LMBatches(stream, 8, 31, seed=2).offsets(0))
    assert not np.array_equal(lm.offsets(0), lm.offsets(1))
    parts = [md.LMBatches(stream, 8, 31, seed=1, process_index=p, process_count=4).batch(3)["tokens"]
             for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), lm.batch(3)["tokens"])
    exact = md.LMBatches(stream[:32], 4, 31)  # one possible window
    assert not exact.offsets(5).any()
    offs = np.concatenate([lm.offsets(s) for s in range(200)])
    assert offs.min() < 10 and offs.max() > len(stream) - 32 - 10  # the whole range is used


@pytest.mark.parametrize("n,process_count", [(100, 1), (101, 2), (33, 4), (2, 1)])
def test_lm_eval_targets_every_token_once(n, process_count):
    stream = (np.arange(n) * 7 % 256).astype(np.uint8)
    targets = []
    for p in range(process_count):
        ev = md.LMEval(stream, 4, 8, process_index=p, process_count=process_count)
        for k, batch in enumerate(ev):
            tok, mask = batch["tokens"], batch["mask"]
            assert tok.shape == (4 // process_count, 9) and mask.shape == (4 // process_count, 8)
            rows = k * 4 + p * (4 // process_count) + np.arange(4 // process_count)
            for r, w in enumerate(rows):
                for t in np.flatnonzero(mask[r]):
                    pos = w * 8 + t + 1
                    assert tok[r, t + 1] == stream[pos] and tok[r, t] == stream[pos - 1]
                    targets.append(pos)
                assert not tok[r][1:][mask[r] == 0].any()
    assert sorted(targets) == list(range(1, n))


def test_lm_pipeline_on_stdlib(data_dir):
    cfg = ml_collections.ConfigDict(dict(name="stdlib_bytes", batch_size=4, seq_len=64, data_dir=data_dir))
    p = md.from_config(cfg)
    assert p.meta.task == "lm" and p.meta.vocab_size == 256 and p.meta.input_shape == (64,)
    assert p.meta.eval_size == len(p.eval.stream) and p.meta.train_size > 10 * p.meta.eval_size
    first = md.load_split("stdlib_bytes", "train", data_dir)[0]["text"]
    assert bytes(p.train.stream[:len(first) + 1]) == first + b"\0"
    assert p.train.batch(3)["tokens"].shape == (4, 65)
    assert sum(b["mask"].sum() for b in p.eval) == len(p.eval.stream) - 1


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,task,num_classes,shape", [
    ("digits", "classification", 10, (8, 8, 1)), ("mnist1d", "classification", 10, (40, 1)),
    ("synthetic_clusters", "classification", 4, (8,)), ("translated_digits", "classification", 10, (24, 24, 1)),
])
def test_from_config_classification_meta(name, task, num_classes, shape, data_dir):
    p = md.from_config(ml_collections.ConfigDict(dict(name=name, batch_size=8, data_dir=data_dir)))
    assert (p.meta.task, p.meta.num_classes, p.meta.input_shape) == (task, num_classes, shape)
    assert (p.meta.train_size, p.meta.eval_size) == tuple(SIZES[name].values())
    assert p.train.batch(0)["inputs"].shape == (8, *shape)


def test_from_config_extra_keys_and_processes(data_dir):
    p = md.from_config(dict(name="synthetic_clusters", batch_size=8, eval_batch_size=6, extra_keys=["cluster"],
                            data_dir=data_dir), process_index=1, process_count=2)
    b = p.train.batch(0)
    assert b["inputs"].shape == (4, 8)
    np.testing.assert_array_equal(b["labels"], synthetic.cluster_labels()[b["cluster"]])
    assert next(iter(p.eval))["mask"].shape == (3,)


@pytest.mark.parametrize("fields,match", [
    (dict(batch_size=0), r"^data\.batch_size=0: must be an integer >= 1"),
    (dict(batch_size=8.0), r"^data\.batch_size=8\.0"),
    (dict(eval_batch_size=-1), r"^data\.eval_batch_size=-1"),
    (dict(name=""), r"^data\.name=''"),
    (dict(name="no_such_dataset"), r"^data\.name='no_such_dataset': not a shipped dataset \(digits"),
    (dict(name="stdlib_bytes"), r"^data\.seq_len=None: required"),
    (dict(name="digits", seq_len=16), r"^data\.seq_len=16: only for language modelling"),
    (dict(seq_len=0, name="stdlib_bytes"), r"^data\.seq_len=0"),
    (dict(task="regression"), r"^data\.task='regression'"),
    (dict(name="mnist", task="lm", seq_len=8), r"^data\.task='lm'"),
    (dict(seed=1.5), r"^data\.seed=1\.5"),
    (dict(in_memory="yes"), r"^data\.in_memory='yes'"),
    (dict(bogus=1), r"^data\.bogus: unknown field"),
])
def test_config_errors_name_their_field(fields, match):
    with pytest.raises(ValueError, match=match):
        md.from_config(ml_collections.ConfigDict(dict(dict(name="digits", batch_size=8), **fields)))


def test_config_errors_that_need_the_data(data_dir):
    with pytest.raises(ValueError, match=r"^data\.batch_size=10: .*divisible by process_count=4"):
        md.from_config(dict(name="digits", batch_size=10, data_dir=data_dir), process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"^data\.eval_batch_size=6: .*process_count=4"):
        md.from_config(dict(name="digits", batch_size=8, eval_batch_size=6, data_dir=data_dir), process_count=4)
    with pytest.raises(ValueError, match=r"^data\.eval_split='validation': .*\['test', 'train'\]"):
        md.from_config(dict(name="digits", batch_size=8, eval_split="validation", data_dir=data_dir))
    with pytest.raises(ValueError, match=r"^data\.extra_keys='nope': not a feature"):
        md.from_config(dict(name="digits", batch_size=8, extra_keys=("nope",), data_dir=data_dir))
    with pytest.raises(ValueError, match=r"^data\.seq_len=100000000: .*the stream has only"):
        md.from_config(dict(name="stdlib_bytes", batch_size=8, seq_len=10**8, data_dir=data_dir))
    with pytest.raises(ValueError, match=r"^data\.batch_size=6: .*process_count=4"):
        md.ClassificationBatches(_toy(10), 6, input_key="x", process_count=4)
