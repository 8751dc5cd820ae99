"""Static images as spike-layer input sequences: the direct and the Poisson (rate) encoding.

Deep SNNs on static images (SpikingJelly's tutorials, Rate-BP, S-TLLR on CIFAR) feed every image
for T time steps (docs/neuron_layers.md):

- ``"direct"`` (analog) encoding: the image, scaled to [0, 1], repeated T times; the first
  convolution + batch norm + spiking layer acts as the encoder.
- ``"poisson"`` (rate) encoding: at every step an independent 0/1 spike per pixel with
  probability ``max_rate * pixel`` (SpikingJelly's PoissonEncoder fires where
  ``uniform < pixel``). The noise is seeded: batch k of an epoch always uses the stream
  ``(seed, k)``, so a rerun with the same seed sees the same spikes.
"""
import os

import numpy as np
import tensorflow as tf

from kspike.tasks._common import (check_choice, check_pixels, check_positive_int,
                                  check_probability, check_seed)

__all__ = ["static_images", "load_image_arrays", "encode_images"]

_ENCODINGS = ("direct", "poisson")
_SPLITS = ("train", "test")


def load_image_arrays(path, split="train"):
    """(images, labels) of a Keras-layout ``.npz`` (x_train, y_train, x_test, y_test), e.g.
    ``mnist.npz`` or ``fashion_mnist``; nothing is downloaded."""
    check_choice("split", split, _SPLITS)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file not found: {path!r}. Pass `path=` a Keras-format "
                                ".npz (x_train, y_train, x_test, y_test) such as the mnist.npz "
                                "that keras.datasets.mnist.load_data() saves in "
                                "~/.keras/datasets/, or pass `images=` and `labels=` arrays.")
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = (f"x_{split}", f"y_{split}")
            missing = [k for k in wanted if k not in data.files]
            if missing:
                raise ValueError(f"{path!r} has no array {missing[0]!r} (found "
                                 f"{sorted(data.files)}); expected x_train, y_train, x_test, "
                                 "y_test.")
            return data[wanted[0]], data[wanted[1]]
    except (OSError, EOFError) as error:
        raise ValueError(f"Cannot read {path!r} as a NumPy .npz archive: {error}") from None


def _check_arrays(images, labels):
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError("`images` must have shape (N, H, W) or (N, H, W, C), received "
                         f"{images.shape}.")
    if len(images) == 0:
        raise ValueError("`images` is empty.")
    images = check_pixels(images)
    if len(labels) != len(images):
        raise ValueError(f"`labels` must have one label per image: {len(images)} images, "
                         f"{len(labels)} labels.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise TypeError(f"`labels` must be non-negative integers, received dtype "
                        f"{labels.dtype} with minimum {labels.min()}.")
    return images, labels.astype(np.int32)


def encode_images(images, steps, encoding="direct", max_rate=1.0, seed=(0, 0)):
    """Encode a batch of images as a (B, T, H, W, C) float32 sequence.

    Args:
        images: (B, H, W, C) pixels, uint8 0..255 or floats in [0, 1].
        steps: T (int >= 1).
        encoding: "direct" (the scaled image at every step) or "poisson" (0/1 spikes with
            probability ``max_rate * pixel`` per step).
        max_rate: spike probability per step of a white pixel (Poisson only), in [0, 1].
        seed: a stateless-random seed, a pair of ints or an int32 (2,) tensor (Poisson only).
    """
    steps = check_positive_int("steps", steps)
    check_choice("encoding", encoding, _ENCODINGS)
    max_rate = check_probability("max_rate", max_rate)
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"`images` must have shape (B, H, W, C), received {tuple(images.shape)}.")
    if images.dtype.is_integer:
        # k * (1/255) in float32, the scaling of kspike's sequential MNIST.
        pixels = tf.cast(images, tf.float32) * tf.constant(1.0 / 255.0, tf.float32)
    else:
        pixels = tf.cast(images, tf.float32)
    repeated = tf.repeat(pixels[:, None], steps, axis=1)
    if encoding == "direct":
        return repeated
    uniform = tf.random.stateless_uniform(tf.shape(repeated), seed=seed)
    return tf.cast(uniform < max_rate * repeated, tf.float32)


def static_images(split="train", steps=4, encoding="direct", batch_size=64, path=None,
                  images=None, labels=None, max_rate=1.0, shuffle=None, seed=None,
                  drop_remainder=None):
    """Images as input sequences for deep SNNs, a ``tf.data.Dataset`` of (x, y) batches.

    Args:
        split: "train" or "test" (the arrays read from ``path``).
        steps: T, the number of time steps per image.
        encoding: "direct" or "poisson" (module docstring).
        batch_size: B.
        path: a Keras-layout ``.npz`` (e.g. mnist.npz); or give ``images`` and ``labels``.
        images: (N, H, W) or (N, H, W, C), uint8 0..255 or floats in [0, 1].
        labels: (N,) non-negative integers.
        max_rate: Poisson spike probability per step of a white pixel.
        shuffle: shuffle every epoch (default True for "train").
        seed: seed of the shuffle and of the Poisson spikes (int or None = 0 for the spikes).
        drop_remainder: drop a last incomplete batch (default True for "train").

    Returns:
        A finite dataset (one epoch) of (x float32 (B, T, H, W, C), y int32 (B,)).

    Example:

    >>> import numpy as np, kspike
    >>> images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    >>> ds = kspike.tasks.static_images(images=images, labels=np.arange(8) % 10, steps=4,
    ...                                 encoding="poisson", batch_size=4, seed=0)
    >>> x, y = next(iter(ds))
    >>> tuple(x.shape), tuple(y.shape)                       # (B, T, H, W, C), (B,)
    ((4, 4, 28, 28, 1), (4,))
    >>> sorted(np.unique(x.numpy()).tolist())                # Poisson: spikes only
    [0.0, 1.0]

    With a Keras ``mnist.npz``: ``kspike.tasks.static_images(path="mnist.npz", steps=4)``.
    """
    check_choice("split", split, _SPLITS)
    steps = check_positive_int("steps", steps)
    check_choice("encoding", encoding, _ENCODINGS)
    batch_size = check_positive_int("batch_size", batch_size)
    max_rate = check_probability("max_rate", max_rate)
    seed = check_seed(seed)
    if (path is None) == (images is None and labels is None):
        raise ValueError("static_images needs exactly one source and downloads nothing: "
                         "`path=` a Keras-layout .npz, or `images=` and `labels=` arrays.")
    if path is not None:
        images, labels = load_image_arrays(path, split)
    elif images is None or labels is None:
        raise ValueError("`images` and `labels` must be given together.")
    images, labels = _check_arrays(images, labels)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    drop_remainder = (split == "train") if drop_remainder is None else bool(drop_remainder)
    noise_seed = 0 if seed is None else seed

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder).enumerate()

    def encode(index, batch):
        x, y = batch
        pair = tf.stack([tf.constant(noise_seed, tf.int64), index])
        return encode_images(x, steps, encoding, max_rate, seed=pair), y

    # kspike's own graph code needs no AutoGraph conversion (and tracing skips its cost).
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(encode),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
