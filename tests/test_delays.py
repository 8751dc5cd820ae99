"""LSNN's synaptic delays (``n_delay`` on kspike.LIF / kspike.ALIF): the delayed current against
an independent NumPy implementation, gradients against finite differences, SpikingRNN against
keras.layers.RNN, .keras round trip, export streaming, argument checks and refusals."""
import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import export, surrogates


def _spike_inputs(rng, shape, p=0.3):
    return ((rng.uniform(size=shape) < p) * rng.uniform(0.5, 1.5, size=shape)).astype("float64")


def numpy_delayed_network(x, w_in, w_rec, d_in, d_rec, alpha, rho, thr, beta, n_refractory):
    """Independent reference: I_t = sum_d (x_{t-d} W_in^(d) + z_{t-1-d} W_rec^(d)), written from
    the spike history (no future buffer), then kspike's ALIF step (LIF: beta = 0)."""
    batch, steps, _ = x.shape
    n = w_in.shape[1]
    n_delay = int(max(d_in.max(), d_rec.max())) + 1
    v, b, z, r = (np.zeros((batch, n)) for _ in range(4))
    history, vs = [], []
    for t in range(steps):
        current = np.zeros((batch, n))
        for d in range(n_delay):
            if t - d >= 0:
                current += x[:, t - d] @ np.where(d_in == d, w_in, 0.0)
            if t - 1 - d >= 0:
                current += history[t - 1 - d] @ np.where(d_rec == d, w_rec, 0.0)
        b = rho * b + (1 - rho) * z
        A = thr + beta * b
        v = alpha * v + (1 - alpha) * current - A * z
        allowed = r == 0
        z = (((v - A) / A) > 0) & allowed
        r = np.where(z, float(n_refractory), np.maximum(r - 1.0, 0.0))
        z = z.astype(np.float64)
        history.append(z)
        vs.append(v)
    return np.stack(history, 1), np.stack(vs, 1)


@pytest.mark.parametrize("kind", ["alif_dense", "lif_deep_r"])
def test_delayed_cell_matches_numpy_over_300_steps(rng, kind):
    keras.config.set_dtype_policy("float64")
    if kind == "alif_dense":
        cell = kspike.ALIF(10, n_adaptive=5, thr=0.05, beta=1.0, tau_adaptation=50.0,
                           n_refractory=2, n_delay=5, seed=3)
    else:
        cell = kspike.LIF(10, thr=0.05, n_refractory=1, n_delay=4, connectivity=0.4,
                          dale=0.75, seed=4)
    x = _spike_inputs(rng, (3, 300, 6))
    layer = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    run = tf.function(lambda x, *states: layer(x, initial_state=list(states) or None))
    outputs = run(x)
    spikes, final = outputs[0].numpy(), outputs[1:]
    w_in, w_rec, _ = (None if w is None else w.numpy() for w in cell.effective_kernels())
    d_in, d_rec = cell.input_delays, cell.recurrent_delays
    assert d_in.shape == (6, 10) and d_rec.shape == (10, 10)
    assert set(np.unique(d_in)) == set(range(cell.n_delay))      # every delay index is used
    beta = cell.beta_vector
    rho = getattr(cell, "rho", 0.0)
    expected, v = numpy_delayed_network(x, w_in, w_rec, d_in, d_rec, cell.alpha, rho,
                                        cell.thr, beta, cell.n_refractory)
    assert 200 < expected.sum() < 0.5 * expected.size             # the network does spike
    np.testing.assert_array_equal(spikes, expected)
    np.testing.assert_allclose(final[0].numpy(), v[:, -1], rtol=1e-10, atol=1e-12)
    # The final buffer (B, n_delay * units) holds the currents still due: slot s is due s + 1
    # steps after the end. Check it by running the reference on 3 further silent steps.
    buffer = final[-1].numpy()
    assert buffer.shape == (3, cell.n_delay * 10)
    assert np.all(buffer[:, -10:] == 0.0)                         # the last slot is empty
    if kind == "alif_dense":
        padded = np.concatenate([x, np.zeros((3, 3, 6))], axis=1)
        longer, _ = numpy_delayed_network(padded, w_in, w_rec, d_in, d_rec, cell.alpha, rho,
                                          cell.thr, beta, cell.n_refractory)
        more = run(np.zeros((3, 3, 6)), *final)[0].numpy()
        np.testing.assert_array_equal(more, longer[:, 300:])


