"""docs/coming_from_other_libraries.md: the snnTorch conversion it states (threshold and
surrogate) against a NumPy snnTorch-style Leaky neuron written from its update equations, and
its masking recipes against unpadded runs."""
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "coming_from_other_libraries.md")


def _snntorch_leaky(x, w, beta, theta):
    """mem_t = beta mem_{t-1} + x_t w - theta S_{t-1}, S_t = 1[mem_t > theta] (reset by
    subtraction), as snnTorch's Leaky neuron; x (T, n_in), returns spikes (T, n)."""
    mem = np.zeros(w.shape[1])
    spikes = np.zeros(w.shape[1])
    out = []
    for x_t in x:
        mem = beta * mem + x_t @ w - theta * spikes
        spikes = (mem > theta).astype(np.float64)
        out.append(spikes)
    return np.array(out)


def test_snntorch_leaky_converts_with_thr_times_one_minus_beta():
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(0)
    beta, theta, steps = 0.95, 1.0, 200
    x = (rng.random((steps, 10)) < 0.2).astype(np.float64)
    w = rng.normal(0.0, 0.6, size=(10, 7))
    expected = _snntorch_leaky(x, w, beta, theta)
    assert 0.02 < expected.mean() < 0.5                  # the comparison is not all-silent
    cell = kspike.LIF(7, tau=-1.0 / math.log(beta), thr=(1 - beta) * theta, recurrent=False,
                      input_initializer=keras.initializers.Constant(w))
    z = keras.layers.RNN(cell, return_sequences=True)(x[None])
    np.testing.assert_array_equal(np.asarray(z)[0], expected)
    # Without the conversion (thr = theta, the snnTorch number) kspike stays almost silent.
    plain = kspike.LIF(7, tau=-1.0 / math.log(beta), thr=theta, recurrent=False,
                       input_initializer=keras.initializers.Constant(w))
    assert np.asarray(keras.layers.RNN(plain, return_sequences=True)(x[None])).sum() \
        < 0.1 * expected.sum()


def test_snntorch_fast_sigmoid_converts_to_threshold_scaled_surrogate():
    beta, theta, slope = 0.9, 1.5, 25.0
    mem = tf.constant(np.linspace(0.0, 3.0, 61), tf.float64)
    f = kspike.surrogates.get("fast_sigmoid", dampening=theta, sharpness=slope * theta / 2)
    A = (1 - beta) * theta
    with tf.GradientTape() as tape:
        tape.watch(mem)
        v = (1 - beta) * mem                                  # kspike's voltage
        z = f((v - A) / A)
    grad = tape.gradient(z, mem).numpy()
    expected = 1.0 / (1.0 + slope * np.abs(mem.numpy() - theta)) ** 2
    np.testing.assert_allclose(grad, expected, rtol=1e-12)
    np.testing.assert_array_equal(z.numpy(), (mem.numpy() > theta).astype(float))


def _masking_case():
    rng = np.random.default_rng(0)
    steps, lengths = 30, [30, 20]
    x = (rng.random((2, steps, 3)) < 0.15).astype("float32")
    assert np.all((x.sum(-1) == 0).sum(1) > 10)               # many silent steps
    return x, lengths


def _cell():
    return kspike.ALIF(4, n_adaptive=2, thr=0.05, output="all", seed=3)


def _unpadded(x, lengths):
    return [np.asarray(keras.layers.RNN(_cell(), return_sequences=True)(x[b:b + 1, :n]))[0]
            for b, n in enumerate(lengths)]


def test_minus_one_padding_and_boolean_mask_give_the_unpadded_outputs():
    x, lengths = _masking_case()
    reference = _unpadded(x, lengths)
    padded = x.copy()
    padded[1, lengths[1]:] = -1.0
    model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Masking(mask_value=-1.0),
                              keras.layers.RNN(_cell(), return_sequences=True)])
    zeros = x.copy()
    zeros[1, lengths[1]:] = 0.0
    mask = np.arange(x.shape[1])[None] < np.array(lengths)[:, None]
    outputs = {"Masking(-1.0)": np.asarray(model(padded)),
               "RNN mask=": np.asarray(keras.layers.RNN(_cell(), return_sequences=True)(
                   zeros, mask=mask)),
               "SpikingRNN mask=": np.asarray(kspike.SpikingRNN(_cell(), return_sequences=True)(
                   zeros, mask=mask))}
    for name, out in outputs.items():
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(out[b, :n], reference[b], err_msg=name)
        # Padded steps repeat the last real output.
        np.testing.assert_array_equal(out[1, lengths[1]:], np.repeat(
            reference[1][-1:], x.shape[1] - lengths[1], axis=0), err_msg=name)


def test_masking_zero_on_spike_trains_freezes_silent_steps():
    x, lengths = _masking_case()
    reference = _unpadded(x, lengths)
    zeros = x.copy()
    zeros[1, lengths[1]:] = 0.0
    model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Masking(mask_value=0.0),
                              keras.layers.RNN(_cell(), return_sequences=True)])
    out = np.asarray(model(zeros))
    units = 4
    v = out[0, :, units:2 * units]
    silent = np.flatnonzero(x[0].sum(-1) == 0)
    t = silent[silent > 0][0]
    # A masked silent step copies the voltage instead of letting it leak.
    np.testing.assert_array_equal(v[t], v[t - 1])
    assert not np.allclose(reference[0][t, units:2 * units], reference[0][t - 1, units:2 * units])
    assert not np.array_equal(out[0], reference[0])


def test_the_pitfalls_are_documented_where_users_look():
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    for statement in ("(1 - alpha)", "thr = (1 - b) * theta", "(v - A) / A",
                      "Masking(mask_value=-1.0)", "mask=", "Masking(0.0)"):
        assert statement in page, statement
    for cls in (kspike.LIF, kspike.ALIF):
        doc = cls.__doc__
        assert "Masking(0.0)" in doc and "docs/coming_from_other_libraries.md" in doc
        assert "(1 - alpha)" in doc
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "docs/coming_from_other_libraries.md" in f.read()
