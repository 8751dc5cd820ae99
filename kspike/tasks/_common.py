"""Argument checks and small helpers shared by the task pipelines."""
import keras
import numpy as np
import tensorflow as tf

__all__ = ["window_logits", "window_cross_entropy", "window_accuracy", "WindowCrossEntropy",
           "WindowAccuracy"]


def check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive integer, received {value!r} of type "
                        f"{type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number > 0, received {value!r} of type "
                        f"{type(value).__name__}.")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, received {value!r}.")
    return float(value)


def check_probability(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a probability in [0, 1], received {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1], received {value!r}.")
    return float(value)


def check_seed(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TypeError(f"`seed` must be a non-negative integer or None, received {value!r}.")
    return int(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, received {value!r}.")
    return value


def window_logits(outputs, steps):
    """Average a readout sequence over its last ``steps`` time steps.

    This is how the classification tasks (sequential MNIST, evidence accumulation) turn the
    output of a ``kspike.LeakyReadout`` into one prediction per sample.

    Args:
        outputs: (B, T, n_classes) readout sequence.
        steps: number of final steps to average (int, 1 <= steps <= T).

    Returns:
        (B, n_classes) logits.
    """
    steps = check_positive_int("steps", steps)
    outputs = tf.convert_to_tensor(outputs)
    if outputs.shape.rank != 3:
        raise ValueError("`outputs` must be a readout sequence of shape (batch, time, classes), "
                         f"received shape {tuple(outputs.shape)}.")
    if outputs.shape[1] is not None and outputs.shape[1] < steps:
        raise ValueError(f"`steps`={steps} exceeds the sequence length {outputs.shape[1]} of "
                         "`outputs`.")
    return tf.reduce_mean(outputs[:, -steps:, :], axis=1)


def base_seed(seed):
    """The integer all batches of a generated task derive from (fresh entropy for None)."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % (2 ** 31 - 1))
    return int(seed)


def generated_dataset(make_batch, base, n_batches, rerandomize_each_iteration=True):
    """A dataset of generated batches, each built by ``make_batch(seed_pair)`` from an int64 (2,)
    tensor ``seed_pair = (base, r_i)``, where r_i is the i-th draw of
    ``tf.data.Dataset.random(seed=base)``.

    A batch depends only on its seed pair: two datasets with the same ``base`` give the same
    batches. With ``rerandomize_each_iteration`` every new iteration over the dataset (e.g.
    every epoch of a training loop that calls ``iter`` again) draws new batches, reproducibly;
    without, every iteration repeats the same batches (a fixed validation set). There is no
    Python generator state, so batches are built in parallel and nothing blocks the interpreter
    at exit.
    """
    draws = tf.data.Dataset.random(seed=base,
                                   rerandomize_each_iteration=rerandomize_each_iteration)
    if n_batches is not None:
        draws = draws.take(n_batches)
    base = tf.constant(base, tf.int64)
    dataset = draws.map(tf.autograph.experimental.do_not_convert(
                            lambda r: make_batch(tf.stack([base, r]))),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(2)


def poisson_spikes(seed_pair, rates):
    """0/1 float32 spikes with per-entry probability ``rates`` (the spike probability per step),
    drawn with a stateless generator seeded by ``seed_pair``."""
    uniform = tf.random.stateless_uniform(tf.shape(rates), seed=seed_pair, dtype=tf.float32)
    return tf.cast(uniform < rates, tf.float32)


def numpy_rng(seed_pair):
    """The NumPy generator of batch (base, i), used for the discrete structure of a trial."""
    return np.random.default_rng([int(s) for s in np.asarray(seed_pair)])


def neuron_groups(n_inputs, n_groups):
    """Group index of each input neuron, (n_inputs,) int32: consecutive blocks with the sizes of
    ``numpy.array_split(range(n_inputs), n_groups)`` (the grouping of LSNN and e-prop)."""
    return np.concatenate([np.full(len(chunk), g, np.int32) for g, chunk in
                           enumerate(np.array_split(np.arange(n_inputs), n_groups))])


def bernoulli_positions(rng, n_trials, p):
    """Sorted positions of the successes among ``n_trials`` independent Bernoulli(p) trials.

    Drawn as cumulative sums of geometric gaps, which costs O(number of spikes) instead of one
    uniform per trial: for sparse Poisson inputs that is most of the generation time saved.
    """
    n_trials = int(n_trials)
    if n_trials <= 0 or p <= 0.0:
        return np.zeros(0, np.int64)
    if p >= 1.0:
        return np.arange(n_trials, dtype=np.int64)
    expected = n_trials * p
    chunk = int(expected + 8.0 * np.sqrt(expected) + 16)
    positions = np.cumsum(rng.geometric(p, size=chunk)) - 1
    while positions[-1] < n_trials - 1:
        more = np.cumsum(rng.geometric(p, size=chunk)) + positions[-1]
        positions = np.concatenate([positions, more])
    return positions[positions < n_trials]


@keras.saving.register_keras_serializable(package="kspike")
class WindowCrossEntropy(keras.losses.Loss):
    """Keras loss of a class read from the last ``steps`` steps of the readout y_pred
    (B, T, n_classes), against labels y_true (B,).

    Args:
        steps: number of final steps (sequential MNIST: 56; evidence accumulation: 150).
        average: "logits" takes the softmax cross-entropy of the logits averaged over the
            window (LSNN's sequential MNIST); "loss" averages the per-step cross-entropies over
            the window (e-prop's evidence accumulation).
        name: loss name.

    Registered with Keras, so a model compiled with it saves to and loads from ``.keras``
    files (``keras.models.load_model`` after ``import kspike``).
    """

    def __init__(self, steps, average="logits", name="window_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.steps = check_positive_int("steps", steps)
        self.average = check_choice("average", average, ("logits", "loss"))

    def call(self, y_true, y_pred):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        if self.average == "logits":
            logits = window_logits(y_pred, self.steps)
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        window = tf.convert_to_tensor(y_pred)[:, -self.steps:, :]
        tiled = tf.tile(labels[:, None], [1, self.steps])
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tiled, logits=window), axis=1)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "average": self.average}


def window_cross_entropy(steps, average="logits", name="window_cross_entropy"):
    """A ``WindowCrossEntropy`` loss (see there) over the last ``steps`` readout steps.

    Usable with ``model.fit``, ``kspike.Trainer`` and every learning rule (e-prop
    differentiates it with respect to each step's output)."""
    return WindowCrossEntropy(steps, average=average, name=name)


def _window_correct(y_true, y_pred, steps):
    predicted = tf.argmax(window_logits(y_pred, steps), axis=-1, output_type=tf.int32)
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    return tf.cast(tf.equal(predicted, labels), tf.float32)


@keras.saving.register_keras_serializable(package="kspike")
class WindowAccuracy(keras.metrics.MeanMetricWrapper):
    """Keras metric: accuracy of the class with the largest logit averaged over the last
    ``steps`` steps of the readout (B, T, n_classes), against labels (B,).

    Args:
        steps: number of final steps averaged (int >= 1).
        name: metric name.

    Registered with Keras, so a compiled model saves to and loads from ``.keras`` files.
    """

    def __init__(self, steps, name="accuracy", dtype=None):
        steps = check_positive_int("steps", steps)
        super().__init__(_window_correct, name=name, dtype=dtype, steps=steps)
        self.steps = steps

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def window_accuracy(steps, name="accuracy"):
    """A ``WindowAccuracy`` metric (see there) over the last ``steps`` readout steps."""
    return WindowAccuracy(steps, name=name)


def check_pixels(images, source="`images`"):
    """``images`` (N, ...) as uint8 (integer pixels 0..255) or float32 (pixels in [0, 1]).

    Raises:
        ValueError: integer pixels outside 0..255, float pixels outside [0, 1], or a non-finite
            pixel (naming ``source``, the first such image and pixel, and how many images).
        TypeError: pixels that are neither integer nor float.
    """
    if np.issubdtype(images.dtype, np.integer):
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError("Integer `images` must hold pixels in 0..255, received values in "
                             f"[{images.min()}, {images.max()}].")
        return images.astype(np.uint8)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"`images` must be integer or float pixels, received dtype "
                        f"{images.dtype}.")
    if images.size == 0:
        return images.astype(np.float32)
    flat = images.reshape(len(images), -1)
    finite = np.isfinite(flat)
    if not finite.all():
        bad = ~finite.all(axis=1)
        first = int(np.argmax(bad))
        pixel = int(np.argmax(~finite[first]))
        raise ValueError(f"{source}: image {first} has a non-finite pixel "
                         f"({flat[first, pixel]} at pixel {pixel}; "
                         f"{int(bad.sum())} such images); pixels must be in [0, 1].")
    if flat.min() < 0 or flat.max() > 1:
        raise ValueError("Float `images` must hold pixels in [0, 1] (or pass uint8 "
                         f"0..255), received values in [{flat.min()}, {flat.max()}].")
    return images.astype(np.float32)
