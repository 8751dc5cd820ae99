"""IF/LIF neuron layers (SpikingJelly IFNode/LIFNode semantics): exact dynamics against an
independent NumPy implementation, the hand-written backward against autodiff and finite
differences, Keras composition (TimeDistributed convolutions, residual blocks), streaming,
dtypes, saving and argument checks."""
import os

import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import dynamics, surrogates
from kspike.layers import node_sequence

SHAPE = (2, 120, 3, 4, 2)          # (B, T, H, W, C)


# ----------------------------------------------------------------------------- reference
def spikingjelly_reference(x, tau=None, thr=1.0, v_reset=0.0, decay_input=True, dtype=np.float32):
    """SpikingJelly's multi-step IFNode / LIFNode forward, written from its equations.

    x (B, T, ...) -> spikes and voltages after the reset, each (B, T, ...), in ``dtype``.
    """
    x = np.asarray(x, dtype)
    one = dtype(1.0)
    v = np.full(x[:, 0].shape, 0.0 if v_reset is None else v_reset, dtype)
    spikes, voltages = [], []
    for t in range(x.shape[1]):
        xt = x[:, t]
        if tau is None:
            h = v + xt
        else:
            tau_ = dtype(tau)
            if decay_input:
                if v_reset is None or v_reset == 0.0:
                    h = v + (xt - v) / tau_
                else:
                    h = v + (xt - (v - dtype(v_reset))) / tau_
            elif v_reset is None or v_reset == 0.0:
                h = v * (one - one / tau_) + xt
            else:
                h = v - (v - dtype(v_reset)) / tau_ + xt
        s = (h - dtype(thr) >= 0).astype(dtype)
        if v_reset is None:
            v = h - s * dtype(thr)
        else:
            v = (one - s) * h + s * dtype(v_reset)
        spikes.append(s)
        voltages.append(v)
    return np.stack(spikes, 1), np.stack(voltages, 1)


CONFIGS = [
    # (kind, v_reset, decay_input, detach_reset)
    ("if", 0.0, True, False), ("if", None, True, False), ("if", -0.3, True, True),
    ("lif", 0.0, True, False), ("lif", None, True, False), ("lif", 0.0, False, False),
    ("lif", None, False, True), ("lif", -0.3, True, False), ("lif", 0.2, False, True),
]


def make_layer(kind, v_reset, decay_input, detach_reset, tau=2.5, thr=0.8, **kwargs):
    if kind == "if":
        return kspike.IFNeurons(thr=thr, v_reset=v_reset, detach_reset=detach_reset, **kwargs)
    return kspike.LIFNeurons(tau=tau, thr=thr, v_reset=v_reset, decay_input=decay_input,
                             detach_reset=detach_reset, **kwargs)


def currents(rng, shape=SHAPE, mean=0.6, dtype=np.float32):
    return rng.normal(mean, 1.0, shape).astype(dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_spikingjelly_reference(rng, config):
    kind, v_reset, decay_input, detach_reset = config
    x = currents(rng, mean=1.2 if kind == "lif" and decay_input else 0.3)
    layer = make_layer(*config, output="all")
    spikes, voltages = layer(x)
    ref_s, ref_v = spikingjelly_reference(x, None if kind == "if" else 2.5, 0.8, v_reset,
                                          decay_input)
    assert spikes.shape == SHAPE and voltages.shape == SHAPE
    np.testing.assert_array_equal(spikes.numpy(), ref_s)
    np.testing.assert_allclose(voltages.numpy(), ref_v, rtol=1e-6, atol=1e-6)
    # A real test: both spiking and silent elements, and repeated spikes.
    assert 0.05 < ref_s.mean() < 0.8
    # Plain spikes output equals the "all" spikes.
    np.testing.assert_array_equal(make_layer(*config)(x).numpy(), ref_s)


def test_float64_matches_reference(rng):
    x = currents(rng, dtype=np.float64)
    layer = kspike.LIFNeurons(tau=3.0, v_reset=None, output="all", dtype="float64")
    spikes, voltages = layer(x)
    assert spikes.dtype == tf.float64
    ref_s, ref_v = spikingjelly_reference(x, 3.0, 1.0, None, True, dtype=np.float64)
    np.testing.assert_array_equal(spikes.numpy(), ref_s)
    np.testing.assert_allclose(voltages.numpy(), ref_v, rtol=1e-12, atol=1e-12)


def test_fires_at_exact_threshold():
    # H_t == V_th fires (>=), unlike the LSNN cells' strict test.
    x = np.array([[[1.0], [0.5], [0.5]]], np.float32)          # (1, 3, 1)
    np.testing.assert_array_equal(kspike.IFNeurons()(x).numpy()[0, :, 0], [1.0, 0.0, 1.0])


def test_spike_function_inclusive_forward():
    f = surrogates.get("triangular")
    x = tf.constant([-0.5, 0.0, 0.5])
    np.testing.assert_array_equal(f(x).numpy(), [0.0, 0.0, 1.0])           # cells: >
    np.testing.assert_array_equal(f(x, inclusive=True).numpy(), [0.0, 1.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(f(x, inclusive=True))
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), f.pseudo_derivative(x).numpy())


def test_default_surrogate_is_spikingjelly_sigmoid_alpha_4():
    x = tf.constant(np.linspace(-1.0, 3.0, 21, dtype=np.float32).reshape(1, 1, 21))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(kspike.IFNeurons()(x))
    sig = 1.0 / (1.0 + np.exp(-4.0 * (x.numpy() - 1.0)))
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), 4.0 * sig * (1.0 - sig), rtol=1e-5,
                               atol=1e-6)   # float32 rounding of 1 - sig in the tail


