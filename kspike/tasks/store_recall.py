"""Store-recall task of LSNN (Bellec et al. 2018), generated on the fly.

A sequence has ``n_characters`` characters of ``character_ms`` ms each. Every character is a
random bit (value 0 or value 1) unless a store or a recall signal is inserted: starting in the
"recalled" state, each character is a store with probability ``signal_probability`` while the
last signal was a recall, and a recall with the same probability while the last signal was a
store, so stores and recalls alternate (LSNN uses 1 / (1 + expected delay 6) = 1/7). A sequence
is kept only if it is valid (otherwise it is drawn again): it holds at least one store, one
recall and one bit; every store is followed by a bit (not by a signal, not at the end); the last
signal is a recall.
(LSNN-official's generator carries the store/recall state over from a rejected draw into the next
attempt; here every attempt starts from the recalled state, as the rule above states.)

During a store character the value channel of the bit to remember fires together with the store
channel (the bit shown is the one of the following character). With probability ``flip_probability``
(1/2) the following character then shows the opposite bit, a distractor. The target at a recall
is the bit shown with the last store; loss and error count recall characters only.

The 100 input neurons form 4 groups of 25 (value 0, value 1, store, recall); the neurons of an
active group fire Poisson spikes at ``input_rate`` (50 Hz), the others are silent.
"""
import keras
import numpy as np
import tensorflow as tf

from kspike.tasks._common import (base_seed, check_positive_float, check_positive_int,
                                  bernoulli_positions, check_probability, check_seed,
                                  generated_dataset, numpy_rng)

__all__ = ["store_recall", "generate_store_recall", "recall_error", "RecallError",
           "RecallCrossEntropy", "STORE",
           "RECALL"]

STORE = 2    # symbol codes: 0 and 1 are the bits
RECALL = 3
_N_GROUPS = 4


def _is_valid(symbols):
    stores = np.flatnonzero(symbols == STORE)
    recalls = np.flatnonzero(symbols == RECALL)
    if len(stores) == 0 or len(recalls) == 0 or not np.any(symbols < STORE):
        return False
    # Alternation starting with a store holds by construction; the last signal must be a recall
    # so that every stored bit is asked for.
    if recalls[-1] < stores[-1]:
        return False
    for t in stores:
        if t == len(symbols) - 1 or symbols[t + 1] >= STORE:
            return False
    return True


def _symbols(rng, n_characters, signal_probability):
    while True:
        symbols = rng.integers(0, 2, size=n_characters)
        draws = rng.random(n_characters)
        last = RECALL
        for t in range(n_characters):
            if draws[t] < signal_probability:
                symbols[t] = last = STORE if last == RECALL else RECALL
        if _is_valid(symbols):
            return symbols


def generate_store_recall(rng, batch_size=128, n_characters=12, character_ms=200.0,
                          n_inputs=100, input_rate=50.0, signal_probability=1.0 / 7.0,
                          flip_probability=0.5, dt=1.0):
    """The discrete structure of one batch of the store-recall task, as NumPy arrays (the
    Poisson spikes are drawn from it by ``store_recall``).

    Args:
        rng: a ``numpy.random.Generator``.
        Other arguments as in ``store_recall``.

    Returns:
        dict with
            "groups": (B, n_characters, 4) int32, 1 where a group (value 0, value 1, store,
                recall) is active during a character; its neurons fire at ``input_rate``;
            "y": (B, T) int32 target bit (the recalled bit at recall steps, 0 elsewhere);
            "mask": (B, T) float32, 1 at the steps of recall characters;
            "symbols": (B, n_characters) int32 symbol per character (0, 1, STORE, RECALL);
            "shown": (B, n_characters, 2) int32 value channels shown per character (after the
                store copy and the distractor flip);
            "character_steps": steps per character.
    """
    steps = int(round(character_ms / dt))
    symbols = np.stack([_symbols(rng, n_characters, signal_probability)
                        for _ in range(batch_size)]).astype(np.int32)
    shown = np.stack([symbols == 0, symbols == 1], axis=-1).astype(np.int32)
    targets = np.zeros((batch_size, n_characters), np.int32)
    for b in range(batch_size):
        stored = None
        for t in range(n_characters):
            if symbols[b, t] == STORE:
                stored = symbols[b, t + 1]
                shown[b, t] = shown[b, t + 1]
                if rng.random() < flip_probability:
                    shown[b, t + 1] = 1 - shown[b, t + 1]
            elif symbols[b, t] == RECALL:
                targets[b, t] = stored
    # Active groups per character: value 0, value 1, store, recall.
    groups = np.concatenate([shown, (symbols == STORE)[..., None],
                             (symbols == RECALL)[..., None]], axis=-1).astype(np.int32)
    is_recall = np.repeat(symbols == RECALL, steps, axis=1)
    return {"groups": groups, "y": np.repeat(targets, steps, axis=1),
            "mask": is_recall.astype(np.float32), "symbols": symbols, "shown": shown,
            "character_steps": steps}


