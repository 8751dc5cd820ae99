"""Damaged or out-of-range task files give errors naming the file, the sample and the problem."""
import gzip
import importlib
import logging

import numpy as np
import pytest

from kspike import tasks

shd_module = importlib.import_module("kspike.tasks.shd")

h5py = pytest.importorskip("h5py")


def _write_shd(path, samples, labels):
    with h5py.File(path, "w") as f:
        spikes = f.create_group("spikes")
        times = spikes.create_dataset("times", (len(samples),),
                                      dtype=h5py.vlen_dtype(np.dtype("float64")))
        units = spikes.create_dataset("units", (len(samples),),
                                      dtype=h5py.vlen_dtype(np.dtype("uint16")))
        for k, (t, u) in enumerate(samples):
            times[k] = np.asarray(t, np.float64)
            units[k] = np.asarray(u, np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, np.int64))


_GOOD = [(np.array([0.0, 0.1, 0.5]), np.array([1, 2, 3])),
         (np.array([0.2, 0.3]), np.array([4, 5]))]


@pytest.fixture(autouse=True)
def _fresh_cache():
    shd_module._memory_cache.clear()
    yield
    shd_module._memory_cache.clear()


@pytest.mark.parametrize("bad_time", [np.inf, np.nan, -0.5])
def test_shd_non_finite_or_negative_time_names_file_and_sample(tmp_path, bad_time):
    samples = list(_GOOD) + [(np.array([0.1, bad_time, 0.3]), np.array([1, 2, 3]))]
    _write_shd(tmp_path / "shd_train.h5", samples, [0, 1, 2])
    with pytest.raises(ValueError, match=rf"shd_train\.h5', sample 2: .*finite and >= 0 "
                                         rf"seconds, received {bad_time} \(spike 1 of 3\)"):
        tasks.shd(tmp_path)


def test_shd_huge_time_is_dropped_not_overflowed(tmp_path):
    samples = list(_GOOD) + [(np.array([0.1, 1e20]), np.array([1, 2]))]
    _write_shd(tmp_path / "shd_train.h5", samples, [0, 1, 2])
    ds = tasks.shd(tmp_path, batch_size=3, shuffle=False)
    assert ds.dropped_spikes == 1 and ds.total_spikes == 7
    x = next(iter(ds))[0].numpy()
    assert x[2].sum() == 1 and x[2, 25, 1] == 1


def test_shd_label_outside_the_classes(tmp_path):
    _write_shd(tmp_path / "shd_train.h5", _GOOD, [3, 20])
    with pytest.raises(ValueError, match=r"shd_train\.h5', sample 1: label 20 is outside "
                                         r"the 20 SHD classes 0\.\.19"):
        tasks.shd(tmp_path)


def test_shd_truncated_cache_is_rebuilt(tmp_path, caplog):
    _write_shd(tmp_path / "shd_train.h5", _GOOD, [3, 4])
    cache = tmp_path / "cache"
    first = next(iter(tasks.shd(tmp_path, batch_size=2, shuffle=False, cache_dir=cache)))
    (cache_file,) = cache.iterdir()
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[:len(data) // 2])
    shd_module._memory_cache.clear()
    with caplog.at_level(logging.WARNING, logger="kspike"):
        second = next(iter(tasks.shd(tmp_path, batch_size=2, shuffle=False, cache_dir=cache)))
    assert f"cache file {cache_file} is damaged" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
    assert cache_file.read_bytes() == data   # rewritten whole


def test_shd_gzip_file_says_gunzip(tmp_path):
    _write_shd(tmp_path / "plain.h5", _GOOD, [0, 1])
    with open(tmp_path / "plain.h5", "rb") as f, gzip.open(tmp_path / "shd_train.h5.gz",
                                                           "wb") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match=r"shd_train\.h5\.gz' is gzip-compressed.*gunzip it"):
        tasks.shd(tmp_path / "shd_train.h5.gz")


def test_shd_batch_size_zero(tmp_path):
    _write_shd(tmp_path / "shd_train.h5", _GOOD, [0, 1])
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, "
                                         r"received 0"):
        tasks.shd(tmp_path, batch_size=0)


def _mnist(path, x_train):
    np.savez(path, x_train=x_train, y_train=np.arange(len(x_train)) % 10,
             x_test=x_train[:1], y_test=np.zeros(1, np.int64))


def test_smnist_nan_pixels_name_file_and_image(tmp_path):
    images = np.zeros((4, 28, 28), np.float32)
    images[2, 3, 4] = np.nan
    _mnist(tmp_path / "mnist.npz", images)
    with pytest.raises(ValueError, match=r"mnist\.npz' \(x_train\): image 2 has a non-finite "
                                         r"pixel \(nan at pixel 88"):
        tasks.sequential_mnist(path=tmp_path / "mnist.npz")
    with pytest.raises(ValueError, match=r"`images`: image 2 has a non-finite pixel"):
        tasks.sequential_mnist(images=images, labels=[0, 1, 2, 3])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_smnist_damaged_npz_names_the_file(tmp_path, damage):
    path = tmp_path / "mnist.npz"
    _mnist(path, np.zeros((4, 28, 28), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    with pytest.raises(ValueError, match=r"Cannot read MNIST file .*mnist\.npz' as a NumPy "
                                         r"\.npz archive.*damaged"):
        tasks.sequential_mnist(path=path)


def test_smnist_batch_size_zero():
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, "
                                         r"received 0"):
        tasks.sequential_mnist(batch_size=0, images=np.zeros((1, 784)), labels=[0])


def test_shd_no_batch_at_all(tmp_path):
    # Fewer samples than a batch with drop_remainder=True would give an epoch of 0 batches.
    _write_shd(tmp_path / "shd_train.h5", _GOOD, [0, 1])
    with pytest.raises(ValueError, match=r"`batch_size` 4 is larger than the 2 samples of "
                                         r".*shd_train\.h5'.*drop_remainder=False"):
        tasks.shd(tmp_path, batch_size=4)
    assert len(list(tasks.shd(tmp_path, batch_size=4, drop_remainder=False))) == 1
    _write_shd(tmp_path / "empty.h5", [], [])
    with pytest.raises(ValueError, match=r"empty\.h5' holds no samples"):
        tasks.shd(tmp_path / "empty.h5", split="test")


def test_smnist_no_batch_at_all(tmp_path):
    _mnist(tmp_path / "mnist.npz", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"`batch_size` 8 is larger than the 3 images of "
                                         r"MNIST file .*mnist\.npz'"):
        tasks.sequential_mnist(path=tmp_path / "mnist.npz", batch_size=8)
    assert len(list(tasks.sequential_mnist("test", path=tmp_path / "mnist.npz",
                                           batch_size=8))) == 1
    with pytest.raises(ValueError, match=r"MNIST file .*mnist\.npz' \(x_train\) is empty"):
        _mnist(tmp_path / "mnist.npz", np.zeros((0, 28, 28), np.uint8))
        tasks.sequential_mnist(path=tmp_path / "mnist.npz", batch_size=8)
