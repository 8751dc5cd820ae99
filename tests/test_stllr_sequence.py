"""S-TLLR's default form (the stored sequences, per-neuron filters and one matmul per kernel)
against its step-by-step form ``STLLR(online=True)``: equal to float64 round-off on kspike's
TensorFlow loop, and to float32 round-off on the native C++ forward loop."""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
import kspike.learning
from kspike.learning import STLLR

pytestmark = pytest.mark.heavy(70)


def make_model(dtype, layer_type, layers, lif, n_ref, steps=30, n_in=6):
    keras.utils.set_random_seed(0)
    stack = [keras.Input((steps, n_in), dtype=dtype)]
    for i in range(layers):
        if lif:
            cell = kspike.LIF(10, thr=0.05, n_refractory=n_ref, seed=i, dtype=dtype)
        else:
            cell = kspike.ALIF(10, n_adaptive=5, thr=0.05, n_refractory=n_ref, seed=i,
                               dtype=dtype)
        stack.append(layer_type(cell, return_sequences=True))
    stack.append(kspike.LeakyReadout(3, seed=9, dtype=dtype))
    return keras.Sequential(stack)


def data(dtype, steps=30, n_in=6):
    rng = np.random.default_rng(0)
    x = (rng.random((4, steps, n_in)) < 0.3).astype(dtype)
    y = rng.standard_normal((4, steps, 3)).astype(dtype)
    return tf.constant(x), tf.constant(y)


def both_forms(model, x, y, regularizers=(), **kwargs):
    out = []
    for online in (True, False):
        rule = STLLR(online=online, seed=3, **kwargs)
        out.append(rule.compute(model, x, y, "mse", regularizers=regularizers))
    return out


def assert_same(reference, fast, rtol):
    np.testing.assert_allclose(fast.predictions.numpy(), reference.predictions.numpy(),
                               rtol=rtol, atol=rtol)
    np.testing.assert_allclose(float(fast.loss), float(reference.loss), rtol=rtol)
    for g_ref, g in zip(reference.gradients, fast.gradients):
        g_ref, g = np.asarray(g_ref), np.asarray(g)
        scale = np.max(np.abs(g_ref))
        assert scale > 0.0
        np.testing.assert_allclose(g, g_ref, rtol=0.0, atol=rtol * scale)


@pytest.mark.parametrize("layer_type,layers,lif,n_ref", [
    (kspike.SpikingRNN, 1, False, 0), (kspike.SpikingRNN, 2, False, 2),
    (keras.layers.RNN, 1, True, 0), (keras.layers.RNN, 2, True, 1)])
@pytest.mark.parametrize("feedback,last_steps,factors,psi", [
    ("bp", None, (0.2, 0.75, -1.0, 1.0), None),
    ("bp", 7, (0.5, 1.0, 1.0, 1.0), "surrogate"),
    ("dfa", 12, (0.3, 0.9, -0.5, 2.0), None)])
def test_sequence_form_equals_online_float64(layer_type, layers, lif, n_ref, feedback,
                                             last_steps, factors, psi):
    model = make_model("float64", layer_type, layers, lif, n_ref)
    x, y = data("float64")
    reference, fast = both_forms(model, x, y, factors=factors, last_steps=last_steps,
                                 feedback=feedback, secondary_activation=psi)
    assert_same(reference, fast, 1e-12)


def test_sequence_form_regularizer_float64():
    model = make_model("float64", kspike.SpikingRNN, 2, False, 0)
    x, y = data("float64")
    reg = kspike.regularizers.FiringRateRegularizer(target=50.0, strength=2.0)
    reference, fast = both_forms(model, x, y, regularizers=(reg,), last_steps=9)
    assert_same(reference, fast, 1e-12)


def test_sequence_form_native_float32():
    """float32 SpikingRNN: the stored-sequence form (online=False) runs kspike's native
    forward loop."""
    from kspike import native
    assert native.available(), native.unavailable_reason()
    model = make_model("float32", kspike.SpikingRNN, 2, False, 0)
    x, y = data("float32")
    for last_steps in (None, 5):
        reference, fast = both_forms(model, x, y, last_steps=last_steps,
                                     secondary_activation="surrogate")
        assert_same(reference, fast, 2e-5)


def test_online_argument():
    with pytest.raises(TypeError, match="online"):
        STLLR(online="yes")
    rule = STLLR(online=True)
    assert STLLR.from_config(rule.get_config()).online is True
    assert STLLR().online is True      # forward in time, memory independent of T


def test_online_chunks_native_float32(monkeypatch):
    """Native float32 layers, the online form in chunks of 8 steps (30 steps: the last chunk
    has 6), with and without last_steps, against the stored-sequence form."""
    from kspike.learning import stllr as stllr_module
    monkeypatch.setattr(stllr_module, "_CHUNK_STEPS", 8)
    model = make_model("float32", kspike.SpikingRNN, 2, False, 2)
    x, y = data("float32")
    for last_steps in (None, 11):
        reference, fast = both_forms(model, x, y, last_steps=last_steps)
        assert_same(reference, fast, 2e-5)


@pytest.mark.parametrize("kind", ["mse", "sparse_ce"])
def test_single_pass_for_per_step_losses_equals_two_passes(monkeypatch, kind):
    """STLLR() with a per-step loss (here with a (B, T) sample weight) and no regulariser
    forms outputs, errors and gradient in one chunked pass; the same loss hidden in a plain
    function takes the two passes. Equal to float64 round-off, chunks of 8 steps."""
    from kspike.learning import stllr as stllr_module
    monkeypatch.setattr(stllr_module, "_CHUNK_STEPS", 8)
    model = make_model("float64", keras.layers.RNN, 2, False, 1)
    x, y = data("float64")
    weight = np.ones((4, 30))
    weight[:, :12] = 0.0
    weight[1, 20:] = 0.5
    weight = tf.constant(weight)
    if kind == "mse":
        loss = keras.losses.MeanSquaredError(dtype="float64")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
        y = tf.constant(np.random.default_rng(5).integers(0, 3, (4, 30)))
    plain = lambda y_true, y_pred, sample_weight=None: loss(y_true, y_pred,
                                                           sample_weight=sample_weight)
    calls = []
    outputs_pass = stllr_module._chunked_outputs
    monkeypatch.setattr(stllr_module, "_chunked_outputs",
                        lambda *a: calls.append(1) or outputs_pass(*a))
    rule = STLLR(seed=3, last_steps=17)
    single = rule.compute(model, x, y, loss, sample_weight=weight)
    assert not calls                                   # no separate outputs pass
    two = rule.compute(model, x, y, plain, sample_weight=weight)
    assert calls
    assert_same(two, single, 1e-12)
    np.testing.assert_allclose(float(single.loss), float(loss(y, two.predictions,
                                                              sample_weight=weight)),
                               rtol=1e-12)
