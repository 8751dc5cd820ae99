"""Rate-based backpropagation (docs/ratebp.md) against NumPy and analytic values."""
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
import kspike.learning
from kspike.learning import RateBP


def np_lif_statistics(x, w_in, w_rec, thr, alpha, gamma):
    """Independent LIF simulation (kspike convention, triangular psi): rbar, elig, zbar_prev."""
    B, T, _ = x.shape
    n = w_in.shape[1]
    v = np.zeros((B, n))
    z = np.zeros((B, n))
    kappa = np.zeros((B, n))
    z_sum, elig_sum, zprev_sum = np.zeros((B, n)), np.zeros((B, n)), np.zeros((B, n))
    outputs = np.zeros((B, T, n))
    for t in range(T):
        current = x[:, t] @ w_in + (0.0 if w_rec is None else z @ w_rec)
        zprev_sum += z
        v = alpha * v + (1 - alpha) * current - thr * z
        scaled = (v - thr) / thr
        z = (scaled > 0).astype(np.float64)
        psi = gamma * np.maximum(0.0, 1.0 - np.abs(scaled))
        kappa = 1.0 + alpha * kappa
        elig_sum += psi / thr * (1 - alpha) * kappa
        z_sum += z
        outputs[:, t] = z
    return z_sum / T, elig_sum / T, zprev_sum / T, outputs


def two_layer_model(T, n_in, recurrent_first=True):
    inputs = keras.Input((T, n_in))
    first = keras.layers.RNN(kspike.LIF(7, thr=0.03, recurrent=recurrent_first, seed=1),
                             return_sequences=True)
    second = keras.layers.RNN(kspike.LIF(5, thr=0.03, recurrent=False, seed=2),
                              return_sequences=True)
    dense = keras.layers.Dense(3)
    outputs = keras.layers.GlobalAveragePooling1D()(dense(second(first(inputs))))
    return keras.Model(inputs, outputs), first, second, dense


def test_gradients_match_numpy_chain_rule(rng):
    T, n_in = 40, 6
    model, first, second, dense = two_layer_model(T, n_in)
    x = (rng.random((4, T, n_in)) < 0.4).astype(np.float32)
    y = rng.normal(size=(4, 3)).astype(np.float32)
    alpha = np.exp(-1.0 / 20.0)
    w1 = first.cell.input_kernel.numpy().astype(np.float64)
    w1r = first.cell.recurrent_kernel.numpy().astype(np.float64) * (1 - np.eye(7))
    w2 = second.cell.input_kernel.numpy().astype(np.float64)
    wd, bd = dense.kernel.numpy().astype(np.float64), dense.bias.numpy().astype(np.float64)
    r1, e1, zp1, z1 = np_lif_statistics(x.astype(np.float64), w1, w1r, 0.03, alpha, 0.3)
    r2, e2, _, z2 = np_lif_statistics(z1, w2, None, 0.03, alpha, 0.3)
    assert 0.02 < r1.mean() < 0.98 and 0.02 < r2.mean() < 0.98
    out = r2 @ wd + bd
    g = 2.0 * (out - y) / out.size
    d_i2 = e2 * (g @ wd.T)
    d_i1 = e1 * (d_i2 @ w2.T)
    expected = {dense.kernel.path: r2.T @ g, dense.bias.path: g.sum(0),
                second.cell.input_kernel.path: r1.T @ d_i2,
                first.cell.input_kernel.path: x.mean(1).T @ d_i1,
                first.cell.recurrent_kernel.path: (zp1.T @ d_i1) * (1 - np.eye(7))}

    result = RateBP().compute(model, x, y, keras.losses.MeanSquaredError())
    np.testing.assert_allclose(result.predictions.numpy(), out, rtol=1e-5, atol=1e-6)
    # The rate phase's value is the exact time average of the model's own output.
    np.testing.assert_allclose(result.predictions.numpy(), model(x).numpy(), rtol=1e-5,
                               atol=1e-6)
    grads = dict(zip([v.path for v in model.trainable_variables], result.gradients))
    for path, value in expected.items():
        np.testing.assert_allclose(grads[path].numpy(), value, rtol=1e-4, atol=1e-7,
                                   err_msg=path)