# ------------------------------------------------------------------------------ gradients
def loss_of(spikes, voltages, v_final, weights):
    loss = tf.reduce_sum(spikes * weights[0]) + tf.reduce_sum(v_final * weights[2])
    if voltages is not None:
        loss = loss + tf.reduce_sum(voltages * weights[1])
    return loss


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masked", [False, True])
def test_hand_written_backward_equals_autodiff(rng, config, masked):
    kind, v_reset, decay_input, detach_reset = config
    layer = make_layer(*config, surrogate="triangular", dampening_factor=0.7)
    params = layer.parameters
    x = tf.constant(currents(rng, (40, 3, 2, 5), mean=0.8))                 # (T, B, *F)
    v0 = tf.constant(rng.normal(0.0, 0.5, (3, 2, 5)).astype(np.float32))
    mask = tf.constant(rng.random((40, 3)) > 0.25) if masked else None
    weights = [tf.constant(rng.normal(size=(40, 3, 2, 5)).astype(np.float32)),
               tf.constant(rng.normal(size=(40, 3, 2, 5)).astype(np.float32)),
               tf.constant(rng.normal(size=(3, 2, 5)).astype(np.float32))]
    results = []
    for hand_written in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([x, v0])
            s, v, vf = node_sequence(x, v0, params, mask=mask, return_voltages=True,
                                     hand_written_backward=hand_written)
            loss = loss_of(s, v, vf, weights)
        results.append((s, v, vf) + tuple(tape.gradient(loss, [x, v0])))
    (s1, v1, f1, gx1, gv1), (s2, v2, f2, gx2, gv2) = results
    np.testing.assert_array_equal(s1.numpy(), s2.numpy())
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f1.numpy(), f2.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx1.numpy(), gx2.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gv1.numpy(), gv2.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(gx1.numpy()).max() > 0.1
    if masked:
        held = ~mask.numpy()
        np.testing.assert_array_equal(s1.numpy()[held], 0.0)
        np.testing.assert_array_equal(gx1.numpy()[held], 0.0)


def sequence_and_gradients(x, v0, params, weights, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch([x, v0])
        s, v, vf = node_sequence(x, v0, params, return_voltages=True, **kwargs)
        loss = loss_of(s, v, vf, weights)
    return [t.numpy() for t in (s, v, vf) + tuple(tape.gradient(loss, [x, v0]))]


def test_hand_written_backward_equals_autodiff_float64(rng):
    x = tf.constant(currents(rng, (30, 2, 3, 4), mean=0.8, dtype=np.float64))
    v0 = tf.constant(rng.normal(0.0, 0.5, (2, 3, 4)))
    weights = [tf.constant(rng.normal(size=shape)) for shape in
               ((30, 2, 3, 4), (30, 2, 3, 4), (2, 3, 4))]
    for config in CONFIGS:
        params = make_layer(*config, dtype="float64").parameters       # default sigmoid
        hand = sequence_and_gradients(x, v0, params, weights)
        auto = sequence_and_gradients(x, v0, params, weights, hand_written_backward=False)
        np.testing.assert_array_equal(hand[0], auto[0])
        for a, b in zip(hand[1:], auto[1:]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=str(config))
        assert np.abs(hand[3]).max() > 0.1


def test_native_loops_equal_the_tensorflow_loops(rng):
    from kspike import native
    assert native.available(), f"native loops unavailable: {native.unavailable_reason()}"
    x = tf.constant(currents(rng, (25, 3, 4, 2, 3), mean=0.8))
    v0 = tf.constant(rng.normal(0.0, 0.5, (3, 4, 2, 3)).astype(np.float32))
    weights = [tf.constant(rng.normal(size=shape).astype(np.float32)) for shape in
               ((25, 3, 4, 2, 3), (25, 3, 4, 2, 3), (3, 4, 2, 3))]
    for config in CONFIGS:
        for surrogate, tol in (("triangular", 0.0), ("sigmoid", 2e-5)):
            params = make_layer(*config, surrogate=surrogate).parameters
            assert kspike.layers.native_node_ops(tf.float32, params) is not None
            fast = sequence_and_gradients(x, v0, params, weights)
            loop = sequence_and_gradients(x, v0, params, weights, native=False)
            for a, b in zip(fast[:3], loop[:3]):             # spikes and voltages: to the bit
                np.testing.assert_array_equal(a, b, err_msg=str(config))
            # Gradients: to the bit with a rational surrogate; TensorFlow's sigmoid is its own
            # approximation of 1 / (1 + exp(-x)), so float32 rounding there.
            for a, b in zip(fast[3:], loop[3:]):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(),
                                           err_msg=f"{config} {surrogate}")
    assert kspike.layers.native_node_ops(tf.float64, params) is None
    assert kspike.layers.native_node_ops(tf.float32, params, masked=True) is None


