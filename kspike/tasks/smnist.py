"""Sequential MNIST (LSNN, Bellec et al. 2018): one pixel per millisecond.

Two encodings are offered:

- ``"threshold_crossing"`` (LSNN): the 784 pixels of an image, in reading order and scaled to
  [0, 1] (k / 255), are one 784-step signal y. 40 thresholds ``linspace(0, 1, 40)`` are each watched
  by an onset channel (a spike at step t when y[t] < thr <= y[t+1]) and an offset channel (a
  spike at step t when y[t] >= thr > y[t+1]); the last threshold (1.0) can only be touched, so
  it has one channel that spikes at every step where y[t] == 1. That gives 39 * 2 + 1 = 79 channels,
  ordered (onset thr_0, offset thr_0, onset thr_1, ..., touch). Channel 79 is the cue: silent
  during the image and active at every step of the ``cue_steps`` (56) steps appended after it.
  Sequences are 784 + 56 = 840 steps of 80 channels. As in LSNN, a crossing between steps t and
  t+1 is marked at step t.
- ``"pixels"``: the raw intensities in [0, 1] as one analog channel, 784 steps, no cue.

The label is read from the readout averaged over the final steps: ``mnist_logits(outputs)``
averages the last 56 steps (LSNN averages the last 28: pass ``steps=28``).
"""
import os
import zipfile
import zlib

import numpy as np
import tensorflow as tf

from kspike.tasks._common import (check_choice, check_pixels, check_positive_int,
                                  check_seed, window_logits)

__all__ = ["sequential_mnist", "threshold_crossing_encoding", "mnist_logits",
           "N_THRESHOLD_CHANNELS", "CUE_STEPS"]

_N_THRESHOLDS = 40
N_THRESHOLD_CHANNELS = 2 * (_N_THRESHOLDS - 1) + 1 + 1   # 80 input channels with the cue
CUE_STEPS = 56
_PIXELS = 784
_ENCODINGS = ("threshold_crossing", "pixels")
_SPLITS = ("train", "test")

_SOURCES = ("Keras' copy of MNIST: https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
            "mnist.npz (keras.datasets.mnist.load_data() saves it in ~/.keras/datasets/)")


def _scale(images):
    """uint8 0..255 -> float32 k * (1/255) (the float32 rounding LSNN's input pipeline used)."""
    if images.dtype.is_integer:
        return tf.cast(images, tf.float32) * tf.constant(1.0 / 255.0, tf.float32)
    return tf.cast(images, tf.float32)


def threshold_crossing_encoding(images, cue_steps=CUE_STEPS):
    """LSNN's threshold-crossing spike encoding of flattened MNIST images.

    Args:
        images: (B, 784) pixels, uint8 in 0..255 or floats in [0, 1].
        cue_steps: number of cue steps appended after the image (int >= 1).

    Returns:
        (B, 784 + cue_steps, 80) float32 tensor of 0/1 spikes (channel layout in the module
        docstring).
    """
    cue_steps = check_positive_int("cue_steps", cue_steps)
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 2 or (images.shape[-1] is not None and images.shape[-1] != _PIXELS):
        raise ValueError("`images` must have shape (batch, 784), received "
                         f"{tuple(images.shape)}.")
    # Comparisons in float64 against float64 thresholds, as LSNN compared its float32 pixels
    # with NumPy's float64 linspace.
    y = tf.cast(_scale(images), tf.float64)[:, :, None]                      # (B, 784, 1)
    thresholds = tf.constant(np.linspace(0.0, 1.0, _N_THRESHOLDS)[:-1], tf.float64)
    lower = y < thresholds
    higher = y >= thresholds
    onset = tf.logical_and(lower[:, :-1], higher[:, 1:])                     # (B, 783, 39)
    offset = tf.logical_and(higher[:, :-1], lower[:, 1:])
    crossings = tf.reshape(tf.stack([onset, offset], axis=-1),
                           (-1, _PIXELS - 1, 2 * (_N_THRESHOLDS - 1)))       # interleaved
    crossings = tf.pad(tf.cast(crossings, tf.float32), [[0, 0], [0, 1], [0, 0]])
    touch = tf.cast(tf.equal(y, 1.0), tf.float32)                            # (B, 784, 1)
    image_part = tf.concat([crossings, touch, tf.zeros_like(touch)], axis=-1)  # (B, 784, 80)
    batch = tf.shape(images)[0]
    cue = tf.concat([tf.zeros((batch, cue_steps, N_THRESHOLD_CHANNELS - 1)),
                     tf.ones((batch, cue_steps, 1))], axis=-1)
    return tf.concat([image_part, cue], axis=1)


def mnist_logits(outputs, steps=CUE_STEPS):
    """Class logits (B, 10) from a readout sequence (B, T, 10): the mean of the last ``steps``
    steps (the cue window of the threshold-crossing encoding). For the ``"pixels"`` encoding use
    ``steps=1`` (the last step)."""
    return window_logits(outputs, steps)


