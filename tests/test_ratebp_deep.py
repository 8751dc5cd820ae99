"""Rate-BP on deep SNNs (docs/ratebp.md "Deep SNNs") against an independent NumPy version of
the paper's formulas: the eligibility recursion of each reset, BatchNorm in the rate phase, the
loss gradient divided by T; and the errors."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
import kspike.learning
from kspike.learning import RateBP

T, B, N_IN, HID, N_OUT = 6, 4, 5, 7, 3


def np_sigmoid_sg(x):
    s = 1.0 / (1.0 + np.exp(-4.0 * x))
    return 4.0 * s * (1.0 - s)


def np_neurons(currents, tau, thr, v_reset, decay_input, detach_reset):
    """SpikingJelly IF/LIF node over (B, T, n) currents -> rate, elig (the paper's recursion)."""
    Bn, Tn, n = currents.shape
    lam = 1.0 if tau is None else 1.0 - 1.0 / tau
    gain = 1.0 / tau if (tau is not None and decay_input) else 1.0
    rest = 0.0 if v_reset is None else v_reset
    v = np.full((Bn, n), rest)
    f = np.ones((Bn, n))
    elig = np.zeros((Bn, n))
    spikes = np.zeros((Bn, n))
    for t in range(Tn):
        x = currents[:, t]
        h = v + (x - (v - rest)) / tau if gain != 1.0 else lam * (v - rest) + rest + x
        if tau is None:
            h = v + x
        s = (h - thr >= 0).astype(float)
        sg = np_sigmoid_sg(h - thr)
        elig += f * sg
        if v_reset is None:
            slope = 1.0 if detach_reset else 1.0 - thr * sg
            v = h - thr * s
        else:
            slope = (1.0 - s) + (0.0 if detach_reset else (v_reset - h) * sg)
            v = (1.0 - s) * h + s * v_reset
        f = 1.0 + f * lam * slope
        spikes += s
    return spikes / Tn, gain * elig / Tn


def np_rate_bn(h, h0, m_spk, v_spk, gamma, beta, eps):
    """The rate-phase BatchNorm as a function of the rate h: value at h0 from the spike
    statistics, derivative from the rate statistics (offset form)."""
    m = m_spk + h.mean(0) - h0.mean(0)

    def var_of(hh, mm):
        return ((hh - mm) ** 2).mean(0)
    m0 = m_spk
    v = np.maximum(v_spk + var_of(h, m) - var_of(h0, m0), 0.0)
    return gamma * (h - m) / np.sqrt(v + eps) + beta


def numeric_grad(fn, params, eps=1e-6):
    grads = []
    for k, p in enumerate(params):
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            g[idx] = (fn(plus) - fn(minus)) / (2 * eps)
        grads.append(g)
    return grads


def dense_model(neurons, bn=False):
    inputs = keras.Input((T, N_IN))
    d1 = keras.layers.Dense(HID, name="d1", bias_initializer=keras.initializers.Constant(
        np.linspace(0.2, 3.0, HID)), kernel_initializer=keras.initializers.RandomNormal(0, 1))
    h = d1(inputs)
    if bn:
        h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
    h = neurons(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(N_OUT), name="d2")(h)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(h))


NEURONS = {
    "lif_hard": (dict(tau=2.0, v_reset=0.0), kspike.LIFNeurons),
    "lif_hard_detach": (dict(tau=2.0, v_reset=0.0, detach_reset=True), kspike.LIFNeurons),
    "lif_soft": (dict(tau=2.0, v_reset=None, decay_input=False), kspike.LIFNeurons),
    "lif_soft_detach": (dict(tau=2.0, v_reset=None, decay_input=False, detach_reset=True),
                        kspike.LIFNeurons),
    "if_soft_thr": (dict(v_reset=None, thr=0.7), kspike.IFNeurons),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_gradients_match_numpy(name):
    kwargs, cls = NEURONS[name]
    keras.utils.set_random_seed(1)
    model = dense_model(cls(**kwargs))
    rng = np.random.default_rng(2)
    x = rng.random((B, T, N_IN)).astype("float32") * 2.0
    y = rng.normal(size=(B, N_OUT)).astype("float32")
    grads = RateBP().gradients(model, x, y, keras.losses.MeanSquaredError())
    w1, b1 = [v.numpy().astype(float) for v in model.get_layer("d1").weights]
    w2, b2 = [v.numpy().astype(float) for v in model.get_layer("d2").weights]
    x64 = x.astype(float)
    thr = kwargs.get("thr", 1.0)
    rate, elig = np_neurons(x64 @ w1 + b1, kwargs.get("tau"), thr, kwargs.get("v_reset", 0.0),
                            kwargs.get("decay_input", True), kwargs.get("detach_reset", False))
    assert 0.05 < rate.mean() < 0.95 and np.abs(elig).max() > 1e-3
    i0 = x64.mean(1) @ w1 + b1

    def loss(params):
        a, c, w, d = params
        i = x64.mean(1) @ a + c
        r = rate + elig * (i - i0)
        return ((r @ w + d - y) ** 2).mean() / T       # gradient divided by T
    expected = numeric_grad(loss, [w1, b1, w2, b2])
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=2e-4, atol=2e-6)


