"""Trace STDP (docs/stdp.md) against independent NumPy re-implementations."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
import kspike.learning
from kspike.learning import STDP
from kspike.learning.stdp import soft_bounds


# ----------------------------------------------------------------------------- NumPy references
def np_traces_step(tr, s, tau):
    return tr - tr / tau + s


def np_stdp_dense(w, pre, post, tau_pre, tau_post, f_pre=None, f_post=None,
                  tr_pre=None, tr_post=None):
    """SpikingJelly's single-step loop, kernel in Keras layout (n_in, n_out)."""
    f_pre = f_pre or (lambda a: a)
    f_post = f_post or (lambda a: a)
    B, T, n_in = pre.shape
    n_out = post.shape[-1]
    tr_pre = np.zeros((B, n_in)) if tr_pre is None else tr_pre
    tr_post = np.zeros((B, n_out)) if tr_post is None else tr_post
    dw = np.zeros((n_in, n_out))
    for t in range(T):
        tr_pre = np_traces_step(tr_pre, pre[:, t], tau_pre)
        tr_post = np_traces_step(tr_post, post[:, t], tau_post)
        for b in range(B):
            dw += f_post(w) * np.outer(tr_pre[b], post[b, t])
            dw -= f_pre(w) * np.outer(pre[b, t], tr_post[b])
    return dw, tr_pre, tr_post


