"""Evidence accumulation task of e-prop (Bellec et al. 2020), generated on the fly.

40 input neurons in 4 groups of 10: left cue, right cue, recall cue, background noise. A trial
(2250 ms by default) starts with ``cue_spacing_ms - cue_ms`` = 50 ms of silence, then ``n_cues``
(7) cues of ``cue_ms`` (100 ms) every ``cue_spacing_ms`` (150 ms); each cue is a burst of the left
or the right group. Per trial one side is drawn at random to get cues with probability
``1 - minority_probability`` (0.7), the other side with 0.3. After ``delay_ms`` (1050 ms) the recall
group fires for the last ``recall_ms`` (150 ms) and the network must report the side that gave
more cues. Cue and recall groups fire at ``input_rate`` (40 Hz); the noise group fires throughout at
``noise_rate`` (10 Hz).
"""
import numpy as np
import tensorflow as tf

from kspike.tasks._common import (base_seed, check_positive_float, check_positive_int,
                                  check_probability, check_seed, generated_dataset, neuron_groups,
                                  numpy_rng, poisson_spikes, window_logits)

__all__ = ["evidence_accumulation", "generate_evidence_accumulation", "evidence_logits"]

_N_GROUPS = 4


def _steps(name, ms, dt):
    steps = ms / dt
    if abs(steps - round(steps)) > 1e-9:
        raise ValueError(f"`{name}`={ms} ms must be a whole number of time steps dt={dt} ms.")
    return int(round(steps))