def test_batchnorm_rate_phase_and_running_statistics():
    keras.utils.set_random_seed(3)
    model = dense_model(kspike.LIFNeurons(tau=2.0), bn=True)
    bn = model.get_layer("bn")
    bn.gamma.assign(np.linspace(0.8, 1.6, HID).astype("float32"))
    bn.beta.assign(np.linspace(0.2, 0.9, HID).astype("float32"))
    moving = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    rng = np.random.default_rng(4)
    x = rng.random((B, T, N_IN)).astype("float32")
    y = rng.normal(size=(B, N_OUT)).astype("float32")
    result = RateBP().compute(model, x, y, keras.losses.MeanSquaredError())
    w1, b1 = [v.numpy().astype(float) for v in model.get_layer("d1").weights]
    w2, b2 = [v.numpy().astype(float) for v in model.get_layer("d2").weights]
    gamma, beta = bn.gamma.numpy().astype(float), bn.beta.numpy().astype(float)
    x64 = x.astype(float)
    pre = x64 @ w1 + b1                                             # (B, T, HID)
    m_spk, v_spk = pre.mean((0, 1)), pre.var((0, 1))
    normed = gamma * (pre - m_spk) / np.sqrt(v_spk + bn.epsilon) + beta
    rate, elig = np_neurons(normed, 2.0, 1.0, 0.0, True, False)
    assert 0.05 < rate.mean() < 0.95
    h0 = x64.mean(1) @ w1 + b1
    i0 = np_rate_bn(h0, h0, m_spk, v_spk, gamma, beta, bn.epsilon)

    def loss(params):
        a, c, g, bt, w, d = params
        h = x64.mean(1) @ a + c
        i = np_rate_bn(h, h0, m_spk, v_spk, g, bt, bn.epsilon)
        return (((rate + elig * (i - i0)) @ w + d - y) ** 2).mean() / T
    expected = numeric_grad(loss, [w1, b1, gamma, beta, w2, b2])
    names = [v.name for v in model.trainable_variables]
    assert names == ["kernel", "bias", "gamma", "beta", "kernel", "bias"]
    for g, e in zip(result.gradients, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-3, atol=1e-6)
    # running statistics: one update from the spike phase, none from the rate phase
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * moving[0] + 0.1 * m_spk,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * moving[1] + 0.1 * v_spk,
                               rtol=1e-5, atol=1e-6)
    # the loss value is the loss of the time-mean output of the model in training mode
    np.testing.assert_allclose(result.predictions.numpy(), (rate @ w2 + b2), atol=1e-5)


def conv_residual_model(td, bn_wrapper=kspike.FoldTime):
    inputs = keras.Input((T, 6, 6, 2))
    h = td(keras.layers.Conv2D(4, 3, padding="same", use_bias=False))(inputs)
    h = bn_wrapper(keras.layers.BatchNormalization(momentum=0.8), name="bn")(h)
    a = kspike.LIFNeurons(tau=2.0)(h)
    h = td(keras.layers.Conv2D(4, 3, padding="same"))(a)
    h = kspike.IFNeurons(v_reset=None)(h)
    h = keras.layers.Add()([a, h])
    h = td(keras.layers.AveragePooling2D(2))(h)
    h = td(keras.layers.Dropout(0.0))(h)
    h = td(keras.layers.Flatten())(h)
    h = td(keras.layers.Dense(N_OUT))(h)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(h))


@pytest.mark.parametrize("td, bn_wrapper", [
    (kspike.FoldTime, kspike.FoldTime), (keras.layers.TimeDistributed, kspike.FoldTime),
    (keras.layers.TimeDistributed, keras.layers.TimeDistributed)])
def test_conv_residual_model_runs_the_network_exactly(td, bn_wrapper):
    keras.utils.set_random_seed(5)
    model = conv_residual_model(td, bn_wrapper)
    x = 2.0 * np.random.default_rng(6).random((B, T, 6, 6, 2)).astype("float32")
    y = np.arange(B) % N_OUT
    bn = model.get_layer("bn").layer
    # Keras in training mode: batch statistics (over B*T frames, or per step), and the
    # running statistics it leaves
    expected = model(x, training=True).numpy()
    moving = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    bn.moving_mean.assign(np.zeros(4, "float32"))
    bn.moving_variance.assign(np.ones(4, "float32"))
    result = RateBP().compute(model, x, y,
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(result.predictions.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), moving[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), moving[1], rtol=1e-4, atol=1e-6)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in result.gradients)
    assert float(result.logs["firing_rate"]) > 0


def test_errors_name_the_layer_and_train_nothing():
    inputs = keras.Input((T, N_IN))
    h = kspike.LIFNeurons()(keras.layers.Dense(HID)(inputs))
    bad = keras.layers.TimeDistributed(keras.layers.Dense(N_OUT, activation="relu"),
                                       name="bad")(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(bad))
    with pytest.raises(ValueError, match=r"layer 'bad' \(TimeDistributed\) has activation"):
        RateBP().check_model(model)
    lstm = keras.layers.LSTM(3, return_sequences=True, name="lstm")(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(lstm))
    with pytest.raises(ValueError, match=r"does not support layer 'lstm' \(LSTM\)\. "
                                         r"Supported: kspike.IFNeurons"):
        RateBP().check_model(model)
    model = keras.Model(inputs, keras.layers.Dense(N_OUT)(h))
    with pytest.raises(ValueError, match="time-mean readout"):
        RateBP().check_model(model)
    # BatchNorm forced out of training mode
    frozen = dense_model(kspike.LIFNeurons(), bn=True)
    frozen.get_layer("bn").trainable = False
    with pytest.raises(ValueError, match=r"layer 'bn' \(BatchNormalization\) is frozen"):
        RateBP().check_model(frozen)
    h2 = keras.layers.BatchNormalization(name="bn_off")(keras.layers.Dense(HID)(inputs),
                                                        training=False)
    out = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(N_OUT)(
        kspike.LIFNeurons()(h2)))
    model = keras.Model(inputs, out)
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(ValueError, match=r"'bn_off' \(BatchNormalization\) is called with "
                                         r"training=False"):
        RateBP().compute(model, np.ones((B, T, N_IN), "float32"), np.zeros((B, N_OUT)),
                         keras.losses.MeanSquaredError())
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
