"""Single-pass e-prop with the per-synapse traces in the native op (``EProp(single_pass=True)``,
``native="auto"`` or True; kspike/native/spiking_ops.cc ``KspikeEpropTraces``).

The op runs in float32 and float64. In float64 its gradients must equal those of the
TensorFlow loop of the single pass (``native=False``, itself checked against two passes and the
independent stop-gradient network in tests/test_eprop_online.py) and, for symmetric feedback,
the autodiff gradient of the independent network of tests/test_eprop.py, to 1e-10. In float32
(the native forward op and the float32 op) they are compared with the float64 TensorFlow loop
of the same weights. The chunk length is set small so that every case crosses several chunk
boundaries, one of them partial; the wide layers cover the op's SIMD blocks and their
narrower last block, for plain and for adaptive neurons.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
import kspike.learning
import kspike.regularizers
from kspike import native
from kspike.learning import EProp
from kspike.learning import eprop as eprop_module

from test_eprop import build_model, flat_reference, inputs, reference_forward, reference_variables
from test_eprop_online import _cells as small_cells
from test_eprop_online import _compare, _task

RTOL64 = 1e-10
# float32 against float64: the traces sum ~T terms of float32 round-off (relative ~1e-7 each).
RTOL32 = 5e-6

pytestmark = pytest.mark.skipif(not native.available(), reason="the native ops do not build here")


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    monkeypatch.setattr(eprop_module, "_CHUNK_STEPS", 7)


def _cells(kind):
    init = dict(bias_initializer=keras.initializers.RandomNormal(0.0, 0.1, seed=5))
    if kind == "wide":
        # 19 plain + 21 adaptive neurons: full SIMD blocks and a narrower last one of each.
        return [kspike.ALIF(40, n_adaptive=21, thr=0.03, beta=0.8, tau_adaptation=40.0,
                            n_refractory=2, seed=3, use_bias=True, **init)]
    if kind == "wide_lif":
        return [kspike.LIF(20, thr=0.03, seed=4, use_bias=True, **init)]
    return small_cells(kind)


CASES = [("lif", "regression", "symmetric", False),
         ("alif", "classification", "symmetric", False),
         ("mixed", "classification", "random", True),
         ("stacked", "regression", "random", True),
         ("stacked", "classification", "adaptive", False),
         ("wide", "regression", "symmetric", True),
         ("wide", "categorical", "adaptive", False),
         ("wide_lif", "binary", "random", True)]


def _regularizers(regularized):
    if not regularized:
        return []
    return [kspike.regularizers.FiringRateRegularizer(target=20.0, strength=3.0)]


def _both(model, x, y, loss, weight, regularized, feedback):
    """(native result, TensorFlow-loop result, the two rules)."""
    rules = [EProp(feedback=feedback, seed=7, single_pass=True, native=native_)
             for native_ in (True, False)]
    results = [rule.compute(model, x, y, loss, sample_weight=weight,
                            regularizers=_regularizers(regularized)) for rule in rules]
    return results[0], results[1], rules


@pytest.mark.parametrize("kind,task,feedback,regularized", CASES)
def test_native_equals_tensorflow_loop_float64(kind, task, feedback, regularized):
    keras.config.set_dtype_policy("float64")
    try:
        batch, steps, n_in, n_out = 3, 30, 5, 3
        model = build_model(_cells(kind), n_in, steps, n_out)
        x = inputs(batch, steps, n_in, 0.3, "float64")
        loss, y, weight = _task(task, batch, steps, n_out, "float64")
        got, want, rules = _both(model, x, y, loss, weight, regularized, feedback)
    finally:
        keras.config.set_dtype_policy("float32")
    error = _compare(got.gradients, want.gradients, RTOL64)
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-13)
    np.testing.assert_allclose(got.predictions.numpy(), want.predictions.numpy(), rtol=1e-13,
                               atol=1e-13)
    if feedback == "adaptive":
        # Both rules moved their feedback matrices by the same gradient.
        for a, b in zip(rules[0].feedback_weights, rules[1].feedback_weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
    print(f"{kind}/{task}/{feedback}/reg={regularized}: float64 relative error {error:.2e}")


@pytest.mark.parametrize("kind,task", [("wide", "classification"), ("wide_lif", "regression")])
def test_native_equals_independent_autodiff(kind, task):
    """Symmetric feedback: the native single pass against autodiff of the independent
    stop-gradient network (tests/test_eprop.py), the loss called on the whole sequence."""
    keras.config.set_dtype_policy("float64")
    try:
        batch, steps, n_in, n_out = 3, 40, 5, 3
        model = build_model(_cells(kind), n_in, steps, n_out)
        x = inputs(batch, steps, n_in, 0.3, "float64", seed=2)
        loss, y, weight = _task(task, batch, steps, n_out, "float64", seed=2)
        result = EProp(single_pass=True, native=True).compute(model, x, y, loss,
                                                              sample_weight=weight)
        layers, readout = reference_variables(model)
        with tf.GradientTape() as tape:
            prediction, spikes = reference_forward(x, layers, readout)
            value = loss(y, prediction, sample_weight=weight)
        want = tape.gradient(value, flat_reference(layers, readout))
    finally:
        keras.config.set_dtype_policy("float32")
    assert float(tf.reduce_sum(spikes[0])) > 10, "the test network must spike"
    np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-13)
    want = [w * (1.0 - np.eye(w.shape[0])) if "recurrent_kernel" in v.path else w
            for w, v in zip(want, model.trainable_variables)]
    _compare(result.gradients, want, RTOL64)


@pytest.mark.parametrize("kind,task,regularized", [("wide", "regression", True),
                                                   ("wide", "classification", False),
                                                   ("stacked", "regression", True)])
def test_native_float32_against_float64(kind, task, regularized):
    """The float32 path (native forward op, float32 trace op) against the float64 TensorFlow
    loop of the same weights."""
    batch, steps, n_in, n_out = 4, 40, 5, 3
    model32 = build_model(_cells(kind), n_in, steps, n_out)
    keras.config.set_dtype_policy("float64")
    try:
        model64 = build_model(_cells(kind), n_in, steps, n_out)
        model64.set_weights([w.astype("float64") for w in model32.get_weights()])
        x64 = inputs(batch, steps, n_in, 0.3, "float64", seed=3)
        loss64, y64, weight64 = _task(task, batch, steps, n_out, "float64", seed=3)
        want = EProp(feedback="random", seed=2, single_pass=True, native=False).compute(
            model64, x64, y64, loss64, sample_weight=weight64,
            regularizers=_regularizers(regularized))
    finally:
        keras.config.set_dtype_policy("float32")
    loss32, y32, weight32 = _task(task, batch, steps, n_out, "float32", seed=3)
    got = EProp(feedback="random", seed=2, single_pass=True, native=True).compute(
        model32, tf.cast(x64, tf.float32), y32, loss32, sample_weight=weight32,
        regularizers=_regularizers(regularized))
    assert got.gradients[0].dtype == tf.float32
    error = _compare(got.gradients, want.gradients, RTOL32)
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
    print(f"float32 {kind}/{task}: relative error {error:.2e} against float64")


def test_rewired_and_input_only_layers():
    """DEEP R kernels (connectivity < 1: gradients reach the magnitudes through the effective
    kernel) and a recurrent=False layer, native against the TensorFlow loop in float64."""
    keras.config.set_dtype_policy("float64")
    try:
        batch, steps, n_in, n_out = 3, 30, 5, 2
        model = build_model([kspike.LIF(18, thr=0.03, recurrent=False, seed=1),
                             kspike.ALIF(20, n_adaptive=10, thr=0.03, connectivity=0.5,
                                         seed=2)], n_in, steps, n_out)
        x = inputs(batch, steps, n_in, 0.4, "float64", seed=9)
        loss, y, weight = _task("regression", batch, steps, n_out, "float64", seed=9)
        got, want, _ = _both(model, x, y, loss, weight, False, "random")
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.layers[1].cell._rewired
    _compare(got.gradients, want.gradients, RTOL64)


def test_chunk_longer_than_the_sequence(monkeypatch):
    """One partial chunk (the default 64 steps against T = 20)."""
    monkeypatch.setattr(eprop_module, "_CHUNK_STEPS", 64)
    keras.config.set_dtype_policy("float64")
    try:
        model = build_model(_cells("wide"), 5, 20, 2)
        x = inputs(2, 20, 5, 0.3, "float64", seed=4)
        loss, y, weight = _task("regression", 2, 20, 2, "float64", seed=4)
        got, want, _ = _both(model, x, y, loss, weight, True, "symmetric")
    finally:
        keras.config.set_dtype_policy("float32")
    _compare(got.gradients, want.gradients, RTOL64)


def test_native_argument():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="`native` must be True, False or 'auto'"):
            EProp(native=bad)
    assert EProp().native == "auto"
    rule = EProp(single_pass=True, native=False)
    assert EProp.from_config(rule.get_config()).native is False
    steps = 10
    model = keras.Sequential([keras.Input((steps, 3)),
                              kspike.SpikingRNN(kspike.LIF(4, seed=0), return_sequences=True,
                                                native=False),
                              kspike.LeakyReadout(2, seed=1)])
    x = inputs(2, steps, 3, 0.3, "float32")
    y = tf.zeros((2, steps, 2))
    with pytest.raises(ValueError, match="native=False"):
        EProp(single_pass=True, native=True).compute(model, x, y, "mse")
    # "auto" runs the TensorFlow loop for that layer.
    auto = EProp(single_pass=True).compute(model, x, y, "mse")
    loop = EProp(single_pass=True, native=False).compute(model, x, y, "mse")
    _compare(auto.gradients, loop.gradients, 0.0)