def test_rate_gradient_equals_analytic_when_rates_are_linear(rng):
    """With a pseudo-derivative constant over the voltage range the rate phase is linear in the
    input rates, r = rbar + c (Ibar - Ibar_0), with c = gamma/thr (1/T) sum_t (1 - alpha^(t+1))."""
    T, n_in, thr, gamma = 30, 5, 0.03, 0.4
    flat = kspike.surrogates.get("rectangular", dampening=gamma, sharpness=1e-6)
    inputs = keras.Input((T, n_in))
    layer = keras.layers.RNN(kspike.LIF(4, thr=thr, recurrent=False, surrogate=flat, seed=3),
                             return_sequences=True)
    readout = kspike.LeakyReadout(2, tau=10.0, seed=4)
    model = keras.Model(inputs, readout(layer(inputs)))
    x = (rng.random((3, T, n_in)) < 0.5).astype(np.float32)
    weights = rng.normal(size=(3, 2)).astype(np.float32)

    def linear_loss(y_true, y_pred, sample_weight=None):
        return tf.reduce_sum(y_pred * y_true)

    grads = RateBP().gradients(model, x, weights, linear_loss)
    grads = dict(zip([v.path for v in model.trainable_variables], grads))
    alpha, kappa = np.exp(-1.0 / 20.0), np.exp(-1.0 / 10.0)
    c = gamma / thr * np.mean(1.0 - alpha ** (np.arange(T) + 1.0))
    slope = np.mean(1.0 - kappa ** (np.arange(T) + 1.0))     # d mean(zhat) / d rate
    w_out = readout.kernel.numpy().astype(np.float64)
    expected = c * slope * x.mean(1).T @ (weights @ w_out.T)
    np.testing.assert_allclose(grads[layer.cell.input_kernel.path].numpy(), expected,
                               rtol=1e-5, atol=1e-7)


def np_alif_statistics(x, w_in, thr, beta, alpha, rho, gamma, n_refractory):
    """Independent ALIF simulation with refractoriness: rbar and elig (psi / A_t, masked)."""
    B, T, _ = x.shape
    n = w_in.shape[1]
    v, b, z, r = (np.zeros((B, n)) for _ in range(4))
    kappa, z_sum, elig_sum = np.zeros((B, n)), np.zeros((B, n)), np.zeros((B, n))
    for t in range(T):
        current = x[:, t] @ w_in
        b = rho * b + (1 - rho) * z
        A = thr + beta * b
        v = alpha * v + (1 - alpha) * current - A * z
        scaled = (v - A) / A
        allowed = (r == 0).astype(np.float64)
        z_new = (scaled > 0).astype(np.float64) * allowed
        psi = gamma * np.maximum(0.0, 1.0 - np.abs(scaled)) * allowed
        r = np.where(z_new > 0.5, float(n_refractory), np.maximum(r - 1.0, 0.0))
        z = z_new
        kappa = 1.0 + alpha * kappa
        elig_sum += psi / A * (1 - alpha) * kappa
        z_sum += z
    return z_sum / T, elig_sum / T


def test_alif_with_refractoriness_matches_numpy(rng):
    T, n_in = 50, 5
    inputs = keras.Input((T, n_in))
    layer = keras.layers.RNN(kspike.ALIF(6, n_adaptive=3, thr=0.02, beta=1.5,
                                         tau_adaptation=30.0, n_refractory=2, recurrent=False,
                                         input_initializer=keras.initializers.RandomUniform(
                                             -0.05, 0.1, seed=0)), return_sequences=True)
    dense = keras.layers.Dense(2, use_bias=False)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(dense(layer(inputs))))
    x = (rng.random((3, T, n_in)) < 0.5).astype(np.float32)
    weights = rng.normal(size=(3, 2))

    def linear_loss(y_true, y_pred, sample_weight=None):
        return tf.reduce_sum(y_pred * tf.cast(y_true, y_pred.dtype))

    result = RateBP().compute(model, x, weights.astype(np.float32), linear_loss)
    beta = np.r_[np.zeros(3), np.full(3, 1.5)]
    w_in = layer.cell.input_kernel.numpy().astype(np.float64)
    rbar, elig = np_alif_statistics(x.astype(np.float64), w_in, 0.02, beta, np.exp(-1 / 20.0),
                                    np.exp(-1 / 30.0), 0.3, 2)
    assert 0.05 < rbar.mean() < 0.95 and 0 < rbar[:, :3].mean() and 0 < rbar[:, 3:].mean()
    wd = dense.kernel.numpy().astype(np.float64)
    np.testing.assert_allclose(result.predictions.numpy(), rbar @ wd, rtol=1e-5, atol=1e-7)
    grads = dict(zip([v.path for v in model.trainable_variables], result.gradients))
    expected = x.mean(1).T @ (elig * (weights @ wd.T))
    np.testing.assert_allclose(grads[layer.cell.input_kernel.path].numpy(), expected,
                               rtol=1e-4, atol=1e-7)