def test_batch_major_native_ops_equal_the_time_major_tensorflow_loops(rng):
    """node_sequence(time_major=False): the native ops on (B, T, *F) as it comes (no
    transposes; rows of 2 blocks, the second 7 elements, shorter than a vector) against the
    TensorFlow loops on the transposed sequence."""
    shape = (3, 17, 5, 411)                                  # F = 2055 = 2048 + 7
    x = tf.constant(currents(rng, shape, mean=0.8))
    v0 = tf.constant(rng.normal(0.0, 0.5, (3, 5, 411)).astype(np.float32))
    weights = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in (shape, shape,
                                                                            (3, 5, 411))]
    swap = (1, 0, 2, 3)
    for config in CONFIGS:
        for surrogate, tol in (("triangular", 0.0), ("sigmoid", 2e-5)):
            params = make_layer(*config, surrogate=surrogate).parameters
            fast = sequence_and_gradients(x, v0, params, weights, time_major=False)
            with tf.GradientTape() as tape:
                tape.watch([x, v0])
                s, v, vf = node_sequence(tf.transpose(x, swap), v0, params,
                                         return_voltages=True, native=False)
                loss = loss_of(tf.transpose(s, swap), tf.transpose(v, swap), vf, weights)
            loop = [tf.transpose(s, swap).numpy(), tf.transpose(v, swap).numpy(), vf.numpy()]
            loop += [g.numpy() for g in tape.gradient(loss, [x, v0])]
            for a, b in zip(fast[:3], loop[:3]):
                np.testing.assert_array_equal(a, b, err_msg=str(config))
            for a, b in zip(fast[3:], loop[3:]):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(),
                                           err_msg=f"{config} {surrogate}")
            assert 0.05 < fast[0].mean() < 0.8 and np.abs(fast[3]).max() > 0.1
    # The batch-major TensorFlow loop (a masked or float64 sequence) is the time-major one
    # on the transposed sequence.
    mask = rng.random((3, 17)) > 0.3
    s_bm, v_bm, f_bm = node_sequence(x, v0, params, mask=mask, return_voltages=True,
                                     time_major=False)
    s_tm, v_tm, f_tm = node_sequence(tf.transpose(x, swap), v0, params, mask=mask.T,
                                     return_voltages=True)
    np.testing.assert_array_equal(s_bm.numpy(), tf.transpose(s_tm, swap).numpy())
    np.testing.assert_array_equal(v_bm.numpy(), tf.transpose(v_tm, swap).numpy())
    np.testing.assert_array_equal(f_bm.numpy(), f_tm.numpy())