def _load_npz(path, split):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"MNIST file not found: {path!r}. Pass `path=` the Keras-format mnist.npz (arrays "
            f"x_train, y_train, x_test, y_test), from {_SOURCES}; or pass `images=` and "
            "`labels=` arrays; or `from_tfds=True` to use tensorflow-datasets.")
    wanted = (f"x_{split}", f"y_{split}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("it holds a single array, not an .npz archive")
            keys = set(data.files)
            missing = [k for k in wanted if k not in keys]
            if not missing:
                return data[wanted[0]], data[wanted[1]]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        # np.load reports a garbage file as pickled data and a truncated one as a bad zip.
        raise ValueError(f"Cannot read MNIST file {path!r} as a NumPy .npz archive "
                         f"({type(error).__name__}: {error}); the file is damaged or not the "
                         f"Keras mnist.npz (download it again from {_SOURCES}).") from None
    raise ValueError(f"MNIST file {path!r} has no array {missing[0]!r} (found "
                     f"{sorted(keys)}); expected the Keras mnist.npz layout with "
                     "x_train, y_train, x_test, y_test.")


def _load_tfds(split):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("`from_tfds=True` needs tensorflow-datasets: pip install "
                          "'kspike[datasets]' (or pass `path=` a Keras mnist.npz file, or "
                          "`images=`/`labels=` arrays).") from None
    images, labels = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1,
                                             as_supervised=True))
    return images, labels


def _check_arrays(images, labels, source="`images`"):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3 and images.shape[1:] == (28, 28):
        images = images.reshape(len(images), _PIXELS)
    elif images.ndim == 4 and images.shape[1:] == (28, 28, 1):
        images = images.reshape(len(images), _PIXELS)
    if images.ndim != 2 or images.shape[1] != _PIXELS:
        raise ValueError("`images` must have shape (N, 28, 28), (N, 28, 28, 1) or (N, 784), "
                         f"received {images.shape}.")
    images = check_pixels(images, source)
    labels = labels.reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"`labels` must have one label per image: {len(images)} images, "
                         f"{len(labels)} labels.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`labels` must be integers 0..9, received dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"`labels` must be in 0..9, received values in [{labels.min()}, "
                         f"{labels.max()}].")
    if len(images) == 0:
        raise ValueError(f"{source} is empty (no images).")
    return images, labels.astype(np.int32)


def sequential_mnist(split="train", batch_size=256, encoding="threshold_crossing", path=None,
                     images=None, labels=None, from_tfds=False, shuffle=None, seed=None,
                     drop_remainder=None, cue_steps=CUE_STEPS):
    """Sequential MNIST as a ``tf.data.Dataset`` of (x, y) batches.

    Args:
        split: "train" or "test" (which arrays of the file to read).
        batch_size: samples per batch B.
        encoding: "threshold_crossing" (LSNN, x (B, 840, 80) spikes) or "pixels"
            (x (B, 784, 1) intensities in [0, 1]); see the module docstring.
        path: a Keras-format ``mnist.npz`` file (x_train (60000, 28, 28) uint8, y_train,
            x_test, y_test).
        images, labels: arrays used instead of a file: images (N, 28, 28) or (N, 784), uint8
            0..255 or floats in [0, 1]; labels (N,) integers 0..9.
        from_tfds: read MNIST with tensorflow-datasets (downloads it once; extra
            ``kspike[datasets]``). Never the default.
        shuffle: shuffle the samples each epoch (default: True for "train").
        seed: seed of the shuffle (int or None).
        drop_remainder: drop a last incomplete batch (default: True for "train").
        cue_steps: duration of the cue in ms (steps) for the threshold-crossing encoding.

    Returns:
        A finite ``tf.data.Dataset`` (one epoch; call ``.repeat()`` for more) of
        (x float32 (B, T, n_in), y int32 (B,)) batches.
    """
    check_choice("split", split, _SPLITS)
    batch_size = check_positive_int("batch_size", batch_size)
    check_choice("encoding", encoding, _ENCODINGS)
    cue_steps = check_positive_int("cue_steps", cue_steps)
    seed = check_seed(seed)
    sources = sum([path is not None, images is not None or labels is not None, bool(from_tfds)])
    if sources == 0:
        raise ValueError(f"sequential_mnist needs data and downloads nothing by itself: pass "
                         f"`path=` a Keras-format mnist.npz (from {_SOURCES}), or `images=` and "
                         "`labels=` arrays, or `from_tfds=True` (tensorflow-datasets).")
    if sources > 1:
        raise ValueError("Pass only one MNIST source: `path`, `images`/`labels` or "
                         "`from_tfds=True`.")
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise ValueError("`images` and `labels` must be given together.")
        images, labels = _check_arrays(images, labels)
    elif path is not None:
        images, labels = _check_arrays(*_load_npz(path, split),
                                       source=f"MNIST file {os.fspath(path)!r} (x_{split})")
    else:
        images, labels = _check_arrays(*_load_tfds(split))
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    drop_remainder = (split == "train") if drop_remainder is None else bool(drop_remainder)
    if drop_remainder and len(images) < batch_size:
        source = f"MNIST file {os.fspath(path)!r}" if path is not None else "`images`"
        raise ValueError(f"`batch_size` {batch_size} is larger than the {len(images)} images of "
                         f"{source}: with drop_remainder=True not one batch would be made; pass "
                         "a smaller batch_size or drop_remainder=False.")

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if encoding == "threshold_crossing":
        def encode(x, y):
            return threshold_crossing_encoding(x, cue_steps), y
    else:
        def encode(x, y):
            return _scale(x)[:, :, None], y
    # kspike's own graph code needs no AutoGraph conversion (and tracing skips its cost).
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(encode),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