def _peak_rss_growth_kib(fn):
    def hwm():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = hwm()
    fn()
    return hwm() - base


def test_memory_of_gradients_is_flat_in_time(rng):
    n_in = 20
    rule = RateBP()
    inputs = keras.Input((None, n_in))
    h = keras.layers.RNN(kspike.LIF(64, seed=1), return_sequences=True)(inputs)
    model = keras.Model(inputs, kspike.LeakyReadout(4)(h))
    loss = keras.losses.MeanSquaredError()
    y = np.zeros((16, 4), np.float32)
    xs = {T: tf.constant((rng.random((16, T, n_in)) < 0.2).astype(np.float32))
          for T in (50, 200, 3000)}
    rule.gradients(model, xs[50], y, loss)            # trace once
    rule.gradients(model, xs[200], y, loss)
    small = _peak_rss_growth_kib(lambda: rule.gradients(model, xs[200], y, loss))
    large = _peak_rss_growth_kib(lambda: rule.gradients(model, xs[3000], y, loss))
    # The input itself is O(T): the spike phase reads it through a time-major copy (two
    # copies of x, 3.7 MiB each here). BPTT would in addition keep several (16, 3000, 64)
    # float32 tensors (11.7 MiB each) for the backward pass; the rate phase keeps none.
    input_kib = xs[3000].numpy().nbytes / 1024
    assert large - small < 2.5 * input_kib + 1536, (small, large, input_kib)


def test_learns_a_rate_coded_task(rng):
    T, n_in = 30, 10
    inputs = keras.Input((T, n_in))
    h = keras.layers.RNN(kspike.LIF(24, thr=0.03, seed=5), return_sequences=True)(inputs)
    model = keras.Model(inputs, kspike.LeakyReadout(2, tau=5.0, seed=6)(h))
    labels = rng.integers(0, 2, 64)
    rates = np.where(labels[:, None] == 1, np.r_[np.full(5, 0.5), np.full(5, 0.05)],
                     np.r_[np.full(5, 0.05), np.full(5, 0.5)])
    x = (rng.random((64, T, n_in)) < rates[:, None, :]).astype(np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rule = RateBP()
    optimizer = keras.optimizers.Adam(0.02)
    step = tf.function(lambda: rule.compute(model, x, labels, loss))
    first = None
    for _ in range(40):
        result = step()
        optimizer.apply_gradients(zip(result.gradients, model.trainable_variables))
        first = float(result.loss) if first is None else first
    accuracy = np.mean(np.argmax(result.predictions.numpy(), -1) == labels)
    assert float(result.loss) < 0.5 * first
    assert accuracy >= 0.9


def test_errors_are_clear(rng):
    inputs = keras.Input((10, 3))
    h = keras.layers.RNN(kspike.LIF(4), return_sequences=False)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    loss = keras.losses.MeanSquaredError()
    x = np.zeros((2, 10, 3), np.float32)
    with pytest.raises(ValueError, match="return_sequences=True"):
        RateBP().gradients(model, x, np.zeros((2, 2)), loss)
    inputs = keras.Input((10, 3))
    h = keras.layers.LSTM(4, return_sequences=True)(inputs)
    with pytest.raises(ValueError, match="LSTM"):
        RateBP().check_model(keras.Model(inputs, h))
    inputs = keras.Input((10, 3))
    h = keras.layers.RNN(kspike.LIF(4), return_sequences=True)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="relu")(h))
    with pytest.raises(ValueError, match="activation"):
        RateBP().check_model(model)
    with pytest.raises(ValueError, match="detach_recurrent"):
        RateBP(detach_recurrent=False)
    model = keras.Model(inputs, kspike.LeakyReadout(2)(h))
    with pytest.raises(ValueError, match=r"\(B, T, n_in\)"):
        RateBP().gradients(model, np.zeros((2, 3), np.float32), np.zeros((2, 2)), loss)
    with pytest.raises(ValueError, match="regularizers"):
        RateBP().gradients(model, x, np.zeros((2, 2)), loss, regularizers=[object()])
    assert repr(RateBP()) == "kspike.learning.RateBP(detach_recurrent=True)"