def test_training_layer_runs_the_native_ops_without_transposes(rng):
    """Under a gradient tape LIFNeurons runs the native ops on its (B, T, *F) input: the
    traced step holds no Transpose, and its spikes, voltages, final voltage and gradients
    (the input buffer reused for H_t, the output gradient's for dL/dX_t) are those of the
    SpikingJelly reference and of the TensorFlow loops."""
    x = tf.constant(currents(rng, (4, 30, 6, 7), mean=1.0))
    w = tf.constant(rng.normal(size=(4, 30, 6, 7)).astype(np.float32))
    layer = kspike.LIFNeurons(tau=3.0, v_reset=0.0, output="all", return_state=True)
    last = kspike.LIFNeurons(tau=3.0, v_reset=0.0, return_sequences=False)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            currents = x * 1.0                 # an intermediate: its buffer may be reused
            spikes, voltages, v_final = layer(currents)
            loss = (tf.reduce_sum(spikes * w) + tf.reduce_sum(voltages * w)
                    + tf.reduce_sum(v_final) + tf.reduce_sum(last(currents) * w[:, -1]))
        return spikes, voltages, v_final, tape.gradient(loss, x)

    graph = step.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    assert "KspikeNodeForward" in types and "KspikeNodeBackward" in types
    assert "Transpose" not in types
    spikes, voltages, v_final, grad = step(x)
    ref_s, ref_v = spikingjelly_reference(x.numpy(), 3.0, 1.0, 0.0)
    np.testing.assert_array_equal(spikes.numpy(), ref_s)
    np.testing.assert_allclose(voltages.numpy(), ref_v, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v_final.numpy(), ref_v[:, -1], rtol=1e-6, atol=1e-6)
    assert 0.05 < ref_s.mean() < 0.8
    params = layer.parameters
    with tf.GradientTape() as tape:
        tape.watch(x)
        s, v, vf = node_sequence(tf.transpose(x, (1, 0, 2, 3)), tf.zeros((4, 6, 7)), params,
                                 return_voltages=True, native=False)
        s, v = tf.transpose(s, (1, 0, 2, 3)), tf.transpose(v, (1, 0, 2, 3))
        loss = (tf.reduce_sum(s * w) + tf.reduce_sum(v * w) + tf.reduce_sum(vf)
                + tf.reduce_sum(s[:, -1] * w[:, -1]))
    expected = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(grad.numpy(), expected, rtol=2e-5,
                               atol=2e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1


class _SmoothStandIn(surrogates.Sigmoid):
    """pseudo_derivative = the exact derivative of sig(4 x): the smooth forward below."""
    name = "smooth_stand_in_for_tests"


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_step_vjp_matches_finite_differences_of_smooth_stand_in(rng, config):
    """node_step_vjp with a smooth spike S = sig(4 (H - V_th)) is the exact derivative: checked
    by central differences of the smooth sequence (float64)."""
    kind, v_reset, decay_input, _ = config
    base = make_layer(*config).parameters
    params = base._replace(spike_function=_SmoothStandIn(dampening=1.0))
    steps, shape = 12, (2, 3)
    x = rng.normal(0.8, 1.0, (steps,) + shape)
    w_s = rng.normal(size=(steps,) + shape)
    w_v = rng.normal(size=shape)

    def forward(x):
        v = np.full(shape, dynamics.node_initial_voltage(params))
        record = []
        for t in range(steps):
            h = dynamics.node_charge(tf.constant(v), tf.constant(x[t]), params).numpy()
            s = 1.0 / (1.0 + np.exp(-4.0 * (h - params.thr)))
            record.append((h, s))
            v = (h - params.thr * s) if params.v_reset is None else \
                (1.0 - s) * h + s * params.v_reset
        loss = sum(np.sum(w_s[t] * record[t][1]) for t in range(steps)) + np.sum(w_v * v)
        return loss, record

    _, record = forward(x)
    grad_v = tf.constant(w_v)
    grad_x = np.zeros_like(x)
    for t in reversed(range(steps)):
        h, s = record[t]
        gx, grad_v = dynamics.node_step_vjp(tf.constant(w_s[t]), grad_v, tf.constant(h),
                                            tf.constant(s), params)
        grad_x[t] = gx.numpy()
    eps = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        numeric[index] = (forward(up)[0] - forward(down)[0]) / (2 * eps)
    np.testing.assert_allclose(grad_x, numeric, rtol=1e-5, atol=1e-7)


def test_layer_gradient_uses_hand_written_backward_and_reaches_inputs(rng):
    x = tf.constant(currents(rng, (2, 10, 4, 4, 3)))
    layer = kspike.LIFNeurons(v_reset=None, detach_reset=True)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.range(10, dtype=tf.float32)[None, :, None, None, None])
    g = tape.gradient(loss, x)
    s, _, _ = node_sequence(tf.transpose(x, (1, 0, 2, 3, 4)), tf.zeros((2, 4, 4, 3)),
                            layer.parameters, hand_written_backward=False)
    with tf.GradientTape() as tape:
        tape.watch(x)
        s, _, _ = node_sequence(tf.transpose(x, (1, 0, 2, 3, 4)), tf.zeros((2, 4, 4, 3)),
                                layer.parameters, hand_written_backward=False)
        loss = tf.reduce_sum(s * tf.range(10, dtype=tf.float32)[:, None, None, None, None])
    np.testing.assert_allclose(g.numpy(), tape.gradient(loss, x).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- state and streaming
def test_initial_state_and_return_state_continue_a_sequence(rng):
    x = currents(rng, (2, 30, 5, 3))
    layer = kspike.LIFNeurons(tau=4.0, return_state=True)
    full, v_full = layer(x)
    first, v_half = layer(x[:, :17])
    second, v_end = layer(x[:, 17:], initial_state=v_half)
    np.testing.assert_array_equal(np.concatenate([first, second], 1), full.numpy())
    np.testing.assert_allclose(v_end.numpy(), v_full.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="initial_state"):
        layer(x, initial_state=v_half[:, 0])


def test_stateful_streaming(rng):
    x = currents(rng, (2, 24, 6))
    inputs = keras.Input((None, 6), batch_size=2)
    model = keras.Model(inputs, kspike.IFNeurons(v_reset=None, stateful=True)(inputs))
    full = kspike.IFNeurons(v_reset=None)(x).numpy()
    chunks = [model(x[:, t:t + 5]).numpy() for t in range(0, 24, 5)]
    np.testing.assert_array_equal(np.concatenate(chunks, 1), full)
    model.layers[-1].reset_state()
    np.testing.assert_array_equal(model(x[:, :5]).numpy(), full[:, :5])
    with pytest.raises(ValueError, match="fixed batch size"):
        kspike.IFNeurons(stateful=True)(keras.Input((None, 6)))
    with pytest.raises(ValueError, match="batch"):
        model.layers[-1](x[:1, :5])


def test_return_sequences_false_and_shapes(rng):
    x = currents(rng, (3, 7, 4, 2))
    last = kspike.LIFNeurons(return_sequences=False)(x)
    np.testing.assert_array_equal(last.numpy(), kspike.LIFNeurons()(x).numpy()[:, -1])
    layer = kspike.LIFNeurons(output="all", return_state=True)
    assert layer.compute_output_shape((3, 7, 4, 2)) == [(3, 7, 4, 2)] * 2 + [(3, 4, 2)]
    outputs = layer(x)
    assert [tuple(o.shape) for o in outputs] == [(3, 7, 4, 2)] * 2 + [(3, 4, 2)]


def test_mask_holds_voltage(rng):
    x = currents(rng, (2, 20, 3))
    mask = np.ones((2, 20), bool)
    mask[0, 5:9] = False
    mask[1, 15:] = False
    spikes, voltages = kspike.LIFNeurons(output="all")(x, mask=mask)
    for b in range(2):
        ref_s, ref_v = spikingjelly_reference(x[b:b + 1, mask[b]], 2.0, 1.0, 0.0)
        np.testing.assert_array_equal(spikes.numpy()[b, mask[b]], ref_s[0])
        np.testing.assert_array_equal(spikes.numpy()[b, ~mask[b]], 0.0)
        np.testing.assert_allclose(voltages.numpy()[b, mask[b]], ref_v[0], atol=1e-6)
    # A Keras mask of a (B, T, H, W, C) input, (B, T, H, W), masks the steps that are all
    # masked.
    images = np.repeat(x[:, :, :, None, None], 2, axis=3)                 # (2, 20, 3, 2, 1)
    images[~mask] = 0.0
    inputs = keras.Input((20, 3, 2, 1))
    spikes_5d = keras.Model(inputs, kspike.LIFNeurons()(keras.layers.Masking(0.0)(inputs)))(
        images)
    np.testing.assert_array_equal(spikes_5d.numpy()[..., 0, 0], spikes.numpy())
    # Keras masks propagate through the layer.
    inputs = keras.Input((None, 3))
    masked = keras.layers.Masking(0.0)(inputs)
    out = keras.layers.GRU(2)(kspike.LIFNeurons()(masked))
    assert keras.Model(inputs, out)(x).shape == (2, 2)


def test_mixed_precision(rng):
    x = currents(rng, (2, 16, 4, 4, 2)).astype(np.float16)
    reference = kspike.LIFNeurons(tau=3.0)(x.astype(np.float32)).numpy()
    layer = kspike.LIFNeurons(tau=3.0, dtype="mixed_float16")
    y = layer(x)
    assert y.dtype == tf.float16 and layer.state_dtype == "float32"
    np.testing.assert_array_equal(y.numpy().astype(np.float32), reference)


# ------------------------------------------------------------------------ Keras composition
def conv_snn(steps=3, size=8):
    td = keras.layers.TimeDistributed
    return keras.Sequential([
        keras.Input((steps, size, size, 1)),
        td(keras.layers.Conv2D(4, 3, padding="same", use_bias=False)),
        td(keras.layers.BatchNormalization()),
        kspike.LIFNeurons(),
        td(keras.layers.MaxPooling2D()),
        td(keras.layers.Flatten()),
        td(keras.layers.Dense(16)),
        kspike.IFNeurons(v_reset=None),
        td(keras.layers.Dropout(0.2)),
        td(keras.layers.Dense(3)),
        keras.layers.GlobalAveragePooling1D(),
    ])


def test_convolutional_snn_trains_and_round_trips(rng, tmp_path):
    x = rng.random((16, 3, 8, 8, 1)).astype(np.float32) * 3.0
    y = rng.integers(0, 3, 16)
    model = conv_snn()
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    changed = [not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert all(changed)          # gradients reach every layer through both neuron layers
    path = os.path.join(tmp_path, "conv_snn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    assert loaded.layers[2].get_config() == model.layers[2].get_config()


def test_residual_block_with_add(rng):
    td = keras.layers.TimeDistributed
    inputs = keras.Input((4, 6, 6, 3))
    h = td(keras.layers.Conv2D(3, 3, padding="same"))(inputs)
    h = kspike.LIFNeurons()(td(keras.layers.BatchNormalization())(h))
    h = td(keras.layers.Conv2D(3, 3, padding="same"))(h)
    h = keras.layers.Add()([h, inputs])
    h = kspike.LIFNeurons(v_reset=None)(h)
    out = keras.layers.GlobalAveragePooling1D()(td(keras.layers.Dense(2))(
        td(keras.layers.Flatten())(h)))
    model = keras.Model(inputs, out)
    x = rng.random((4, 4, 6, 6, 3)).astype(np.float32) * 2.0
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert np.abs(grads[0].numpy()).max() > 0


@pytest.mark.parametrize("cls", [kspike.IFNeurons, kspike.LIFNeurons])
def test_config_round_trip(cls):
    layer = cls(thr=0.5, v_reset=None, surrogate="ntail", dampening_factor=0.4, sharpness=2.0,
                detach_reset=True, return_sequences=False, return_state=True, output="all")
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert clone.spike_function == layer.spike_function
    obj = cls(surrogate=surrogates.get("gaussian", dampening=0.2))
    assert cls.from_config(obj.get_config()).spike_function == obj.spike_function


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"tau": 0.5}, ValueError, "tau"),
    ({"tau": float("nan")}, ValueError, "tau"),
    ({"tau": "2"}, TypeError, "tau"),
    ({"thr": 0.0}, ValueError, "thr"),
    ({"thr": -1.0}, ValueError, "thr"),
    ({"thr": float("inf")}, ValueError, "thr"),
    ({"v_reset": "zero"}, TypeError, "v_reset"),
    ({"v_reset": float("nan")}, ValueError, "v_reset"),
    ({"surrogate": "nope"}, ValueError, "Available"),
    ({"surrogate": 3}, TypeError, "surrogate"),
    ({"decay_input": 1}, TypeError, "decay_input"),
    ({"detach_reset": "yes"}, TypeError, "detach_reset"),
    ({"output": "voltages"}, ValueError, "output"),
    ({"dampening_factor": 0.0}, ValueError, "dampening_factor"),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kspike.LIFNeurons(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank >= 3"):
        kspike.IFNeurons()(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        kspike.IFNeurons()(np.zeros((2, 3, 4), np.int32))


# ------------------------------------------------------------------------------- FoldTime
def test_fold_time_matches_time_distributed_and_pools_batch_statistics(rng, tmp_path):
    x = rng.normal(size=(3, 5, 6, 6, 2)).astype(np.float32)
    conv = keras.layers.Conv2D(4, 3, padding="same")
    folded = kspike.FoldTime(conv)
    y = folded(x)
    assert tuple(y.shape) == (3, 5, 6, 6, 4)
    np.testing.assert_allclose(y.numpy(), keras.layers.TimeDistributed(conv)(x).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert folded.compute_output_shape((3, 5, 6, 6, 2)) == (3, 5, 6, 6, 4)
    # BatchNormalization in training: statistics over all B * T samples.
    bn = kspike.FoldTime(keras.layers.BatchNormalization(epsilon=1e-6))
    z = bn(x * np.arange(1, 6, dtype=np.float32)[None, :, None, None, None], training=True)
    z = z.numpy()
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2, 3)), 1.0, atol=1e-3)
    assert abs(z[:, 0].std() - z[:, 4].std()) > 0.5        # not normalised per step
    # Inside a model with the neuron layers, and through a .keras file.
    inputs = keras.Input((5, 6, 6, 2))
    h = kspike.LIFNeurons()(kspike.FoldTime(keras.layers.BatchNormalization())(
        kspike.FoldTime(keras.layers.Conv2D(4, 3, padding="same"))(inputs)))
    out = keras.layers.GlobalAveragePooling1D()(kspike.FoldTime(keras.layers.Dense(2))(
        kspike.FoldTime(keras.layers.Flatten())(h)))
    model = keras.Model(inputs, out)
    path = os.path.join(tmp_path, "folded.keras")
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x).numpy(), model(x).numpy(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="time"):
        kspike.FoldTime(keras.layers.Dense(2))(np.zeros((2, 3), np.float32))


