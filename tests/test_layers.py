"""LeakyReadout and leaky_filter against NumPy (docs/neurons.md, leaky readout)."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike.layers import leaky_filter


def numpy_readout(z, w_out, b_out, tau, dt, zhat0=None):
    """zhat_t = kappa zhat_{t-1} + (1 - kappa) z_t ; y_t = zhat_t W_out + b_out, in float64."""
    kappa = np.exp(-dt / tau)
    zhat = np.zeros((z.shape[0], z.shape[2])) if zhat0 is None else zhat0
    ys = []
    for t in range(z.shape[1]):
        zhat = kappa * zhat + (1 - kappa) * z[:, t]
        ys.append(zhat @ w_out + (0 if b_out is None else b_out))
    return np.stack(ys, 1)


def _readout(units, tau, dt=1.0, use_bias=True, n_in=4):
    layer = kspike.LeakyReadout(units, tau=tau, dt=dt, use_bias=use_bias,
                                bias_initializer=keras.initializers.RandomNormal(seed=1), seed=2)
    layer.build((None, None, n_in))
    return layer


@pytest.mark.parametrize("steps", [1, 300, 2048, 2500])
def test_matches_numpy(steps):
    # steps <= 2048 use the (T, T) Toeplitz matmul, longer sequences the scan.
    rng = np.random.default_rng(steps)
    n_in = 6 if steps <= 300 else 2
    z = (rng.uniform(size=(2, steps, n_in)) < 0.2).astype("float32")
    layer = _readout(3, tau=15.0, dt=0.7, n_in=n_in)
    y = layer(z).numpy()
    assert y.shape == (2, steps, 3)
    want = numpy_readout(z, layer.kernel.numpy().astype(np.float64),
                         layer.bias.numpy().astype(np.float64), 15.0, 0.7)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_float64_exact_and_no_bias():
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(1)
    z = rng.uniform(size=(3, 50, 4))
    layer = _readout(2, tau=5.0, use_bias=False)
    assert layer.bias is None
    want = numpy_readout(z, layer.kernel.numpy(), None, 5.0, 1.0)
    np.testing.assert_allclose(layer(z).numpy(), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("native", ["auto", False])
@pytest.mark.parametrize("steps", [1, 40, 64, 65, 200, 2100])
def test_leaky_filter_initial_state(steps, native):
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, steps, 3))
    initial = rng.normal(size=(2, 3))
    kappa = 0.9
    want = numpy_readout(x, np.eye(3), None, -1.0 / np.log(kappa), 1.0, zhat0=initial)
    got = leaky_filter(tf.constant(x), kappa, initial=tf.constant(initial),
                       native=native).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_step_equals_sequence_call():
    rng = np.random.default_rng(3)
    z = (rng.uniform(size=(2, 30, 4)) < 0.3).astype("float32")
    layer = _readout(5, tau=8.0)
    y = layer(z).numpy()
    zhat = tf.zeros((2, 5))
    for t in range(30):
        y_t, zhat = layer.step(tf.constant(z[:, t]), zhat)
        np.testing.assert_allclose(y_t.numpy(), y[:, t], rtol=1e-5, atol=1e-6)


def test_config_round_trip_and_keras_file(tmp_path):
    layer = kspike.LeakyReadout(3, tau=12.0, dt=0.5, use_bias=False, seed=4,
                                kernel_regularizer="l2")
    rebuilt = kspike.LeakyReadout.from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()
    assert rebuilt.kappa == pytest.approx(np.exp(-0.5 / 12.0), rel=1e-15)
    model = keras.Sequential([keras.Input((10, 4)), layer])
    path = tmp_path / "readout.keras"
    model.save(path)
    z = np.random.default_rng(5).uniform(size=(2, 10, 4)).astype("float32")
    np.testing.assert_array_equal(keras.saving.load_model(path)(z).numpy(), model(z).numpy())


def test_bad_arguments_and_inputs():
    for kwargs, name in [(dict(units=0), "units"), (dict(units=1, tau=0.0), "tau"),
                         (dict(units=1, tau=float("nan")), "tau"),
                         (dict(units=1, dt=-1.0), "dt"), (dict(units=2.5), "units")]:
        with pytest.raises(ValueError, match=name):
            kspike.LeakyReadout(**kwargs)
    with pytest.raises(ValueError, match=r"\(batch, time, features\)"):
        kspike.LeakyReadout(2)(np.zeros((3, 4), "float32"))


@pytest.mark.parametrize("native", ["auto", False])
def test_leaky_filter_gradient_is_the_transposed_filter(native):
    # The gradient of sum(g * filter(x)) with respect to x is the filter run backwards in time:
    # dx_s = (1 - kappa) sum_{t >= s} kappa^(t - s) g_t (NumPy loop), across block boundaries.
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(2, 150, 3)))
    g = rng.normal(size=(2, 150, 3))
    kappa = 0.93
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(leaky_filter(x, kappa, native=native) * g)
    got = tape.gradient(loss, x).numpy()
    want = np.zeros_like(g)
    acc = np.zeros((2, 3))
    for s in reversed(range(150)):
        acc = kappa * acc + g[:, s]
        want[:, s] = (1.0 - kappa) * acc
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_leaky_filter_unknown_length_matches_static():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 90, 3)).astype("float32")
    dynamic = tf.function(lambda x: leaky_filter(x, 0.9),
                          input_signature=[tf.TensorSpec((None, None, 3), tf.float32)])
    np.testing.assert_allclose(dynamic(x).numpy(), leaky_filter(tf.constant(x), 0.9).numpy(),
                               rtol=1e-5, atol=1e-6)


def _op_types(function, *args):
    graph = function.get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for f in graph._functions.values():
        types |= {node.op for node in f.definition.node_def}
    return types


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="no C++ compiler: the TensorFlow forms are used")
def test_leaky_filter_native_is_the_float32_recursion_and_never_exported():
    # Where the native filter may run (eagerly, under a tape) it is the recursion in float32
    # bit for bit: kappa zhat + (1 - kappa) x rounded as TensorFlow rounds it; a user's
    # tf.function without a tape (one that could be exported) holds TensorFlow ops only, one
    # recording a tape the native op. Where a compiler exists the library must load.
    from kspike import native as native_module
    assert native_module.load() is not None, native_module.unavailable_reason()
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 130, 4)).astype("float32")
    kappa = 0.95
    k32, g32 = np.float32(kappa), np.float32(1.0 - kappa)
    want = np.zeros_like(x)
    zhat = np.zeros((3, 4), np.float32)
    for t in range(130):
        zhat = k32 * zhat + g32 * x[:, t]
        want[:, t] = zhat
    np.testing.assert_array_equal(leaky_filter(tf.constant(x), kappa).numpy(), want)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = leaky_filter(xt, kappa)
    np.testing.assert_array_equal(y.numpy(), want)
    np.testing.assert_allclose(leaky_filter(tf.constant(x), kappa, native=False).numpy(), want,
                               rtol=1e-5, atol=1e-6)
    plain = tf.function(lambda v: leaky_filter(v, kappa))
    assert not any(t.startswith("Kspike") for t in _op_types(plain, tf.constant(x)))

    def with_tape(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = leaky_filter(v, kappa)
        return tape.gradient(tf.reduce_sum(y), v)
    assert "KspikeLinearFilter" in _op_types(tf.function(with_tape), tf.constant(x))
    with pytest.raises(ValueError, match="native"):
        leaky_filter(tf.constant(x), kappa, native=True)