def spike_indices(rng, groups, character_steps, n_inputs, p_spike):
    """Poisson input spikes of a batch as flat indices into (B, T, n_inputs).

    Args:
        rng: a ``numpy.random.Generator``.
        groups: (B, n_characters, 4) active groups from ``generate_store_recall``.
        character_steps: steps per character.
        n_inputs: input neurons, in 4 consecutive groups (``numpy.array_split`` sizes).
        p_spike: spike probability per step of a neuron of an active group (rate * dt).

    Returns:
        int64 array of flat indices (b * T + t) * n_inputs + neuron, sorted, one per spike;
        every step of every neuron of an active group spikes independently with p_spike.
    """
    batch, n_characters, _ = groups.shape
    steps = n_characters * character_steps
    sizes = np.array([len(c) for c in np.array_split(np.arange(n_inputs), _N_GROUPS)])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    b, c, g = np.nonzero(groups)
    block_length = character_steps * sizes[g]
    ends = np.cumsum(block_length)
    if len(ends) == 0:
        return np.zeros(0, np.int64)
    positions = bernoulli_positions(rng, ends[-1], p_spike)
    block = np.searchsorted(ends, positions, side="right")
    offset = positions - (ends[block] - block_length[block])
    group = g[block]
    t = c[block] * character_steps + offset // sizes[group]
    neuron = starts[group] + offset % sizes[group]
    return ((b[block] * steps + t) * n_inputs + neuron).astype(np.int64)