# ------------------------------------------------------ activity recording and the Trainer
def small_conv_snn(steps=4, size=6):
    fold = kspike.FoldTime
    inputs = keras.Input((steps, size, size, 1))
    h = fold(keras.layers.Conv2D(3, 3, padding="same"), name="conv")(inputs)
    h = kspike.LIFNeurons(thr=0.5, name="lif")(h)
    h = fold(keras.layers.Flatten(), name="flatten")(h)
    h = fold(keras.layers.Dense(5), name="dense")(h)
    h, v = kspike.IFNeurons(thr=0.5, v_reset=None, output="all", name="if")(h)
    scores = fold(keras.layers.Dense(2), name="readout")(h)
    outputs = keras.layers.GlobalAveragePooling1D()(scores)
    return keras.Model(inputs, outputs)


def test_record_activity_and_firing_rate_logs_see_neuron_layers(rng):
    model = small_conv_snn()
    x = tf.constant(rng.random((3, 4, 6, 6, 1)).astype(np.float32) * 2.0)
    predictions, acts = kspike.regularizers.record_activity(model, x)
    np.testing.assert_array_equal(predictions.numpy(), model(x).numpy())
    assert [a.name for a in acts] == ["lif", "if"]
    inner = keras.Model(model.inputs, [model.get_layer("lif").output,
                                       *model.get_layer("if").output])
    z1, z2, v2 = [t.numpy() for t in inner(x)]
    assert acts[0].spikes.shape == (3, 4, 6, 6, 3) and acts[0].voltage is None
    np.testing.assert_array_equal(acts[0].spikes.numpy(), z1)
    np.testing.assert_array_equal(acts[1].spikes.numpy(), z2)
    np.testing.assert_array_equal(acts[1].voltage.numpy(), v2)
    assert acts[1].threshold is None and acts[0].dt == acts[1].dt == 1.0
    assert 0.0 < z1.mean() < 1.0 and 0.0 < z2.mean() < 1.0
    logs = kspike.regularizers.firing_rate_logs(acts)
    # Hz at dt = 1 ms per step; the overall rate weights each layer by its 108 and 5 neurons.
    np.testing.assert_allclose(float(logs["firing_rate/lif"]), 1000 * z1.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(logs["firing_rate/if"]), 1000 * z2.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(logs["firing_rate"]),
                               1000 * (108 * z1.mean() + 5 * z2.mean()) / 113, rtol=1e-6)
    # target 100 Hz = 0.1 spikes per 1 ms step; the penalty is on spikes per ms
    reg = kspike.FiringRateRegularizer(target=100.0, strength=0.5, layers=["lif"])
    expected = 0.5 * np.sum((z1.mean(axis=(0, 1)) - 0.1) ** 2)       # per neuron (H, W, C)
    np.testing.assert_allclose(float(reg(acts)), expected, rtol=1e-5)