def generate_evidence_accumulation(rng, batch_size=64, n_cues=7, cue_ms=100.0,
                                   cue_spacing_ms=150.0, delay_ms=1050.0, recall_ms=150.0,
                                   n_inputs=40, input_rate=40.0, noise_rate=10.0,
                                   minority_probability=0.3, dt=1.0):
    """The structure of one batch of the evidence accumulation task, as NumPy arrays (the
    Poisson spikes are drawn from it by ``evidence_accumulation``).

    Args:
        rng: a ``numpy.random.Generator``.
        Other arguments as in ``evidence_accumulation``.

    Returns:
        dict with "group_rates" (B, T, 4) float32 spike probability per step of each group
        (left, right, recall, noise), "y" (B,) int32 (0 left, 1 right),
        "cues" (B, n_cues) int32 side of each cue, "recall_steps" (int).
    """
    cue = _steps("cue_ms", cue_ms, dt)
    spacing = _steps("cue_spacing_ms", cue_spacing_ms, dt)
    delay = _steps("delay_ms", delay_ms, dt)
    recall = _steps("recall_ms", recall_ms, dt)
    silence = spacing - cue
    total = n_cues * spacing + delay + recall
    majority_side = rng.integers(0, 2, size=batch_size)
    p_right = np.where(majority_side == 1, 1.0 - minority_probability, minority_probability)
    cues = (rng.random((batch_size, n_cues)) < p_right[:, None]).astype(np.int32)
    p_cue = np.float32(input_rate * dt / 1000.0)
    group_rates = np.zeros((batch_size, total, _N_GROUPS), np.float32)
    for k in range(n_cues):
        start = silence + k * spacing
        group_rates[np.arange(batch_size), start:start + cue, cues[:, k]] = p_cue
    group_rates[:, total - recall:, 2] = p_cue
    group_rates[:, :, 3] = np.float32(noise_rate * dt / 1000.0)
    y = (cues.sum(axis=1) > n_cues // 2).astype(np.int32)
    return {"group_rates": group_rates, "y": y, "cues": cues, "recall_steps": recall}


def evidence_accumulation(batch_size=64, seed=None, n_cues=7, cue_ms=100.0, cue_spacing_ms=150.0,
                          delay_ms=1050.0, recall_ms=150.0, n_inputs=40, input_rate=40.0,
                          noise_rate=10.0, minority_probability=0.3, dt=1.0, n_batches=None,
                          rerandomize_each_iteration=True):
    """e-prop's evidence accumulation task as a ``tf.data.Dataset`` generated on the fly.

    Args:
        batch_size: trials per batch B.
        seed: integer seed; two datasets with the same seed give the same batches. None draws
            fresh randomness.
        n_cues: number of cues (odd, so a majority exists; e-prop: 7).
        cue_ms: duration of a cue in ms (100).
        cue_spacing_ms: onset-to-onset interval of cues in ms (150); the trial starts with
            cue_spacing_ms - cue_ms of silence.
        delay_ms: silence between the end of the cue period and the recall cue in ms (1050).
        recall_ms: duration of the recall cue in ms (150), read with ``evidence_logits``.
        n_inputs: input neurons (>= 4), in 4 groups (left, right, recall, noise).
        input_rate: rate of cue and recall groups in Hz (40).
        noise_rate: rate of the noise group in Hz (10).
        minority_probability: per-cue probability of the minority side (0.3).
        dt: time step in ms.
        n_batches: number of batches (None: endless).
        rerandomize_each_iteration: True draws new batches each time the dataset is iterated
            again (each epoch), reproducibly for a given seed; False repeats the same batches
            (a fixed validation set).

    Returns:
        ``tf.data.Dataset`` of (x float32 (B, T, n_inputs), y int32 (B,)) with
        T = (n_cues * cue_spacing_ms + delay_ms + recall_ms) / dt = 2250 by default.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    n_cues = check_positive_int("n_cues", n_cues)
    if n_cues % 2 == 0:
        raise ValueError(f"`n_cues` must be odd so that one side has a majority, received "
                         f"{n_cues}.")
    dt = check_positive_float("dt", dt)
    cue_ms = check_positive_float("cue_ms", cue_ms)
    cue_spacing_ms = check_positive_float("cue_spacing_ms", cue_spacing_ms)
    if cue_spacing_ms < cue_ms:
        raise ValueError(f"`cue_spacing_ms`={cue_spacing_ms} must be >= `cue_ms`={cue_ms}.")
    delay_ms = check_positive_float("delay_ms", delay_ms)
    recall_ms = check_positive_float("recall_ms", recall_ms)
    for name, ms in (("cue_ms", cue_ms), ("cue_spacing_ms", cue_spacing_ms),
                     ("delay_ms", delay_ms), ("recall_ms", recall_ms)):
        _steps(name, ms, dt)
    n_inputs = check_positive_int("n_inputs", n_inputs)
    if n_inputs < _N_GROUPS:
        raise ValueError(f"`n_inputs` must be >= 4 (four input groups), received {n_inputs}.")
    input_rate = check_positive_float("input_rate", input_rate)
    noise_rate = check_positive_float("noise_rate", noise_rate)
    for name, rate in (("input_rate", input_rate), ("noise_rate", noise_rate)):
        if rate * dt / 1000.0 > 1.0:
            raise ValueError(f"`{name}`={rate} Hz exceeds one spike per step of dt={dt} ms.")
    minority_probability = check_probability("minority_probability", minority_probability)
    n_batches = check_positive_int("n_batches", n_batches, allow_none=True)
    kwargs = dict(batch_size=batch_size, n_cues=n_cues, cue_ms=cue_ms,
                  cue_spacing_ms=cue_spacing_ms, delay_ms=delay_ms, recall_ms=recall_ms,
                  n_inputs=n_inputs, input_rate=input_rate, noise_rate=noise_rate,
                  minority_probability=minority_probability, dt=dt)
    steps = (n_cues * _steps("cue_spacing_ms", cue_spacing_ms, dt)
             + _steps("delay_ms", delay_ms, dt) + _steps("recall_ms", recall_ms, dt))

    neuron_group = tf.constant(neuron_groups(n_inputs, _N_GROUPS))

    def structure(seed_pair):
        data = generate_evidence_accumulation(numpy_rng(seed_pair), **kwargs)
        return data["group_rates"], data["y"]

    def make_batch(seed_pair):
        group_rates, y = tf.numpy_function(structure, [seed_pair], [tf.float32, tf.int32],
                                           stateful=False)
        group_rates.set_shape((batch_size, steps, _N_GROUPS))
        y.set_shape((batch_size,))
        x = poisson_spikes(seed_pair, tf.gather(group_rates, neuron_group, axis=2))
        return x, y

    return generated_dataset(make_batch, base_seed(seed), n_batches,
                             bool(rerandomize_each_iteration))


def evidence_logits(outputs, recall_steps=150):
    """Decision logits (B, 2) from a readout sequence (B, T, 2): the mean over the recall cue
    (the last ``recall_steps`` steps, recall_ms / dt)."""
    return window_logits(outputs, recall_steps)
