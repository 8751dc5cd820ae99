"""kspike.tasks against independent NumPy re-implementations of the task definitions."""
import importlib
import logging
import sys

import numpy as np
import pytest
import tensorflow as tf

from kspike import tasks

smnist = importlib.import_module("kspike.tasks.smnist")
sr = importlib.import_module("kspike.tasks.store_recall")
ev = importlib.import_module("kspike.tasks.evidence")
shd_module = importlib.import_module("kspike.tasks.shd")
common = importlib.import_module("kspike.tasks._common")


# ----------------------------------------------------------------------------- sequential MNIST
def _reference_encoding(image_uint8, cue_steps=56):
    """LSNN's threshold crossing, written from its description, one image at a time."""
    y = (image_uint8.astype(np.float32) * np.float32(1.0 / 255.0)).astype(np.float64)
    channels = []
    for thr in np.linspace(0, 1, 40):
        if thr == 1.0:
            channels.append((y == 1.0).astype(np.float32))
            continue
        onset = np.zeros(784, np.float32)
        offset = np.zeros(784, np.float32)
        for t in range(783):
            if y[t] < thr <= y[t + 1]:
                onset[t] = 1
            if y[t] >= thr > y[t + 1]:
                offset[t] = 1
        channels += [onset, offset]
    image = np.stack(channels + [np.zeros(784, np.float32)], axis=1)     # (784, 80)
    cue = np.zeros((cue_steps, 80), np.float32)
    cue[:, 79] = 1
    return np.concatenate([image, cue])


def _images(rng, n):
    images = rng.integers(0, 256, size=(n, 784)).astype(np.uint8)
    images[:, ::7] = 0          # runs of black and saturated pixels, as in real digits
    images[:, 3::11] = 255
    return images


def test_threshold_crossing_matches_numpy(rng):
    images = _images(rng, 3)
    x = tasks.threshold_crossing_encoding(images).numpy()
    assert x.shape == (3, 840, 80) and x.dtype == np.float32
    for k in range(3):
        np.testing.assert_array_equal(x[k], _reference_encoding(images[k]))
    # Threshold 0 can never be crossed from below: its two channels stay silent.
    assert x[:, :, :2].sum() == 0


def test_sequential_mnist_from_arrays_and_pixels(rng):
    images = _images(rng, 5).reshape(5, 28, 28)
    labels = np.array([3, 1, 4, 1, 5])
    ds = tasks.sequential_mnist("test", batch_size=2, images=images, labels=labels)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]          # test keeps the remainder
    x, y = batches[0]
    assert x.dtype == tf.float32 and y.dtype == tf.int32
    np.testing.assert_array_equal(y.numpy(), [3, 1])
    np.testing.assert_array_equal(x.numpy()[1], _reference_encoding(images[1].reshape(-1)))
    ds = tasks.sequential_mnist("train", batch_size=2, encoding="pixels", images=images,
                                labels=labels, shuffle=False)
    batches = list(ds)
    assert len(batches) == 2                                       # train drops the remainder
    x, y = batches[0]
    assert x.shape == (2, 784, 1)
    np.testing.assert_allclose(x.numpy()[:, :, 0], images[:2].reshape(2, 784) / 255.0,
                               rtol=1e-6)


def test_sequential_mnist_shuffle_is_seeded(rng):
    images, labels = _images(rng, 16), np.arange(16) % 10
    def order(seed):
        ds = tasks.sequential_mnist(batch_size=16, encoding="pixels", images=images,
                                    labels=labels, seed=seed)
        return next(iter(ds))[0].numpy()[:, 5, 0]
    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))


def test_sequential_mnist_reads_keras_npz(tmp_path, rng):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=_images(rng, 4).reshape(4, 28, 28), y_train=np.arange(4),
             x_test=_images(rng, 3).reshape(3, 28, 28), y_test=np.array([7, 8, 9]))
    x, y = next(iter(tasks.sequential_mnist("test", batch_size=3, path=path)))
    assert x.shape == (3, 840, 80)
    np.testing.assert_array_equal(y.numpy(), [7, 8, 9])
    bad = tmp_path / "other.npz"
    np.savez(bad, x_train=np.zeros((1, 28, 28), np.uint8), y_train=np.zeros(1, int))
    with pytest.raises(ValueError, match=r"other\.npz.*x_test"):
        tasks.sequential_mnist("test", path=bad)