def test_trainer_trains_on_image_sequences_and_logs_layer_rates(rng):
    model = small_conv_snn()
    x = rng.random((8, 4, 6, 6, 1)).astype(np.float32) * 2.0
    y = rng.integers(0, 2, 8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    trainer = kspike.Trainer(model, keras.optimizers.Adam(1e-2),
                             keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             metrics=["accuracy"], seed=0, verbose=0)
    before = model.get_layer("conv").get_weights()[0].copy()
    history = trainer.fit(ds, epochs=1)
    assert not np.allclose(before, model.get_layer("conv").get_weights()[0])
    assert {"firing_rate", "firing_rate/lif", "firing_rate/if"} <= set(history.history)
    assert history.history["firing_rate/lif"][-1] > 0.0
    with pytest.raises(ValueError, match=r"rank >= 3.*\(8, 144\)"):
        kspike.Trainer(model, "adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), verbose=0).fit(
            tf.data.Dataset.from_tensor_slices((x.reshape(8, -1), y)).batch(8), epochs=1)


def _node_op_calls(monkeypatch):
    """One entry per neuron-layer sequence handed to the native ops from now on."""
    from kspike import layers as kspike_layers
    calls = []
    original = kspike_layers._native_node_sequence

    def run(*args, **kwargs):
        calls.append(args[1].shape.as_list())
        return original(*args, **kwargs)
    monkeypatch.setattr(kspike_layers, "_native_node_sequence", run)
    return calls


def _saved_op_types(path):
    """Every op type in the graph and function library of the SavedModel at ``path``."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    types = set()
    for graph in saved.meta_graphs:
        types.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            types.update(node.op for node in function.node_def)
    return types


def test_inference_runs_the_native_node_ops_and_exports_hold_none(rng, monkeypatch, tmp_path):
    """Eager calls, predict, evaluate and the Trainer's evaluation run IF/LIF layers on the
    native ops, with the spikes and outputs of the TensorFlow loop (which a user's
    tf.function without a tape traces); every export written after them holds TensorFlow ops
    only."""
    from kspike import native
    assert native.available(), f"native loops unavailable: {native.unavailable_reason()}"
    calls = _node_op_calls(monkeypatch)
    keras.utils.set_random_seed(0)
    steps = 20
    model = keras.Sequential([
        keras.Input((steps, 3, 4, 2)),
        kspike.LIFNeurons(tau=3.0, thr=0.5, name="lif"),
        keras.layers.TimeDistributed(keras.layers.Flatten()),
        keras.layers.Dense(5, kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0)),
        kspike.IFNeurons(thr=0.3, v_reset=None, name="if"),   # soft reset
        keras.layers.GlobalAveragePooling1D()])
    model.compile("adam", "mse")
    probe = keras.Model(model.inputs[0], model.get_layer("lif").output)
    x = currents(rng, (6, steps, 3, 4, 2), mean=0.6)
    y = rng.random((6, 5)).astype(np.float32)
    user = tf.function(lambda v: (model(v), probe(v)))
    expected, expected_spikes = [t.numpy() for t in user(tf.constant(x))]
    assert calls == []                                         # the TensorFlow loop
    assert 0.05 < expected_spikes.mean() < 0.8 and expected.max() > 0.0
    np.testing.assert_array_equal(probe(x).numpy(), expected_spikes)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-6, atol=1e-7)
    assert len(calls) == 3                                     # eager: lif, lif, if
    np.testing.assert_allclose(model.predict(x, batch_size=4, verbose=0), expected,
                               rtol=1e-6, atol=1e-7)
    assert len(calls) >= 5                                     # predict's traces
    before = len(calls)
    loss = model.evaluate(x, y, verbose=0)
    assert len(calls) > before
    before = len(calls)
    np.testing.assert_allclose(loss, np.mean((expected - y) ** 2), rtol=1e-5)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    trainer_loss = kspike.Trainer(model, "adam", "mse", verbose=0).evaluate(data)["loss"]
    np.testing.assert_allclose(trainer_loss, loss, rtol=1e-5)
    assert len(calls) > before
    model.fit(x, y, epochs=1, batch_size=6, verbose=0)
    served = model(x).numpy()

    class UserModule(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec((None, steps, 3, 4, 2))])
        def serve(self, v):
            return self.model(v)

    paths = {"kspike": kspike.export.saved_model(model, str(tmp_path / "kspike_export")),
             "keras": str(tmp_path / "keras_export"), "tf": str(tmp_path / "tf_saved_model"),
             "user": str(tmp_path / "user_function")}
    model.export(paths["keras"], verbose=False)
    tf.saved_model.save(model, paths["tf"])
    tf.saved_model.save(UserModule(model), paths["user"])
    for route, path in paths.items():
        types = _saved_op_types(path)
        assert "While" in types or "StatelessWhile" in types, route   # the TensorFlow loop
        assert not {t for t in types if t.startswith("Kspike")}, route
        loaded = tf.saved_model.load(path)
        out = (loaded.signatures["serving_default"](tf.constant(x)) if route == "tf"
               else loaded.serve(tf.constant(x)))
        out = list(out.values())[0] if isinstance(out, dict) else out
        np.testing.assert_allclose(out.numpy(), served, rtol=1e-5, atol=1e-6, err_msg=route)