def test_n_delay_1_is_the_undelayed_cell_and_zero_delays_equal_it(rng):
    plain = kspike.ALIF(8, n_adaptive=4, thr=0.02, n_refractory=2, seed=5)
    assert plain.n_delay == 1 and not plain.delayed
    assert plain.state_names == ("v", "b", "z", "r") and plain.state_size == [8] * 4
    layer = keras.layers.RNN(plain, return_sequences=True)
    x = _spike_inputs(rng, (2, 60, 3)).astype("float32")
    y = layer(x).numpy()
    assert [w.name for w in plain.weights] == ["input_kernel", "recurrent_kernel"]
    assert plain.get_config()["n_delay"] == 1
    assert not plain.input_delays.any() and not plain.input_delays.flags.writeable
    # A delayed cell whose delays are all 0 is the same network (same seed, same kernels).
    delayed = kspike.ALIF(8, n_adaptive=4, thr=0.02, n_refractory=2, seed=5, n_delay=3)
    delayed_layer = keras.layers.RNN(delayed, return_sequences=True)
    delayed_layer.build((None, None, 3))
    np.testing.assert_array_equal(delayed.input_kernel.numpy(), plain.input_kernel.numpy())
    delayed._input_delays.assign(np.zeros((3, 8), "int32"))
    delayed._recurrent_delays.assign(np.zeros((8, 8), "int32"))
    np.testing.assert_array_equal(delayed_layer(x).numpy(), y)
    assert y.sum() > 20


class SmoothSpike(surrogates.SpikeFunction):
    """Test-only stand-in: a smooth sigmoid forward, with its true derivative."""
    name = "smooth_delay_test_only"

    def pseudo_derivative(self, x):
        s = tf.sigmoid(4.0 * x)
        return 4.0 * s * (1.0 - s)

    def __call__(self, x):
        return tf.sigmoid(4.0 * tf.convert_to_tensor(x))


def test_delayed_gradients_match_finite_differences_of_smooth_network():
    """Through SpikingRNN (Keras' loop over cell.call with the delay kernels computed once);
    keras.layers.RNN gives the same gradients (test_spiking_rnn_runs_delayed_cells_like...)."""
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(6)
    x = tf.constant(rng.uniform(0, 1, size=(2, 20, 3)), "float64")
    cell = kspike.ALIF(4, n_adaptive=2, thr=0.05, beta=1.5, tau_adaptation=30.0, tau=10.0,
                       surrogate=SmoothSpike(), output="all", n_delay=3, seed=7)
    layer = kspike.SpikingRNN(cell, return_sequences=True)
    layer(x[:, :1])
    readout = tf.constant(rng.normal(size=(20, 12)), "float64")

    @tf.function
    def loss_fn():
        return tf.reduce_sum(layer(x) * readout)

    variables = cell.trainable_variables
    assert len(variables) == 2
    with tf.GradientTape() as tape:
        loss = loss_fn()
    grads = tape.gradient(loss, variables)
    eps = 1e-6
    for var, grad in zip(variables, grads):
        base = var.numpy()
        numeric = np.zeros_like(base)
        for index in np.ndindex(base.shape):
            if var.name == "recurrent_kernel" and index[0] == index[1]:
                continue
            for sign in (1, -1):
                w = base.copy()
                w[index] += sign * eps
                var.assign(w)
                numeric[index] += sign * loss_fn().numpy() / (2 * eps)
            var.assign(base)
        autodiff = grad.numpy()
        if var.name == "recurrent_kernel":
            autodiff = autodiff * (1 - np.eye(4))
        assert np.abs(numeric).max() > 1e-2
        np.testing.assert_allclose(autodiff, numeric, rtol=1e-6, atol=1e-7, err_msg=var.name)


def test_spiking_rnn_runs_delayed_cells_like_keras_rnn(rng):
    x = tf.constant(_spike_inputs(rng, (3, 40, 5)), "float32")
    results = []
    for rnn in (keras.layers.RNN, kspike.SpikingRNN):
        cell = kspike.ALIF(12, n_adaptive=6, thr=0.02, n_refractory=2, n_delay=6, seed=9,
                           connectivity=0.5, dale=0.8)
        model = keras.Sequential([keras.Input((40, 5)), rnn(cell, return_sequences=True),
                                  kspike.LeakyReadout(2, seed=1)])

        @tf.function
        def forward_backward(x):
            with tf.GradientTape() as tape:
                y = model(x)
                loss = tf.reduce_sum(y[:, -20:] ** 2)
            return y, tape.gradient(loss, model.trainable_variables)
        y, grads = forward_backward(x)
        results.append((y.numpy(), [g.numpy() for g in grads]))
    (y_keras, g_keras), (y_fast, g_fast) = results
    np.testing.assert_allclose(y_fast, y_keras, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_fast, g_keras):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Delays no longer keep the native loops away (tests/test_native_delays.py); unroll does.
    assert kspike.engine.why_not_native(kspike.LIF(3, n_delay=4), "float32", "float32",
                                        False) is None
    layer = kspike.SpikingRNN(kspike.LIF(3, n_delay=2), native=True, unroll=True)
    with pytest.raises(ValueError, match="native=True.*unroll=True"):
        layer(np.zeros((1, 4, 2), "float32"))


def _delayed_model(steps=None):
    return keras.Sequential([
        keras.Input((steps, 4)),
        kspike.SpikingRNN(kspike.ALIF(6, n_adaptive=3, thr=0.02, n_refractory=1, n_delay=4,
                                      connectivity=0.6, dale=0.75), return_sequences=True),
        kspike.LeakyReadout(2, seed=3)])