def store_recall(batch_size=128, n_characters=12, character_ms=200, seed=None, n_inputs=100,
                 input_rate=50.0, signal_probability=1.0 / 7.0, flip_probability=0.5, dt=1.0,
                 n_batches=None, rerandomize_each_iteration=True):
    """LSNN's store-recall task as a ``tf.data.Dataset`` generated on the fly.

    Args:
        batch_size: sequences per batch B.
        n_characters: characters per sequence (LSNN: 12).
        character_ms: duration of a character in ms (LSNN: 200).
        seed: integer seed; two datasets with the same seed give the same batches. None draws
            fresh randomness.
        n_inputs: input neurons (>= 4), split in 4 groups (value 0, value 1, store, recall).
        input_rate: Poisson rate of an active group in Hz (LSNN: 50).
        signal_probability: probability that a character is the next store/recall signal
            (LSNN: 1/7).
        flip_probability: probability that the bit after a store is flipped (a distractor).
        dt: time step in ms.
        n_batches: number of batches (None: endless).
        rerandomize_each_iteration: True draws new batches each time the dataset is iterated
            again (each epoch), reproducibly for a given seed; False repeats the same batches
            (a fixed validation set).

    Returns:
        ``tf.data.Dataset`` of (x, y, sample_weight): x (B, T, n_inputs) float32 spikes,
        y (B, T) int32 target bits, sample_weight (B, T) float32, 1 at recall steps only, with
        T = n_characters * character_ms / dt. Use ``recall_error`` for LSNN's error measure.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    n_characters = check_positive_int("n_characters", n_characters)
    if n_characters < 3:
        raise ValueError("`n_characters` must be >= 3 (a store, its bit and a recall), "
                         f"received {n_characters}.")
    character_ms = check_positive_float("character_ms", character_ms)
    dt = check_positive_float("dt", dt)
    if character_ms / dt < 1 or abs(character_ms / dt - round(character_ms / dt)) > 1e-9:
        raise ValueError(f"`character_ms`={character_ms} must be a whole number of time steps "
                         f"`dt`={dt}.")
    seed = check_seed(seed)
    n_inputs = check_positive_int("n_inputs", n_inputs)
    if n_inputs < _N_GROUPS:
        raise ValueError(f"`n_inputs` must be >= 4 (four input groups), received {n_inputs}.")
    input_rate = check_positive_float("input_rate", input_rate)
    if input_rate * dt / 1000.0 > 1.0:
        raise ValueError(f"`input_rate`={input_rate} Hz exceeds one spike per step of "
                         f"dt={dt} ms.")
    signal_probability = check_probability("signal_probability", signal_probability)
    if signal_probability == 0.0:
        raise ValueError("`signal_probability` must be > 0, received 0.")
    flip_probability = check_probability("flip_probability", flip_probability)
    n_batches = check_positive_int("n_batches", n_batches, allow_none=True)
    steps = int(round(character_ms / dt)) * n_characters
    kwargs = dict(batch_size=batch_size, n_characters=n_characters, character_ms=character_ms,
                  n_inputs=n_inputs, input_rate=input_rate,
                  signal_probability=signal_probability, flip_probability=flip_probability,
                  dt=dt)

    size = batch_size * steps * n_inputs

    def structure(seed_pair):
        rng = numpy_rng(seed_pair)
        data = generate_store_recall(rng, **kwargs)
        spikes = spike_indices(rng, data["groups"], data["character_steps"], n_inputs,
                               input_rate * dt / 1000.0)
        return spikes, data["y"], data["mask"]

    def make_batch(seed_pair):
        spikes, y, mask = tf.numpy_function(structure, [seed_pair],
                                            [tf.int64, tf.int32, tf.float32], stateful=False)
        spikes.set_shape((None,))
        y.set_shape((batch_size, steps))
        mask.set_shape((batch_size, steps))
        x = tf.scatter_nd(spikes[:, None], tf.ones_like(spikes, tf.float32), [size])
        return tf.reshape(x, (batch_size, steps, n_inputs)), y, mask

    return generated_dataset(make_batch, base_seed(seed), n_batches,
                             bool(rerandomize_each_iteration))


def recall_error(y_true, y_pred, sample_weight, character_steps):
    """LSNN's recall error: the fraction of recall characters whose readout, averaged over the
    character, picks the wrong bit.

    Args:
        y_true: (B, T) target bits.
        y_pred: (B, T, 2) readout (logits or probabilities).
        sample_weight: (B, T) recall mask from ``store_recall``.
        character_steps: steps per character (character_ms / dt).

    Returns:
        Scalar float32 tensor in [0, 1] (NaN-free: 0 when the batch holds no recall).
    """
    character_steps = check_positive_int("character_steps", character_steps)
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.shape.rank != 3:
        raise ValueError(f"`y_pred` must be (batch, time, 2), received {tuple(y_pred.shape)}.")
    wrong, count = _recall_counts(y_true, y_pred, sample_weight, character_steps)
    return tf.math.divide_no_nan(wrong, count)


def _recall_counts(y_true, y_pred, sample_weight, character_steps):
    y_pred = tf.convert_to_tensor(y_pred)
    batch, steps = tf.shape(y_pred)[0], tf.shape(y_pred)[1]
    per_character = tf.reduce_mean(
        tf.reshape(y_pred, (batch, steps // character_steps, character_steps, -1)), axis=2)
    predicted = tf.argmax(per_character, axis=-1, output_type=tf.int32)
    target = tf.cast(y_true, tf.int32)[:, ::character_steps]
    mask = tf.cast(tf.cast(sample_weight, tf.float32)[:, ::character_steps] > 0, tf.float32)
    wrong = tf.cast(tf.not_equal(predicted, target), tf.float32)
    return tf.reduce_sum(wrong * mask), tf.reduce_sum(mask)


@keras.saving.register_keras_serializable(package="kspike")
class RecallError(keras.metrics.Metric):
    """Keras metric of LSNN's recall error over all batches seen: wrong recall characters /
    recall characters (see ``recall_error``); pass the recall mask as ``sample_weight``.

    In ``model.compile`` it belongs in ``weighted_metrics=`` (Keras passes sample weights,
    here the recall mask, only to those); in ``metrics=`` it raises a ValueError saying so.
    ``kspike.Trainer(metrics=[...])`` passes the mask to every metric.

    Args:
        character_steps: steps per character (character_ms / dt).
        name: metric name.
    """

    def __init__(self, character_steps, name="recall_error", **kwargs):
        super().__init__(name=name, **kwargs)
        self.character_steps = check_positive_int("character_steps", character_steps)
        self.wrong = self.add_variable(shape=(), initializer="zeros", name="wrong")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            # Keras hands sample weights only to `weighted_metrics`; in `metrics=` the recall
            # mask never arrives and every step would be scored as a recall.
            raise ValueError(
                "RecallError needs the recall mask as `sample_weight`, received None. In "
                "model.compile pass it as `weighted_metrics=[kspike.tasks.RecallError(...)]` "
                "(Keras gives sample weights only to `weighted_metrics`, not to `metrics`; "
                "kspike.Trainer(metrics=[...]) passes them), and feed (x, y, mask) batches as "
                "yielded by kspike.tasks.store_recall.")
        wrong, count = _recall_counts(y_true, y_pred, sample_weight, self.character_steps)
        self.wrong.assign_add(wrong)
        self.count.assign_add(count)

    def result(self):
        return tf.math.divide_no_nan(self.wrong, self.count)

    def reset_state(self):
        self.wrong.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "character_steps": self.character_steps}


@keras.saving.register_keras_serializable(package="kspike")
class RecallCrossEntropy(keras.losses.Loss):
    """LSNN's store-recall loss: softmax cross-entropy of the readout averaged over each recall
    character, averaged over the recall characters of the batch.

    Call with ``(y_true (B, T), y_pred (B, T, 2), sample_weight=recall mask (B, T))`` as yielded
    by ``store_recall``; returns a scalar. (A per-step cross-entropy with the mask as
    ``sample_weight`` also works, but Keras then divides by all B * T steps.)

    Args:
        character_steps: steps per character (character_ms / dt).
    """

    def __init__(self, character_steps, name="recall_cross_entropy", **kwargs):
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="none", **kwargs)
        self.character_steps = check_positive_int("character_steps", character_steps)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            raise ValueError("RecallCrossEntropy needs the recall mask as `sample_weight`.")
        y_pred = tf.convert_to_tensor(y_pred)
        s = self.character_steps
        batch, steps = tf.shape(y_pred)[0], tf.shape(y_pred)[1]
        logits = tf.reduce_mean(tf.reshape(y_pred, (batch, steps // s, s, -1)), axis=2)
        labels = tf.cast(y_true, tf.int32)[:, ::s]
        mask = tf.cast(tf.cast(sample_weight, tf.float32)[:, ::s] > 0, logits.dtype)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.math.divide_no_nan(tf.reduce_sum(ce * mask), tf.reduce_sum(mask))

    def call(self, y_true, y_pred):
        raise NotImplementedError("RecallCrossEntropy is called with the recall mask: "
                                  "loss(y_true, y_pred, sample_weight=mask).")

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        return {**config, "character_steps": self.character_steps}