def np_same_padding(size, k, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2, out


def np_stdp_conv(w, pre, post, stride, padding, tau_pre, tau_post):
    """Loops over kernel positions and output positions (channels_last)."""
    kh, kw, c_in, c_out = w.shape
    B, T, H, W, _ = pre.shape
    if padding == "same":
        top, bottom, _ = np_same_padding(H, kh, stride[0])
        left, right, _ = np_same_padding(W, kw, stride[1])
    else:
        top = bottom = left = right = 0
    pre = np.pad(pre, ((0, 0), (0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = post.shape[2], post.shape[3]
    tr_pre = np.zeros(pre.shape[:1] + pre.shape[2:])
    tr_post = np.zeros(post.shape[:1] + post.shape[2:])
    dw = np.zeros(w.shape)
    for t in range(T):
        tr_pre = np_traces_step(tr_pre, pre[:, t], tau_pre)
        tr_post = np_traces_step(tr_post, post[:, t], tau_post)
        for a in range(kh):
            for c in range(kw):
                for oh in range(ho):
                    for ow in range(wo):
                        y, x = oh * stride[0] + a, ow * stride[1] + c
                        # identity f_pre/f_post: both terms are multiplied by W itself
                        dw[a, c] += w[a, c] * np.einsum("bi,bo->io", tr_pre[:, y, x],
                                                        post[:, t, oh, ow])
                        dw[a, c] -= w[a, c] * np.einsum("bi,bo->io", pre[:, t, y, x],
                                                        tr_post[:, oh, ow])
    return dw


def spikes(rng, shape, p=0.3):
    return (rng.random(shape) < p).astype(np.float32)


def assert_relative(actual, expected, rtol=1e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    assert scale > 0
    assert np.max(np.abs(actual - expected)) <= rtol * scale, (actual, expected)


def built_dense(n_in, n_out, seed=0):
    layer = keras.layers.Dense(n_out, use_bias=False)
    layer.build((None, n_in))
    w = np.random.default_rng(seed).uniform(0.0, 1.0, (n_in, n_out)).astype(np.float32)
    layer.kernel.assign(w)
    return layer


# ----------------------------------------------------------------------------- exactness
def test_dense_multi_step_matches_numpy_with_soft_bounds(rng):
    dense = built_dense(6, 4)
    neurons = keras.layers.Identity()
    f_pre, f_post = soft_bounds(0.0, 1.0)
    rule = STDP(tau_pre=3.0, tau_post=7.0, f_pre=f_pre, f_post=f_post, scale=0.5,
                synapse=dense, neurons=neurons)
    pre, post = spikes(rng, (3, 25, 6)), spikes(rng, (3, 25, 4))
    rule.record(pre, post)
    (var, dw), = rule.weight_change()
    w = dense.kernel.numpy().astype(np.float64)
    expected, _, _ = np_stdp_dense(w, pre, post, 3.0, 7.0, lambda a: a - 0.0, lambda a: 1.0 - a)
    assert var is dense.kernel
    assert_relative(dw, 0.5 * expected)


def test_single_step_streaming_equals_multi_step_and_traces_persist(rng):
    dense = built_dense(5, 3)
    pre, post = spikes(rng, (2, 30, 5)), spikes(rng, (2, 30, 3))
    whole = STDP(tau_pre=2.0, tau_post=10.0, synapse=dense, neurons=keras.layers.Identity())
    whole.record(pre, post)
    (_, dw_whole), = whole.weight_change()
    stream = STDP(tau_pre=2.0, tau_post=10.0, synapse=dense, neurons=keras.layers.Identity())
    total = 0.0
    for t in range(30):
        stream.record(pre[:, t], post[:, t])
        if t % 7 == 6:          # step() in the middle of the stream keeps the traces
            (_, part), = stream.weight_change()
            total = total + part.numpy()
    (_, part), = stream.weight_change()
    total = total + part.numpy()
    assert_relative(total, dw_whole.numpy())
    w = dense.kernel.numpy().astype(np.float64)
    expected, _, _ = np_stdp_dense(w, pre, post, 2.0, 10.0)
    assert_relative(total, expected)
    stream.reset()
    with pytest.raises(ValueError, match="no recorded activity"):
        stream.step()


def test_cell_input_and_recurrent_kernels_match_numpy(rng):
    cell = kspike.LIF(5, recurrent=True, seed=1)
    cell.build((None, 4))
    rule = STDP(tau_pre=4.0, tau_post=6.0, synapse=cell)
    x, z = spikes(rng, (2, 20, 4)), spikes(rng, (2, 20, 5), p=0.4)
    rule.record(x[:, :12], z[:, :12])      # two records: z_{t-1} crosses the boundary
    rule.record(x[:, 12:], z[:, 12:])
    changes = {var.path: dw.numpy() for var, dw in rule.weight_change()}
    w_in = cell.input_kernel.numpy().astype(np.float64)
    w_rec = cell.recurrent_kernel.numpy().astype(np.float64)
    exp_in, _, _ = np_stdp_dense(w_in, x, z, 4.0, 6.0)
    z_prev = np.concatenate([np.zeros((2, 1, 5)), z[:, :-1]], axis=1)
    exp_rec, _, _ = np_stdp_dense(w_rec, z_prev, z, 4.0, 6.0)
    exp_rec[np.diag_indices(5)] = 0.0
    assert_relative(changes[cell.input_kernel.path], exp_in)
    assert_relative(changes[cell.recurrent_kernel.path], exp_rec)
    assert np.all(np.diag(changes[cell.recurrent_kernel.path]) == 0.0)


@pytest.mark.parametrize("stride,padding,size", [((1, 1), "valid", (6, 5)),
                                                  ((2, 2), "same", (7, 6)),
                                                  ((2, 1), "same", (5, 5))])
def test_conv2d_matches_numpy(rng, stride, padding, size):
    conv = keras.layers.Conv2D(3, (3, 2), strides=stride, padding=padding, use_bias=False)
    conv.build((None,) + size + (2,))
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype(np.float32))
    pre = spikes(rng, (2, 6) + size + (2,))
    out_shape = conv.compute_output_shape((2,) + size + (2,))
    post = spikes(rng, (2, 6) + tuple(out_shape[1:]), p=0.4)
    rule = STDP(tau_pre=2.0, tau_post=5.0, synapse=keras.layers.TimeDistributed(conv),
                neurons=keras.layers.Identity())
    rule.record(pre, post)
    (var, dw), = rule.weight_change()
    expected = np_stdp_conv(conv.kernel.numpy().astype(np.float64), pre, post, stride, padding,
                            2.0, 5.0)
    assert var is conv.kernel
    assert_relative(dw, expected)


def test_pairing_window_is_exponential():
    """Pre before post potentiates by (1 - 1/tau_pre)^dt, post before pre depresses."""
    tau_pre, tau_post = 5.0, 8.0
    dense = built_dense(1, 1)
    dense.kernel.assign([[1.0]])
    for lag in range(-6, 7):
        pre, post = np.zeros((1, 20, 1), np.float32), np.zeros((1, 20, 1), np.float32)
        pre[0, 8, 0] = 1.0
        post[0, 8 + lag, 0] = 1.0
        rule = STDP(tau_pre=tau_pre, tau_post=tau_post, synapse=dense,
                    neurons=keras.layers.Identity())
        rule.record(pre, post)
        (_, dw), = rule.weight_change()
        if lag > 0:
            expected = (1.0 - 1.0 / tau_pre) ** lag
        elif lag < 0:
            expected = -(1.0 - 1.0 / tau_post) ** (-lag)
        else:
            expected = 0.0      # both terms pair the same step: +1 - 1
        assert float(dw[0, 0]) == pytest.approx(expected, rel=1e-6, abs=1e-7), lag
    # Causal window: larger lags give smaller potentiation.
    assert (1 - 1 / tau_pre) ** 1 > (1 - 1 / tau_pre) ** 5 > 0


def test_gradient_mode_and_direct_mode(rng):
    dense = built_dense(4, 3)
    w0 = dense.kernel.numpy().astype(np.float64)
    pre, post = spikes(rng, (2, 10, 4)), spikes(rng, (2, 10, 3))
    expected, _, _ = np_stdp_dense(w0, pre, post, 2.0, 4.0)
    rule = STDP(tau_pre=2.0, tau_post=4.0, scale=0.1, synapse=dense,
                neurons=keras.layers.Identity())
    rule.record(pre, post)
    grads_and_vars = rule.step(on_grad=True)
    keras.optimizers.SGD(0.5).apply_gradients(grads_and_vars)
    assert_relative(dense.kernel.numpy() - w0, 0.5 * 0.1 * expected, rtol=1e-5)
    dense.kernel.assign(w0.astype(np.float32))
    rule.reset()
    rule.record(pre, post)
    rule.step(on_grad=False)
    assert_relative(dense.kernel.numpy() - w0, 0.1 * expected, rtol=1e-5)


def test_compute_traced_first_inside_tf_function(rng):
    inputs = keras.Input((6, 4))
    first = keras.layers.RNN(kspike.LIF(5, recurrent=False, thr=0.02), return_sequences=True)
    model = keras.Model(inputs, keras.layers.Dense(2)(first(inputs)))
    rule = STDP(synapse=first, scale=0.1)
    x = spikes(rng, (2, 6, 4), p=0.5)
    grads = tf.function(lambda: rule.compute(model, x, None, None).gradients)()
    assert sum(g is not None for g in grads) == 1


def test_dense_in_a_model_compute_without_loss(rng):
    """Dense followed by spiking neurons inside a Keras model; only STDP gets a gradient."""
    inputs = keras.Input((15, 6))
    dense = keras.layers.Dense(4, use_bias=False)
    neurons = keras.layers.RNN(kspike.LIF(4, recurrent=False, thr=0.02,
                                          input_initializer="identity"),
                               return_sequences=True, trainable=False)
    model = keras.Model(inputs, neurons(dense(inputs)))
    x = spikes(rng, (3, 15, 6), p=0.5)
    rule = STDP(tau_pre=2.0, tau_post=3.0, synapse=dense, neurons=neurons)
    result = rule.compute(model, x, None, None)
    post = model(x).numpy()
    assert post.sum() > 0
    expected, _, _ = np_stdp_dense(dense.kernel.numpy().astype(np.float64), x, post, 2.0, 3.0)
    grads = dict(zip([v.path for v in model.trainable_variables], result.gradients))
    assert_relative(grads[dense.kernel.path], -expected)
    w0 = dense.kernel.numpy().astype(np.float64)
    applied = rule.update(model, x)
    assert len(applied) == 1 and applied[0][1] is dense.kernel
    assert_relative(dense.kernel.numpy() - w0, expected, rtol=1e-5)


def _mixed_model(T, n_in):
    inputs = keras.Input((T, n_in))
    first = keras.layers.RNN(kspike.LIF(12, recurrent=False, thr=0.02, seed=1),
                             return_sequences=True)
    second = keras.layers.RNN(kspike.LIF(10, thr=0.02, seed=2), return_sequences=True)
    readout = kspike.LeakyReadout(2, tau=5.0, seed=3)
    outputs = keras.layers.Lambda(lambda y: tf.reduce_mean(y, axis=1))(readout(second(first(
        inputs))))
    return keras.Model(inputs, outputs), first


def test_mixed_model_stdp_first_layer_adam_rest(rng):
    T, n_in = 20, 8
    model, first = _mixed_model(T, n_in)
    labels = rng.integers(0, 2, 32)
    rates = np.where(labels[:, None] == 1, np.r_[np.full(4, 0.6), np.full(4, 0.05)],
                     np.r_[np.full(4, 0.05), np.full(4, 0.6)])
    x = (rng.random((32, T, n_in)) < rates[:, None, :]).astype(np.float32)
    y = labels.astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rule = STDP(tau_pre=2.0, tau_post=10.0, scale=1e-3, synapse=first.cell)
    # One batch: the STDP kernel gets exactly -scale * dW, the others BPTT gradients.
    result = rule.compute(model, x, y, loss)
    post = keras.Model(model.inputs[0], first.output)(x).numpy()
    expected, _, _ = np_stdp_dense(first.cell.input_kernel.numpy().astype(np.float64), x, post,
                                   2.0, 10.0)
    grads = dict(zip([v.path for v in model.trainable_variables], result.gradients))
    assert_relative(grads[first.cell.input_kernel.path], -1e-3 * expected)
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True))
    others = [v for v in model.trainable_variables if v is not first.cell.input_kernel]
    for v, g in zip(others, tape.gradient(value, others)):
        np.testing.assert_allclose(grads[v.path], g.numpy(), rtol=1e-5, atol=1e-7)

    optimizer = keras.optimizers.Adam(0.02)
    step = tf.function(lambda: rule.compute(model, x, y, loss))
    w_first = first.cell.input_kernel.numpy().copy()
    losses = []
    for _ in range(25):
        result = step()
        optimizer.apply_gradients(zip(result.gradients, model.trainable_variables))
        losses.append(float(result.loss))
    assert not np.allclose(first.cell.input_kernel.numpy(), w_first)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


# ----------------------------------------------------------------------------- errors
def test_errors_are_clear():
    dense = built_dense(3, 2)
    with pytest.raises(ValueError, match="tau_pre"):
        STDP(tau_pre=0.5)
    with pytest.raises(TypeError, match="tau_post"):
        STDP(tau_post="long")
    with pytest.raises(ValueError, match="scale"):
        STDP(scale=0.0)
    with pytest.raises(TypeError, match="f_pre"):
        STDP(f_pre=3)
    STDP(synapse=dense)            # the neurons are found in the model (test_stdp_conv_snn)
    with pytest.raises(TypeError, match="synapse"):
        STDP(synapse=keras.layers.LSTM(3))
    with pytest.raises(ValueError, match="dilation_rate"):
        STDP(synapse=keras.layers.Conv2D(2, 3, dilation_rate=2), neurons=dense)
    with pytest.raises(ValueError, match="kernels"):
        STDP(kernels="bias")
    rule = STDP(synapse=dense, neurons=keras.layers.Identity())
    with pytest.raises(ValueError, match="no recorded activity"):
        rule.step()
    with pytest.raises(ValueError, match="rank"):
        rule.record(np.zeros((2, 3, 4, 3)), np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="has no `synapse`"):
        STDP().record(np.zeros((2, 3)), np.zeros((2, 2)))
    assert "tau_pre=2.0" in repr(STDP())
    assert math.isclose(STDP(tau_pre=3).tau_pre, 3.0)


# ----------------------------------------------------------------------------- conv SNN
def numpy_conv_stdp(x, kernel, thr, tau_pre, tau_post, lo, hi):
    """IF neurons (hard reset to 0) after a 3x3 'same' convolution, and SpikingJelly's STDP
    of its kernel with f_pre = f_post = clamp(W, lo, hi), by explicit loops."""
    batch, steps, height, width, c_in = x.shape
    c_out = kernel.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    v = np.zeros((batch, height, width, c_out))
    tr_pre = np.zeros_like(xp[:, 0])
    tr_post = np.zeros_like(v)
    potentiation = np.zeros_like(kernel)
    depression = np.zeros_like(kernel)
    for t in range(steps):
        current = np.zeros_like(v)
        for i in range(3):
            for j in range(3):
                current += np.einsum("bhwc,co->bhwo", xp[:, t, i:i + height, j:j + width],
                                     kernel[i, j])
        h = v + current
        s = (h >= thr).astype(float)
        v = h * (1 - s)
        tr_pre = tr_pre - tr_pre / tau_pre + xp[:, t]
        tr_post = tr_post - tr_post / tau_post + s
        for i in range(3):
            for j in range(3):
                potentiation[i, j] += np.einsum("bhwc,bhwo->co",
                                                tr_pre[:, i:i + height, j:j + width], s)
                depression[i, j] += np.einsum("bhwc,bhwo->co",
                                              xp[:, t, i:i + height, j:j + width], tr_post)
    w = np.clip(kernel, lo, hi)
    return w * potentiation - w * depression


def test_stdp_conv_snn_postsynaptic_neurons_from_the_parser(rng):
    """Conv2D (in FoldTime) -> IFNeurons: the neurons are found by the parser, the kernel's
    gradient is -dW of SpikingJelly's STDP with f = clamp(W, -1, 1), the Dense layer after it
    gets its backpropagated gradient."""
    keras.config.set_dtype_policy("float64")
    steps = 5
    conv = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)
    dense = keras.layers.Dense(2)
    inputs = keras.Input((steps, 6, 6, 2))
    h = kspike.FoldTime(conv)(inputs)
    h = kspike.IFNeurons(thr=0.5, name="if1")(h)
    h = kspike.FoldTime(keras.layers.MaxPooling2D(2))(h)
    h = kspike.FoldTime(keras.layers.Flatten())(h)
    h = kspike.FoldTime(dense)(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(h))
    kernel = rng.normal(size=(3, 3, 2, 3)) * 0.8
    conv.set_weights([kernel])
    x = (rng.random((2, steps, 6, 6, 2)) < 0.4).astype("float64")
    rule = STDP(tau_pre=2.0, tau_post=100.0, f_pre=kspike.learning.stdp.Clamp(),
                f_post=kspike.learning.stdp.Clamp(), synapse=conv)
    assert "Clamp(w_min=-1.0" in repr(rule)
    assert kspike.learning.stdp.postsynaptic_neurons(model, conv)[1].name == "if1"
    y = np.array([0, 1])
    result = rule.compute(model, x, y, keras.losses.SparseCategoricalCrossentropy(True))
    expected = numpy_conv_stdp(x, kernel, 0.5, 2.0, 100.0, -1.0, 1.0)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(-result.gradients[0].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert result.gradients[1] is not None and np.abs(result.gradients[1]).max() > 0
    pre, post = rule.activity_layers(model)
    probe = keras.Model(model.inputs[0], [pre, post])
    grads = rule.batch_gradients(*probe(x))
    assert grads[0][1] is conv.kernel
    np.testing.assert_allclose(-grads[0][0].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_stdp_conv_snn_bad_models():
    conv = keras.layers.Conv2D(2, 3, padding="same")
    inputs = keras.Input((3, 6, 6, 1))
    h = kspike.FoldTime(conv)(inputs)
    h = kspike.FoldTime(keras.layers.MaxPooling2D(2), name="pool")(h)
    h = kspike.IFNeurons()(h)
    model = keras.Model(inputs, h)
    x = np.zeros((1, 3, 6, 6, 1), "float32")
    with pytest.raises(ValueError, match="followed by layer 'pool' .FoldTime. before any neuron"):
        STDP(synapse=conv).compute(model, x, None, None)
    # a neuron layer given as `neurons` that no synapse precedes
    dense = keras.layers.Dense(4)
    lonely = kspike.IFNeurons(name="lonely")
    model = keras.Sequential([keras.Input((3, 5)), keras.layers.TimeDistributed(dense),
                              kspike.LIFNeurons(), lonely])
    with pytest.raises(ValueError, match="neuron layer 'lonely' .IFNeurons. is not preceded by a "
                                         "synapse"):
        STDP(synapse=dense, neurons=lonely).compute(model, np.zeros((1, 3, 5), "float32"),
                                                   None, None)
    model = keras.Sequential([keras.Input((3, 5)), keras.layers.TimeDistributed(dense)])
    with pytest.raises(ValueError, match="is not followed by a kspike.IFNeurons"):
        STDP(synapse=dense).compute(model, np.zeros((1, 3, 5), "float32"), None, None)
    with pytest.raises(ValueError, match="w_min"):
        kspike.learning.stdp.Clamp(1.0, -1.0)


def test_stdp_refuses_sparse_rewired_kernels():
    cell = kspike.LIF(6, connectivity=0.5, seed=0)
    with pytest.raises(ValueError, match="sparse rewired kernels .connectivity=0.5"):
        STDP(synapse=keras.layers.RNN(cell, return_sequences=True))
