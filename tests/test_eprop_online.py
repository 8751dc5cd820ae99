"""Single-pass e-prop (``EProp(single_pass=True)``): network, readout, per-step output error,
filtered eligibility traces and gradients in one loop.

Its gradients must equal those of the two-pass computation (itself checked against autodiff of an
independently written network in tests/test_eprop.py) and, for symmetric feedback, the autodiff
gradient of that independent network directly. The float64 cases build their losses with
``dtype="float64"``: a Keras loss computes in ``keras.config.floatx()`` (float32) otherwise, and
the round-off of the float32 slices would hide the float64 agreement.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
import kspike.learning
import kspike.regularizers
from kspike.learning import EProp

from test_eprop import _cells as single_layer_cells
from test_eprop import (build_model, flat_reference, inputs, reference_forward,
                        reference_variables)

RTOL64 = 1e-10
RTOL32 = 1e-5


def _cells(kind):
    if kind == "stacked":
        return [kspike.LIF(6, thr=0.03, n_refractory=1, seed=1),
                kspike.ALIF(5, n_adaptive=2, thr=0.03, beta=1.0, tau_adaptation=30.0, seed=2)]
    return single_layer_cells(kind)


def _recall_mask(batch, steps, last=10):
    return np.where(np.arange(steps) >= steps - last, 1.0, 0.0)[None].repeat(batch, 0)


def _task(task, batch, steps, n_out, dtype, seed=1):
    """(loss, targets (B, T, ...), sample_weight (B, T) or None)."""
    rng = np.random.default_rng(seed)
    mask = tf.constant(_recall_mask(batch, steps), dtype)
    if task == "regression":
        # MSE per step on the recall steps only (store-recall style mask).
        return (keras.losses.MeanSquaredError(dtype=dtype),
                tf.constant(rng.standard_normal((batch, steps, n_out)), dtype), mask)
    labels = np.repeat(rng.integers(0, n_out, (batch, 1)), steps, axis=1)
    if task == "classification":
        # Per-step sparse cross-entropy on a cue window.
        return (keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype),
                tf.constant(labels), mask)
    if task == "categorical":
        return (keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1,
                                                     dtype=dtype),
                tf.constant(np.eye(n_out)[labels], dtype), None)
    if task == "binary":
        return (keras.losses.BinaryCrossentropy(from_logits=True, dtype=dtype),
                tf.constant(rng.random((batch, steps, n_out)) < 0.5, dtype), mask)
    raise AssertionError(task)


def _compare(got, want, rtol):
    worst = 0.0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g is not None and w is not None
        g, w = np.asarray(g), np.asarray(w)
        scale = np.abs(w).max()
        assert scale > 0
        worst = max(worst, np.abs(g - w).max() / scale)
    assert worst <= rtol, f"relative error {worst:.3g} > {rtol}"
    return worst


CASES = [("lif", "regression", "symmetric", False),
         ("alif", "classification", "symmetric", False),
         ("mixed", "classification", "random", True),
         ("mixed", "regression", "symmetric", True),
         ("stacked", "regression", "random", True),
         ("stacked", "classification", "symmetric", False),
         ("mixed", "categorical", "symmetric", False),
         ("alif", "binary", "random", False)]


@pytest.mark.parametrize("kind,task,feedback,regularized", CASES)
def test_single_pass_equals_two_passes_float64(kind, task, feedback, regularized):
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 40, 5, 3
    model = build_model(_cells(kind), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64")
    loss, y, weight = _task(task, batch, steps, n_out, "float64")
    regularizers = ([kspike.regularizers.FiringRateRegularizer(target=20.0, strength=3.0)]
                    if regularized else [])
    two = EProp(feedback=feedback, seed=7).compute(model, x, y, loss, sample_weight=weight,
                                                   regularizers=regularizers)
    rule = EProp(feedback=feedback, seed=7, single_pass=True)
    assert rule.uses_single_pass(model, x, y, loss, sample_weight=weight)
    one = rule.compute(model, x, y, loss, sample_weight=weight, regularizers=regularizers)
    np.testing.assert_allclose(one.predictions.numpy(), two.predictions.numpy(), rtol=0,
                               atol=1e-13)
    np.testing.assert_allclose(float(one.loss), float(two.loss), rtol=1e-13)
    error = _compare(one.gradients, two.gradients, RTOL64)
    for name, rate in two.logs.items():
        np.testing.assert_allclose(float(one.logs[name]), float(rate), rtol=1e-13)
    print(f"{kind}/{task}/{feedback}/reg={regularized}: float64 relative error {error:.2e}")


@pytest.mark.parametrize("kind,task", [("mixed", "classification"), ("lif", "regression")])
def test_single_pass_equals_independent_autodiff(kind, task):
    """Symmetric single-pass e-prop against autodiff of tests/test_eprop.py's independent
    stop-gradient network, with the loss called once on the whole sequence."""
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 40, 5, 3
    model = build_model(_cells(kind), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64", seed=2)
    loss, y, weight = _task(task, batch, steps, n_out, "float64", seed=2)
    result = EProp(single_pass=True).compute(model, x, y, loss, sample_weight=weight)
    layers, readout = reference_variables(model)
    with tf.GradientTape() as tape:
        prediction, spikes = reference_forward(x, layers, readout)
        value = loss(y, prediction, sample_weight=weight)
    want = tape.gradient(value, flat_reference(layers, readout))
    assert float(tf.reduce_sum(spikes[0])) > 10, "the test network must spike"
    np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-13)
    # The reference keeps the diagonal of W_rec; kspike's recurrent kernel has none.
    want = [w * (1.0 - np.eye(w.shape[0])) if "recurrent_kernel" in v.path else w
            for w, v in zip(want, model.trainable_variables)]
    _compare(result.gradients, want, RTOL64)


def test_single_pass_float32():
    batch, steps, n_in, n_out = 4, 60, 6, 2
    model = build_model(_cells("mixed"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float32", seed=3)
    for task in ("regression", "classification"):
        loss, y, weight = _task(task, batch, steps, n_out, "float32", seed=3)
        regularizers = [kspike.regularizers.FiringRateRegularizer(target=20.0, strength=3.0)]
        two = EProp().compute(model, x, y, loss, sample_weight=weight, regularizers=regularizers)
        one = EProp(single_pass=True).compute(model, x, y, loss, sample_weight=weight,
                                              regularizers=regularizers)
        error = _compare(one.gradients, two.gradients, RTOL32)
        np.testing.assert_allclose(float(one.loss), float(two.loss), rtol=1e-6)
        print(f"float32 {task}: relative error {error:.2e}")


@pytest.mark.parametrize("reduction,weight_shape", [("sum", "BT"),
                                                    ("mean_with_sample_weight", "BT"),
                                                    ("sum_over_batch_size", "BT1"),
                                                    ("mean_with_sample_weight", None)])
def test_reductions_and_sample_weight_shapes(reduction, weight_shape):
    """Keras' reductions rescaled exactly from one step's slice to the whole sequence: "sum"
    adds, "sum_over_batch_size" divides by B*T entries, "mean_with_sample_weight" by the sum of
    the weights; weights (B, T) or (B, T, 1)."""
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 30, 5, 2
    model = build_model(_cells("mixed"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64", seed=4)
    rng = np.random.default_rng(4)
    y = tf.constant(rng.standard_normal((batch, steps, n_out)))
    weight = {"BT": tf.constant(rng.random((batch, steps)) * _recall_mask(batch, steps, 20)),
              "BT1": tf.constant(rng.random((batch, steps, 1))), None: None}[weight_shape]
    loss = keras.losses.MeanSquaredError(reduction=reduction, dtype="float64")
    two = EProp().compute(model, x, y, loss, sample_weight=weight)
    one = EProp(single_pass=True).compute(model, x, y, loss, sample_weight=weight)
    # The loss value as Keras computes it on the whole sequence (independent of both passes).
    value = loss(y, two.predictions, sample_weight=weight)
    np.testing.assert_allclose(float(one.loss), float(value), rtol=1e-13)
    _compare(one.gradients, two.gradients, RTOL64)


def test_adaptive_feedback_single_pass():
    """Adaptive feedback: the same gradients and the same update of B as two passes."""
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 25, 5, 2
    model = build_model(_cells("stacked"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.4, "float64", seed=6)
    loss, y, weight = _task("regression", batch, steps, n_out, "float64", seed=6)
    results, feedback = [], []
    for single in (False, True):
        rule = EProp(feedback="adaptive", seed=3, weight_decay=0.1, single_pass=single,
                     feedback_optimizer=keras.optimizers.SGD(0.5))
        results.append(rule.compute(model, x, y, loss, sample_weight=weight))
        feedback.append([w.numpy() for w in rule.feedback_weights])
    _compare(results[1].gradients, results[0].gradients, RTOL64)
    for a, b in zip(feedback[1], feedback[0]):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    initial = kspike.learning.online.random_feedback(3, [w.shape for w in feedback[0]],
                                                      "float64")
    assert all(np.abs(a - i).max() > 1e-6 for a, i in zip(feedback[1], initial)), \
        "the adaptive feedback matrices must move"


def test_loss_names_and_trainer():
    """A loss name works as the object it names, and kspike.Trainer's wrapped loss (a name
    turned into a Keras loss, unscaled for distribution) is recognised as per-step."""
    batch, steps, n_in, n_out = 4, 30, 4, 2
    model = build_model([kspike.LIF(10, thr=0.03, seed=0)], n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float32", seed=7)
    y = tf.constant(np.random.default_rng(7).standard_normal((batch, steps, n_out)),
                    tf.float32)
    rule = EProp(single_pass=True)
    by_name = rule.compute(model, x, y, "mse")
    by_object = EProp().compute(model, x, y, keras.losses.MeanSquaredError())
    _compare(by_name.gradients, by_object.gradients, RTOL32)
    trainer = kspike.Trainer(model, keras.optimizers.Adam(0.01), "mse", rule=rule)
    assert rule.uses_single_pass(model, x, y, trainer.loss)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    history = trainer.fit(ds, steps=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_losses_that_are_not_per_step():
    steps, n_in, n_out = 12, 3, 2
    model = build_model([kspike.LIF(5, thr=0.03, seed=0)], n_in, steps, n_out)
    x = inputs(2, steps, n_in, 0.3, "float32")
    labels = tf.constant([0, 1])
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def window_loss(y_true, y_pred):      # CE of the logits averaged over a window
        return xent(y_true, tf.reduce_mean(y_pred[:, -4:], axis=1))

    sequence = tf.zeros((2, steps), tf.int32)
    bad = [(window_loss, labels, None, "not a per-step loss"),
           (xent, labels, None, "no time axis"),
           (xent, tf.zeros((2, steps + 1), tf.int32), None, "time steps of the inputs"),
           (keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
            sequence, None, "ignore_class"),
           (keras.losses.CategoricalCrossentropy(axis=1), tf.zeros((2, steps, n_out)), None,
            "axis=1"),
           (keras.losses.MeanSquaredError(reduction=None), tf.zeros((2, steps, n_out)), None,
            "scalar"),
           (xent, sequence, tf.ones((2, steps, 2)), "sample_weight of shape"),
           (xent, sequence, tf.ones((2,)), "sample_weight of shape (2,)"),
           (keras.losses.MeanSquaredError(), tf.zeros((2, steps)), None, "like the outputs")]
    for loss, y, weight, reason in bad:
        with pytest.raises(ValueError, match="single_pass=True") as info:
            EProp(single_pass=True).compute(model, x, y, loss, sample_weight=weight)
        assert reason in str(info.value), str(info.value)
        assert not EProp(single_pass="auto").uses_single_pass(model, x, y, loss, weight)
    # "auto" runs two passes for the window loss, with the two-pass gradient.
    auto = EProp(single_pass="auto").compute(model, x, labels, window_loss)
    _compare(auto.gradients, EProp().compute(model, x, labels, window_loss).gradients, 1e-7)
    assert EProp(single_pass="auto").uses_single_pass(model, x, sequence, xent)
    assert not EProp().uses_single_pass(model, x, sequence, xent)
    with pytest.raises(ValueError, match="'cross_entropy_of_sorts' is not a Keras loss name"):
        EProp(single_pass=True).compute(model, x, sequence, "cross_entropy_of_sorts")


def test_single_pass_argument_and_config():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="`single_pass` must be True, False or 'auto'"):
            EProp(single_pass=bad)
    for value in (True, False, "auto"):
        rule = EProp(feedback="random", seed=2, single_pass=value)
        assert rule.get_config()["single_pass"] == value
        assert EProp.from_config(rule.get_config()).get_config() == rule.get_config()
    assert EProp().single_pass is False
