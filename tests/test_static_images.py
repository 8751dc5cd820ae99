"""kspike.tasks.static_images: direct and Poisson encodings of static images (synthetic arrays
and a synthetic Keras-layout .npz; nothing is downloaded)."""
import numpy as np
import pytest

import kspike


def synthetic(rng, n=10, shape=(6, 5)):
    return rng.integers(0, 256, (n,) + shape).astype(np.uint8), rng.integers(0, 10, n)


def test_direct_encoding_repeats_the_scaled_image(rng):
    images, labels = synthetic(rng)
    ds = kspike.tasks.static_images(images=images, labels=labels, steps=3, batch_size=4,
                                    split="test")
    batches = list(ds)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 6, 5, 1)] * 2 + [(2, 3, 6, 5, 1)]
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    expected = images.astype(np.float32) * np.float32(1.0 / 255.0)
    for t in range(3):
        np.testing.assert_array_equal(x[:, t, ..., 0], expected)
    np.testing.assert_array_equal(y, labels)


def test_poisson_rates_and_seeding(rng):
    images = np.stack([np.full((4, 4, 3), v, np.float32) for v in (0.0, 0.25, 0.5, 1.0)] * 50)
    labels = np.zeros(len(images), np.int64)
    kwargs = dict(images=images, labels=labels, steps=20, encoding="poisson", batch_size=200,
                  split="test", max_rate=0.8, seed=3)
    x = next(iter(kspike.tasks.static_images(**kwargs)))[0].numpy()
    assert set(np.unique(x)) <= {0.0, 1.0}
    rates = x.reshape(50, 4, -1).mean(axis=(0, 2))
    # 50 * 20 * 48 Bernoulli draws per level: standard error < 0.003.
    np.testing.assert_allclose(rates, 0.8 * np.array([0.0, 0.25, 0.5, 1.0]), atol=0.015)
    again = next(iter(kspike.tasks.static_images(**kwargs)))[0].numpy()
    np.testing.assert_array_equal(x, again)
    other = next(iter(kspike.tasks.static_images(**{**kwargs, "seed": 4})))[0].numpy()
    assert not np.array_equal(x, other)
    # Successive batches draw different spikes.
    ds = kspike.tasks.static_images(**{**kwargs, "batch_size": 4})
    first, second = [b[0].numpy() for b, _ in zip(ds, range(2))]
    assert not np.array_equal(first, second)


def test_npz_path_and_shuffle(rng, tmp_path):
    x_train, y_train = synthetic(rng, 12, (28, 28))
    x_test, y_test = synthetic(rng, 5, (28, 28))
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    train = kspike.tasks.static_images(path=path, steps=2, batch_size=5, seed=0)
    shapes = [tuple(x.shape) for x, _ in train]
    assert shapes == [(5, 2, 28, 28, 1)] * 2                        # remainder dropped
    labels = np.concatenate([y.numpy() for _, y in train])
    assert set(labels) <= set(y_train)
    test = list(kspike.tasks.static_images(path=path, split="test", steps=2, batch_size=5))
    np.testing.assert_array_equal(test[0][1].numpy(), y_test)


def test_bad_arguments(rng, tmp_path):
    images, labels = synthetic(rng)
    with pytest.raises(ValueError, match="exactly one source"):
        kspike.tasks.static_images()
    with pytest.raises(ValueError, match="encoding"):
        kspike.tasks.static_images(images=images, labels=labels, encoding="latency")
    with pytest.raises(TypeError, match="steps"):
        kspike.tasks.static_images(images=images, labels=labels, steps=2.5)
    with pytest.raises(ValueError, match="max_rate"):
        kspike.tasks.static_images(images=images, labels=labels, max_rate=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kspike.tasks.static_images(images=images * 2.0, labels=labels)
    with pytest.raises(ValueError, match="one label per image"):
        kspike.tasks.static_images(images=images, labels=labels[:3])
    with pytest.raises(FileNotFoundError, match="not found"):
        kspike.tasks.static_images(path=tmp_path / "missing.npz")