def test_sequential_mnist_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="mnist.npz.*images="):
        tasks.sequential_mnist()
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz.*tf-keras-datasets/mnist\.npz"):
        tasks.sequential_mnist(path=tmp_path / "nowhere.npz")
    with pytest.raises(ValueError, match="`batch_size`.*0"):
        tasks.sequential_mnist(batch_size=0, images=np.zeros((1, 784)), labels=[0])
    with pytest.raises(ValueError, match="`encoding`.*'rate'"):
        tasks.sequential_mnist(encoding="rate", images=np.zeros((1, 784)), labels=[0])
    with pytest.raises(ValueError, match=r"`images`.*\(2, 10\)"):
        tasks.sequential_mnist(images=np.zeros((2, 10)), labels=[0, 1])
    with pytest.raises(ValueError, match="`labels`.*0..9"):
        tasks.sequential_mnist(images=np.zeros((1, 784)), labels=[10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tasks.sequential_mnist(images=np.full((1, 784), 3.0), labels=[1])
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"kspike\[datasets\]"):
        tasks.sequential_mnist(from_tfds=True)


def test_mnist_logits_average_the_cue_window(rng):
    outputs = rng.normal(size=(2, 840, 10)).astype(np.float32)
    np.testing.assert_allclose(tasks.mnist_logits(outputs).numpy(),
                               outputs[:, -56:].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tasks.mnist_logits(outputs, steps=28).numpy(),
                               outputs[:, -28:].mean(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`steps`=900"):
        tasks.mnist_logits(outputs, steps=900)


# ----------------------------------------------------------------------------- store-recall
def _check_store_recall_sample(symbols, shown, targets):
    """LSNN's validity rules and target definition, checked character by character."""
    signals = [(t, s) for t, s in enumerate(symbols) if s >= 2]
    assert signals and signals[0][1] == sr.STORE and signals[-1][1] == sr.RECALL
    for (_, a), (_, b) in zip(signals[:-1], signals[1:]):
        assert a != b                                  # store and recall alternate
    stored = None
    for t, s in enumerate(symbols):
        if s == sr.STORE:
            assert t + 1 < len(symbols) and symbols[t + 1] < 2
            stored = symbols[t + 1]
            assert shown[t].tolist() == [int(stored == 0), int(stored == 1)]
        elif s == sr.RECALL:
            assert targets[t] == stored and shown[t].tolist() == [0, 0]
        elif t == 0 or symbols[t - 1] != sr.STORE:
            assert shown[t].tolist() == [int(s == 0), int(s == 1)]


def test_store_recall_structure_follows_lsnn_rules():
    data = sr.generate_store_recall(np.random.default_rng(5), batch_size=400, character_ms=2)
    steps = data["character_steps"]
    assert steps == 2
    symbols, shown = data["symbols"], data["shown"]
    targets = data["y"][:, ::steps]
    for b in range(len(symbols)):
        _check_store_recall_sample(symbols[b], shown[b], targets[b])
    np.testing.assert_array_equal(data["mask"][:, ::steps], symbols == sr.RECALL)
    # The distractor: the bit after a store is flipped with probability 1/2.
    b, t = np.nonzero(symbols == sr.STORE)
    flipped = (shown[b, t + 1, 1] != symbols[b, t + 1]).mean()
    assert 0.42 < flipped < 0.58
    np.testing.assert_array_equal(data["groups"][..., :2], shown)
    np.testing.assert_array_equal(data["groups"][..., 2], symbols == sr.STORE)
    np.testing.assert_array_equal(data["groups"][..., 3], symbols == sr.RECALL)


def _exact_signal_law(n_characters, p):
    """Exact law of the signal pattern given validity, by enumerating the 2^L patterns of
    'a signal is inserted here' (each with probability p, stores and recalls alternating,
    starting with a store). Returns P(first character is a store), E[number of signals]."""
    import itertools
    total = first = signals = 0.0
    for pattern in itertools.product([0, 1], repeat=n_characters):
        kinds = []                         # 'S' or 'R' per signal, alternating
        for inserted in pattern:
            kinds.append(("S" if kinds.count("S") == kinds.count("R") else "R")
                         if inserted else None)
        placed = [k for k in kinds if k]
        valid = (placed and placed[-1] == "R" and None in kinds
                 and all(t + 1 < n_characters and kinds[t + 1] is None
                         for t, k in enumerate(kinds) if k == "S"))
        if not valid:
            continue
        weight = p ** sum(pattern) * (1 - p) ** (n_characters - sum(pattern))
        total += weight
        first += weight * (kinds[0] == "S")
        signals += weight * sum(pattern)
    return first / total, signals / total


def test_store_recall_signal_insertion_probability():
    p_first, mean_signals = _exact_signal_law(12, 1 / 7)
    data = sr.generate_store_recall(np.random.default_rng(0), batch_size=3000, character_ms=1)
    symbols = data["symbols"]
    first_is_store = (symbols[:, 0] == sr.STORE).mean()
    assert abs(first_is_store - p_first) < 4 * np.sqrt(p_first * (1 - p_first) / 3000)
    counts = (symbols >= 2).sum(axis=1)
    assert abs(counts.mean() - mean_signals) < 4 * counts.std() / np.sqrt(3000)


def test_store_recall_dataset_spikes_follow_groups():
    kwargs = dict(batch_size=6, n_characters=12, character_ms=40, n_inputs=20, input_rate=200.0)
    ds = tasks.store_recall(seed=11, n_batches=2, **kwargs)
    batches = list(ds)
    assert len(batches) == 2
    x, y, mask = (v.numpy() for v in batches[0])
    assert x.shape == (6, 480, 20) and x.dtype == np.float32
    assert y.dtype == np.int32 and mask.dtype == np.float32
    first_draw = next(iter(tf.data.Dataset.random(seed=11, rerandomize_each_iteration=True)))
    rng = common.numpy_rng(np.array([11, int(first_draw)]))
    structure = sr.generate_store_recall(rng, **{k: v for k, v in kwargs.items()})
    np.testing.assert_array_equal(y, structure["y"])
    np.testing.assert_array_equal(mask, structure["mask"])
    group_of_neuron = np.repeat(np.arange(4), 5)
    active = np.repeat(structure["groups"], 40, axis=1)[:, :, group_of_neuron]
    assert set(np.unique(x)) <= {0.0, 1.0}
    assert x[active == 0].sum() == 0
    rate = x[active == 1].mean() * 1000.0
    n = (active == 1).sum()
    sigma = np.sqrt(0.2 * 0.8 / n) * 1000.0
    assert abs(rate - 200.0) < 4 * sigma
    again = list(tasks.store_recall(seed=11, n_batches=2, **kwargs))
    for a, b in zip(batches, again):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u.numpy(), v.numpy())
    other = next(iter(tasks.store_recall(seed=12, n_batches=1, **kwargs)))
    assert not np.array_equal(other[0].numpy(), x)
    # Iterating again (a new epoch) draws new batches, unless asked to repeat them.
    second_pass = next(iter(ds))
    assert not np.array_equal(second_pass[0].numpy(), x)
    fixed = tasks.store_recall(seed=11, n_batches=1, rerandomize_each_iteration=False, **kwargs)
    np.testing.assert_array_equal(next(iter(fixed))[0].numpy(), next(iter(fixed))[0].numpy())


def test_bernoulli_positions_are_bernoulli():
    rng = np.random.default_rng(3)
    n, p = 200_000, 0.05
    hits = np.zeros(n)
    for _ in range(20):
        positions = common.bernoulli_positions(rng, n, p)
        assert np.all(np.diff(positions) > 0) and positions.max() < n
        hits[positions] += 1
    mean = hits.mean()
    assert abs(mean - 20 * p) < 4 * np.sqrt(20 * p * (1 - p) / n)
    # No position is favoured: the first and the last thousand trials get the same rate.
    assert abs(hits[:20000].mean() - hits[-20000:].mean()) < 0.05
    np.testing.assert_array_equal(common.bernoulli_positions(rng, 5, 1.0), np.arange(5))
    assert common.bernoulli_positions(rng, 5, 0.0).size == 0


def test_recall_error_matches_numpy(rng):
    steps = 4
    y_pred = rng.normal(size=(3, 6 * steps, 2)).astype(np.float32)
    symbols = np.array([[2, 1, 3, 0, 2, 0], [0, 2, 1, 1, 3, 1], [2, 0, 3, 1, 1, 1]])
    targets = np.array([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    y = np.repeat(targets, steps, axis=1)
    mask = np.repeat(symbols == 3, steps, axis=1).astype(np.float32)
    per_char = y_pred.reshape(3, 6, steps, 2).mean(axis=2).argmax(-1)
    wrong = (per_char != targets)[symbols == 3]
    error = tasks.recall_error(y, y_pred, mask, steps).numpy()
    assert error == pytest.approx(wrong.mean())


def test_store_recall_argument_errors():
    with pytest.raises(ValueError, match="`n_characters`.*>= 3"):
        tasks.store_recall(n_characters=2)
    with pytest.raises(ValueError, match="`character_ms`=2.5.*dt"):
        tasks.store_recall(character_ms=2.5)
    with pytest.raises(TypeError, match="`seed`"):
        tasks.store_recall(seed="a")
    with pytest.raises(ValueError, match="`signal_probability`"):
        tasks.store_recall(signal_probability=1.5)


# ----------------------------------------------------------------------------- evidence
def test_evidence_structure_matches_numpy():
    data = ev.generate_evidence_accumulation(np.random.default_rng(2), batch_size=5)
    cues, rates = data["cues"], data["group_rates"]
    assert rates.shape == (5, 2250, 4) and data["recall_steps"] == 150
    expected = np.zeros((5, 2250, 4), np.float32)
    for b in range(5):
        for k in range(7):
            expected[b, 50 + 150 * k: 150 + 150 * k, cues[b, k]] = 0.04
    expected[:, 2100:, 2] = 0.04
    expected[:, :, 3] = 0.01
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    np.testing.assert_array_equal(data["y"], (cues.sum(axis=1) >= 4).astype(int))


def test_evidence_cue_probabilities():
    data = ev.generate_evidence_accumulation(np.random.default_rng(8), batch_size=4000)
    cues = data["cues"]
    # Per trial one side gets 70% of the cues: the fraction of cues going to the side that
    # ends up in the majority is E[max(k, 7 - k) / 7], k ~ Binomial(7, 0.7).
    from math import comb
    expected = sum(comb(7, k) * 0.7 ** k * 0.3 ** (7 - k) * max(k, 7 - k) / 7
                   for k in range(8))
    majority = np.maximum(cues.sum(1), 7 - cues.sum(1)) / 7
    assert abs(majority.mean() - expected) < 0.01
    assert abs(data["y"].mean() - 0.5) < 0.03         # the favoured side itself is random


def test_evidence_dataset_spikes_and_seed():
    ds = tasks.evidence_accumulation(batch_size=8, seed=4, n_batches=1)
    x, y = next(iter(ds))
    assert x.shape == (8, 2250, 40) and x.dtype == tf.float32 and y.dtype == tf.int32
    first_draw = next(iter(tf.data.Dataset.random(seed=4, rerandomize_each_iteration=True)))
    structure = ev.generate_evidence_accumulation(common.numpy_rng(np.array([4, int(first_draw)])),
                                                  batch_size=8)
    np.testing.assert_array_equal(y.numpy(), structure["y"])
    rates = structure["group_rates"][:, :, np.repeat(np.arange(4), 10)]
    x = x.numpy()
    assert x[rates == 0].sum() == 0
    for p in (0.04, 0.01):
        observed = x[rates == np.float32(p)].mean()
        n = (rates == np.float32(p)).sum()
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / n)
    again = next(iter(tasks.evidence_accumulation(batch_size=8, seed=4, n_batches=1)))
    np.testing.assert_array_equal(again[0].numpy(), x)
    logits = tasks.evidence_logits(np.arange(2250 * 2, dtype=np.float32).reshape(1, 2250, 2))
    np.testing.assert_allclose(logits.numpy(), [[np.arange(2100, 2250).mean() * 2,
                                                 np.arange(2100, 2250).mean() * 2 + 1]])


def test_evidence_argument_errors():
    with pytest.raises(ValueError, match="`n_cues`.*odd"):
        tasks.evidence_accumulation(n_cues=6)
    with pytest.raises(ValueError, match="`minority_probability`"):
        tasks.evidence_accumulation(minority_probability=-0.1)
    with pytest.raises(ValueError, match="`batch_size`"):
        tasks.evidence_accumulation(batch_size=-1)


# ----------------------------------------------------------------------------- SHD
def _write_shd(path, samples, labels, drop=()):
    import h5py
    with h5py.File(path, "w") as f:
        spikes = f.create_group("spikes")
        times = spikes.create_dataset("times", (len(samples),),
                                      dtype=h5py.vlen_dtype(np.dtype("float32")))
        units = spikes.create_dataset("units", (len(samples),),
                                      dtype=h5py.vlen_dtype(np.dtype("uint16")))
        for k, (t, u) in enumerate(samples):
            times[k] = np.asarray(t, np.float32)
            units[k] = np.asarray(u, np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, np.uint16))
        extra = f.create_group("extra")
        extra.create_dataset("speaker", data=np.arange(len(samples), dtype=np.uint16))
        extra.create_dataset("keys", data=np.array([b"zero", b"one"]))
        for name in drop:
            del f[name]


def _shd_samples(rng, n=5):
    samples = []
    for _ in range(n):
        count = rng.integers(5, 60)
        samples.append((rng.uniform(0, 1.2, count), rng.integers(0, 700, count)))
    samples[0] = (np.array([0.0, 0.0039, 0.004, 0.004, 0.9999, 1.0, 1.1]),
                  np.array([0, 5, 5, 5, 699, 3, 4]))
    return samples


def _reference_bins(samples, dt, n_steps):
    dense = np.zeros((len(samples), n_steps, 700), np.float32)
    dropped = 0
    for k, (times, units) in enumerate(samples):
        for t, u in zip(np.asarray(times, np.float32), units):
            b = int(np.floor(float(t) * 1000.0 / dt))
            if b < n_steps:
                dense[k, b, u] += 1
            else:
                dropped += 1
    return dense, dropped


def test_shd_bins_like_numpy(tmp_path, rng, caplog):
    samples = _shd_samples(rng)
    labels = [3, 19, 0, 7, 7]
    _write_shd(tmp_path / "shd_train.h5", samples, labels)
    _write_shd(tmp_path / "shd_test.h5", samples[:2], labels[:2])
    with caplog.at_level(logging.WARNING, logger="kspike"):
        ds = tasks.shd(tmp_path, split="train", dt=4.0, n_steps=250, batch_size=2,
                       shuffle=False, drop_remainder=False)
    expected, dropped = _reference_bins(samples, 4.0, 250)
    assert dropped > 0 and ds.dropped_spikes == dropped
    assert ds.total_spikes == sum(len(t) for t, _ in samples)
    assert f"{dropped} of {ds.total_spikes} spikes" in caplog.text
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    x = np.concatenate(xs)
    assert x.shape == (5, 250, 700) and x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(np.concatenate(ys), labels)
    assert x[0, 1, 5] == 2          # two spikes of one channel in one bin are counted
    binary = next(iter(tasks.shd(tmp_path, "train", batch_size=5, shuffle=False, binary=True)))
    np.testing.assert_array_equal(binary[0].numpy(), np.minimum(expected, 1))
    test = list(tasks.shd(tmp_path / "shd_test.h5", "test", dt=10.0, n_steps=50, batch_size=8))
    np.testing.assert_array_equal(test[0][0].numpy(), _reference_bins(samples[:2], 10.0, 50)[0])


def test_shd_cache_on_disk(tmp_path, rng):
    _write_shd(tmp_path / "shd_train.h5", _shd_samples(rng), [1, 2, 3, 4, 5])
    cache = tmp_path / "cache"
    first = next(iter(tasks.shd(tmp_path, batch_size=5, shuffle=False, cache_dir=cache)))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    shd_module._memory_cache.clear()
    second = next(iter(tasks.shd(tmp_path, batch_size=5, shuffle=False, cache_dir=cache)))
    np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
    assert list(cache.iterdir()) == files


def test_shd_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match=r"shd_train\.h5.*zenkelab\.org"):
        tasks.shd(tmp_path)
    (tmp_path / "shd_test.h5.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="gunzip"):
        tasks.shd(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        tasks.shd(tmp_path / "missing.h5")
    _write_shd(tmp_path / "bad.h5", _shd_samples(rng), [0] * 5, drop=("spikes/units",))
    with pytest.raises(ValueError, match=r"bad\.h5.*'/spikes/units' is missing"):
        tasks.shd(tmp_path / "bad.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk\.h5.*HDF5"):
        tasks.shd(tmp_path / "junk.h5")
    with pytest.raises(ValueError, match="`split`"):
        tasks.shd(tmp_path, split="validation")
    with pytest.raises(ValueError, match="`dt`"):
        tasks.shd(tmp_path, dt=0)


# ----------------------------------------------------------------------------- losses, metrics
def test_window_loss_and_accuracy_match_numpy(rng):
    y_pred = rng.normal(size=(4, 30, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    logits = y_pred[:, -7:].mean(axis=1).astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_softmax[np.arange(4), labels].mean()
    loss = tasks.window_cross_entropy(7)(labels, y_pred)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    window = y_pred[:, -7:].astype(np.float64)
    per_step = window - np.log(np.exp(window).sum(-1, keepdims=True))
    expected = -np.mean([per_step[b, :, labels[b]].mean() for b in range(4)])
    loss = tasks.window_cross_entropy(7, average="loss")(labels, y_pred)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="`average`"):
        tasks.window_cross_entropy(7, average="mean")
    metric = tasks.window_accuracy(7)
    metric.update_state(labels, y_pred)
    assert float(metric.result()) == pytest.approx((logits.argmax(-1) == labels).mean())


def test_recall_loss_and_metric_match_numpy(rng):
    steps = 5
    symbols = np.array([[2, 1, 3, 0, 2, 0, 3], [0, 2, 1, 1, 3, 1, 0]])
    targets = np.array([[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]])
    y = np.repeat(targets, steps, axis=1)
    mask = np.repeat(symbols == 3, steps, axis=1).astype(np.float32)
    y_pred = rng.normal(size=(2, 7 * steps, 2)).astype(np.float32)
    logits = y_pred.reshape(2, 7, steps, 2).mean(axis=2).astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]
    expected = ce[symbols == 3].mean()
    loss = tasks.RecallCrossEntropy(steps)(y, y_pred, sample_weight=mask)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="recall mask"):
        tasks.RecallCrossEntropy(steps)(y, y_pred)
    metric = tasks.RecallError(steps)
    metric.update_state(y[:1], y_pred[:1], sample_weight=mask[:1])
    metric.update_state(y[1:], y_pred[1:], sample_weight=mask[1:])
    wrong = (logits.argmax(-1) != targets)[symbols == 3]
    assert float(metric.result()) == pytest.approx(wrong.mean())
    rebuilt = tasks.RecallError.from_config(metric.get_config())
    assert rebuilt.character_steps == steps