def test_keras_round_trip_keeps_the_delays(tmp_path, rng):
    model = _delayed_model()      # no seed: the delays must come from the file
    x = _spike_inputs(rng, (2, 30, 4)).astype("float32")
    y = model(x).numpy()
    path = tmp_path / "delayed.keras"
    model.save(path)
    keras.utils.set_random_seed(99)
    loaded = keras.saving.load_model(path)
    cell, loaded_cell = model.layers[0].cell, loaded.layers[0].cell
    assert loaded_cell.n_delay == 4
    np.testing.assert_array_equal(loaded_cell.input_delays, cell.input_delays)
    np.testing.assert_array_equal(loaded_cell.recurrent_delays, cell.recurrent_delays)
    assert cell.input_delays.any()
    np.testing.assert_array_equal(loaded(x).numpy(), y)
    # The delays are weights, never trained (DEEP R trains only the magnitudes).
    assert not any("delays" in v.name for v in loaded.trainable_variables)
    assert {"input_delays", "recurrent_delays"} <= {v.name for v in loaded.non_trainable_variables}


def test_export_step_streams_like_serve_with_the_buffer_in_the_state(tmp_path, rng):
    model = _delayed_model(steps=12)
    x = _spike_inputs(rng, (3, 12, 4)).astype("float32")
    live = model(x).numpy()
    loaded = tf.saved_model.load(export.saved_model(model, tmp_path / "delayed"))
    np.testing.assert_allclose(loaded.serve(x).numpy(), live, rtol=0, atol=1e-6)
    states = loaded.initial_state(tf.constant(3))
    outputs = []
    for t in range(12):
        y_t, states = loaded.step(x[:, t], states)
        outputs.append(y_t.numpy())
    np.testing.assert_allclose(np.stack(outputs, 1), live, rtol=1e-5, atol=1e-6)
    # ALIF v, b, z, r, the future-current buffer (3, n_delay * units), readout zhat.
    assert [tuple(s.shape) for s in states] == [(3, 6)] * 4 + [(3, 24), (3, 2)]


@pytest.mark.parametrize("value, error", [(0, ValueError), (-2, ValueError),
                                          (1.5, ValueError), ("3", TypeError),
                                          (True, TypeError), (None, TypeError)])
def test_bad_n_delay_is_refused_naming_the_argument(value, error):
    for cls in (kspike.LIF, kspike.ALIF):
        with pytest.raises(error, match="`n_delay`"):
            cls(4, n_delay=value)
    assert kspike.LIF(4, n_delay=3.0).n_delay == 3


def test_rules_and_nir_refuse_delayed_cells():
    from kspike.learning import EProp, RateBP, STDP, STLLR
    cell = kspike.LIF(5, n_delay=3)
    model = keras.Sequential([keras.Input((10, 3)),
                              keras.layers.RNN(cell, return_sequences=True),
                              kspike.LeakyReadout(2)])
    for rule in (EProp(), STLLR(), RateBP()):
        with pytest.raises(ValueError, match=r"synaptic delays.*n_delay=3"):
            rule.check_model(model)
    # The same with SpikingRNN, whose loops run delayed cells natively.
    fast = keras.Sequential([keras.Input((10, 3)),
                             kspike.SpikingRNN(kspike.LIF(5, n_delay=3), return_sequences=True),
                             kspike.LeakyReadout(2)])
    for rule in (EProp(), STLLR()):
        with pytest.raises(ValueError, match=r"synaptic delays.*n_delay=3"):
            rule.check_model(fast)
    with pytest.raises(ValueError, match=r"STDP does not support synaptic delays.*n_delay=3"):
        STDP(synapse=cell)
    from kspike import nir as knir
    with pytest.raises(knir.NIRExportError, match="n_delay=3"):
        knir.to_nir(model)


def test_raster_colours_excitatory_black_inhibitory_red():
    import matplotlib
    from matplotlib import colors as mcolors
    from kspike import plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spikes = np.zeros((5, 4))
    spikes[1, 0] = spikes[2, 1] = spikes[3, 3] = 1
    colors = plotting.dale_colors([1, -1, 1, -1])
    assert colors == ["black", "red", "black", "red"]
    fig, ax = plt.subplots()
    plotting.raster(ax, spikes, colors=colors)
    drawn = ax.collections[0].get_facecolors()[:, :3]
    np.testing.assert_array_equal(drawn, [mcolors.to_rgb(c) for c in ("black", "red", "red")])
    with pytest.raises(ValueError, match="`colors`"):
        plotting.raster(ax, spikes, colors=["black"])
    fig2 = plotting.activity_figure(np.zeros((5, 2)), spikes, n_regular=2,
                                    neuron_colors=colors)
    alif = fig2.axes[2].collections[0].get_facecolors()[:, :3]
    np.testing.assert_array_equal(alif, [mcolors.to_rgb("red")])
    plt.close(fig)
    plt.close(fig2)
