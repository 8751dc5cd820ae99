"""The two forms of two-pass e-prop give the same gradients (float64 round-off).

EProp(memory_flat=False) runs the second pass on stored state sequences: a per-neuron backward
recursion of the learning signals and one matmul per weight. EProp() (the default,
memory_flat=True) runs it with per-synapse eligibility traces forward in time (docs/eprop.md). Both are checked here
against each other, and in tests/test_eprop.py against autodiff of a stop-gradient network.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
import kspike.learning
import kspike.regularizers
from kspike import engine
from kspike import native as native_module
from kspike.learning import EProp
from test_eprop import _cells as single_layer_cells

RTOL64 = 1e-10


def _cells(kind):
    if kind in ("lif", "alif", "mixed"):
        return single_layer_cells(kind)
    init = dict(bias_initializer=keras.initializers.RandomNormal(0.0, 0.1, seed=5))
    if kind == "stacked":
        return [kspike.LIF(6, thr=0.03, n_refractory=1, seed=1),
                kspike.ALIF(5, n_adaptive=3, thr=0.03, beta=1.0, tau_adaptation=30.0, seed=2,
                            use_bias=True, **init)]
    if kind == "feedforward":
        return [kspike.ALIF(6, n_adaptive=3, thr=0.03, beta=0.8, tau_adaptation=30.0, seed=1,
                            recurrent=False)]
    raise AssertionError(kind)


def _model(kind, steps, n_in, n_out, dtype="float64", native="auto"):
    keras.config.set_dtype_policy(dtype)
    try:
        return keras.Sequential(
            [keras.Input((steps, n_in))]
            + [kspike.SpikingRNN(c, return_sequences=True, native=native) for c in _cells(kind)]
            + [kspike.LeakyReadout(n_out, tau=10.0)])
    finally:
        keras.config.set_dtype_policy("float32")


def _data(batch, steps, n_in, n_out, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant((rng.random((batch, steps, n_in)) < 0.3).astype(dtype))
    y = tf.constant(rng.standard_normal((batch, steps, n_out)).astype(dtype))
    weight = tf.constant(np.where(rng.random((batch, steps)) < 0.5, 1.0, 0.3).astype(dtype))
    return x, y, weight


def _relative(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)


def _assert_same(fast, flat, rtol):
    assert len(fast.gradients) == len(flat.gradients)
    for a, b in zip(fast.gradients, flat.gradients):
        assert a is not None and b is not None
        assert np.abs(b.numpy()).max() > 0
        assert _relative(a, b) <= rtol, _relative(a, b)
    np.testing.assert_allclose(fast.predictions.numpy(), flat.predictions.numpy(), rtol=rtol,
                               atol=1e-14)
    np.testing.assert_allclose(float(fast.loss), float(flat.loss), rtol=rtol)


@pytest.mark.parametrize("kind,feedback,online,regularized,weighted", [
    ("lif", "symmetric", False, False, False),
    ("alif", "random", True, False, True),
    ("mixed", "symmetric", True, True, True),
    ("mixed", "random", False, True, False),
    ("stacked", "symmetric", False, False, True),
    ("stacked", "random", True, True, False),
    ("feedforward", "symmetric", False, True, True),
])
def test_stored_state_form_equals_trace_form(kind, feedback, online, regularized, weighted):
    steps, n_in, n_out = 30, 5, 3
    model = _model(kind, steps, n_in, n_out)
    x, y, weight = _data(3, steps, n_in, n_out, "float64", seed=1)
    loss = keras.losses.MeanSquaredError()
    regularizers = ([kspike.regularizers.FiringRateRegularizer(target=20.0, strength=3.0)]
                    if regularized else [])
    kwargs = dict(sample_weight=weight if weighted else None, regularizers=regularizers)
    fast = EProp(feedback=feedback, seed=4, online=online, memory_flat=False).compute(model, x, y, loss, **kwargs)
    flat = EProp(feedback=feedback, seed=4, online=online, memory_flat=True).compute(
        model, x, y, loss, **kwargs)
    # The trace form with the other filter placement, too.
    other = EProp(feedback=feedback, seed=4, online=not online, memory_flat=True).compute(
        model, x, y, loss, **kwargs)
    _assert_same(fast, flat, RTOL64)
    _assert_same(fast, other, RTOL64)


def test_window_loss_and_adaptive_feedback_updates():
    """A loss coupling the steps (window-averaged cross-entropy) and adaptive feedback: the
    gradients and the trained feedback matrices agree."""
    steps, n_in, n_out = 25, 5, 3
    model = _model("stacked", steps, n_in, n_out)
    x, _, _ = _data(4, steps, n_in, n_out, "float64", seed=2)
    labels = tf.constant([0, 2, 1, 2])
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, y_pred):
        return xent(y_true, tf.reduce_mean(y_pred[:, -8:], axis=1))

    rules = [EProp(feedback="adaptive", seed=3, weight_decay=0.1, memory_flat=flat,
                   feedback_optimizer=keras.optimizers.SGD(0.5)) for flat in (False, True)]
    results = [rule.compute(model, x, labels, loss) for rule in rules]
    _assert_same(results[0], results[1], RTOL64)
    moved = 0.0
    for a, b in zip(*[rule.feedback_weights for rule in rules]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)
        moved += float(np.abs(a.numpy()).sum())
    assert moved > 0
    fresh = EProp(feedback="adaptive", seed=3)
    fresh.compute(model, x, labels, loss, training=False)
    assert any(np.abs(a.numpy() - b.numpy()).max() > 1e-6
               for a, b in zip(fresh.feedback_weights, rules[0].feedback_weights))


def test_float32_native_forward_matches_tensorflow_loop():
    """In float32 the stored-state form runs the native forward where it applies; its
    gradients match the TensorFlow loop (native=False) and the trace form to float32
    round-off."""
    reason = engine.why_not_native(_cells("mixed")[0], "float32", "float32", False)
    if reason is None and native_module.load() is None:
        reason = native_module.unavailable_reason()
    steps, n_in, n_out = 60, 5, 2
    x, y, weight = _data(4, steps, n_in, n_out, "float32", seed=3)
    results = {}
    for native in ("auto", False):
        model = _model("stacked", steps, n_in, n_out, dtype="float32", native=native)
        model.set_weights(results["auto"][1] if "auto" in results else model.get_weights())
        results[native] = (EProp(seed=4, memory_flat=False).compute(model, x, y, "mse", sample_weight=weight),
                           model.get_weights(), model)
    flat = EProp(seed=4, memory_flat=True).compute(results[False][2], x, y, "mse",
                                                   sample_weight=weight)
    for a, b, c in zip(results["auto"][0].gradients, results[False][0].gradients,
                       flat.gradients):
        assert _relative(a, b) <= 1e-5
        assert _relative(b, c) <= 1e-5
    # This machine builds the native loops (tests/test_native.py asserts it), so the
    # float32 run above went through the native forward.
    assert reason is None, f"native forward not exercised: {reason}"


def test_memory_flat_argument_and_config():
    with pytest.raises(TypeError, match="memory_flat"):
        EProp(memory_flat="yes")
    rule = EProp(feedback="random", seed=2, memory_flat=True)
    again = EProp.from_config(rule.get_config())
    assert again.memory_flat is True and again.get_config() == rule.get_config()
    assert EProp().memory_flat is True       # forward in time, memory independent of T
