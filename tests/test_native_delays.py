"""Native delayed loops of kspike.SpikingRNN (``n_delay`` > 1, the KspikeDelayed* ops) against
the TensorFlow loop over ``cell.call`` (``SpikingRNN(native=False)``, Keras' loop with the
widened delay kernels) and against the independent NumPy buffer of tests/test_delays.py:
spikes identical, voltages, states and the future-current buffer to float rounding, gradients
with respect to inputs, weights and initial states (the buffer included) to rtol 2e-5."""
import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import engine, native

from test_engine import _assert_close, _inputs, _outputs_and_grads
from test_native import needs_compiler
from test_delays import _spike_inputs, numpy_delayed_network

# 17 rows: two shards of unequal size on a 2-thread pool.
B, T, N_IN, UNITS = 17, 40, 6, 12


def _initial_states(cell, seed=1, batch=B):
    """Random initial states, the future-current buffer nonzero in every slot (its last slot
    too, which only an initial state can fill)."""
    rng = np.random.default_rng(seed)
    n = cell.units
    states = {"v": rng.uniform(-0.5, 1.0, (batch, n)) * cell.thr,
              "b": rng.uniform(0.0, 0.05, (batch, n)),
              "z": (rng.uniform(size=(batch, n)) < 0.3).astype(float),
              "r": rng.integers(0, cell.n_refractory + 1, (batch, n)).astype(float),
              "i_future": rng.uniform(-0.5, 1.0, (batch, cell.n_delay * n)) * cell.thr}
    return [tf.constant(states[name], tf.float32) for name in cell.state_names]


def _delayed_forward_calls(monkeypatch):
    """The ``for_backward`` flag of every native delayed forward traced or run from now on."""
    calls = []
    original = engine._NativeDelayedBackend.forward

    def forward(self, inputs):
        calls.append(self.for_backward)
        return original(self, inputs)
    monkeypatch.setattr(engine._NativeDelayedBackend, "forward", forward)
    return calls


def _pair(make_cell, x_shape, **layer_kwargs):
    layers = [kspike.SpikingRNN(make_cell(), native=flag, **layer_kwargs)
              for flag in (False, True)]
    for layer in layers:
        layer.build(x_shape)
    for source, target in zip(layers[0].weights, layers[1].weights):
        target.assign(source)
    return layers


def _check(make_cell, initial=True, x=None, layer_kwargs=None, min_rate=0.02, rtol=2e-5):
    assert native.available(), native._state["error"]
    layer_kwargs = {"return_sequences": True, "return_state": True, **(layer_kwargs or {})}
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.5) if x is None else x
    tf_loop, native_loop = _pair(make_cell, x.shape, **layer_kwargs)
    assert native_loop.cell.delayed
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _delayed_forward_calls(monkeypatch)
        init = _initial_states(tf_loop.cell, batch=x.shape[0]) if initial else None
        out_t, grad_t = _outputs_and_grads(tf_loop, x, init)
        assert calls == []
        out_n, grad_n = _outputs_and_grads(native_loop, x, init)
        assert calls and all(calls), calls       # the native loop ran, for the backward pass
    units = tf_loop.cell.units
    rate = out_t[0][..., :units].mean()
    assert min_rate <= rate <= 0.6, f"uninformative firing rate {rate}"
    z_final = 1 + list(tf_loop.cell.state_names).index("z")
    np.testing.assert_array_equal(out_t[0][..., :units], out_n[0][..., :units])
    np.testing.assert_array_equal(out_t[z_final], out_n[z_final])
    assert len(out_t) == len(out_n) == 1 + len(tf_loop.cell.state_names)
    for a, b in zip(out_t, out_n):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    names = ["inputs"] + [w.path for w in native_loop.trainable_variables] + \
        [f"initial {s}" for s in (tf_loop.cell.state_names if initial else ())]
    assert len(grad_t) == len(grad_n) == len(names)
    for name, a, b in zip(names, grad_t, grad_n):
        _assert_close(a, b, rtol=rtol, what=name)
    return out_n, grad_n


CELLS = {
    "lif_d2": lambda: kspike.LIF(UNITS, thr=0.05, n_delay=2, seed=3),
    "lif_d10_refractory_bias": lambda: kspike.LIF(
        UNITS, thr=0.05, n_refractory=2, n_delay=10, use_bias=True,
        bias_initializer=keras.initializers.RandomUniform(0.0, 0.05, seed=2), seed=3),
    "lif_input_delays_only": lambda: kspike.LIF(UNITS, thr=0.05, recurrent=False, n_delay=4,
                                                seed=3),
    "alif_d3": lambda: kspike.ALIF(UNITS, thr=0.05, beta=1.8, tau_adaptation=30.0, n_delay=3,
                                   seed=3),
    "alif_mix_refractory_d10": lambda: kspike.ALIF(
        UNITS, n_adaptive=5, thr=0.05, tau_adaptation=30.0, n_refractory=3, n_delay=10,
        seed=3),
    "alif_all_outputs_deep_r": lambda: kspike.ALIF(
        UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0, n_refractory=1, n_delay=5,
        connectivity=0.5, dale=0.8, output="all", seed=3),
}


@needs_compiler
@pytest.mark.parametrize("name", sorted(CELLS))
def test_native_delayed_equals_tensorflow_loop(name):
    _check(CELLS[name])


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", ["alif_all_outputs_deep_r", "lif_d10_refractory_bias"])
def test_rows_in_blocks_over_all_steps(rows, name, monkeypatch):
    # The forward op runs its batch rows in blocks, each over all T steps (17 rows: blocks of
    # 1 or of 3 and a partial one, in each shard); the zero weights of DEEP R kernels add
    # nothing. Training and inference (the forward op alone) as the TensorFlow loop.
    monkeypatch.setattr(engine, "_FORWARD_ROWS_PER_BLOCK", rows)
    _check(CELLS[name])
    tf_loop, native_loop = _pair(CELLS[name], (B, T, N_IN), return_sequences=True,
                                 return_state=True)
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.5, seed=4)
    init = _initial_states(tf_loop.cell, seed=5)
    calls = _delayed_forward_calls(monkeypatch)
    reference, fast = (layer(x, initial_state=init) for layer in (tf_loop, native_loop))
    assert calls == [False]
    np.testing.assert_array_equal(fast[0][..., :UNITS], reference[0][..., :UNITS])
    for a, b in zip(reference, fast):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)


@needs_compiler
def test_short_sequences_leave_currents_in_the_buffer():
    # T < n_delay: initial slots due after the end pass to the final buffer, and its gradient
    # back to them.
    x = _inputs(batch=B, steps=4, features=N_IN, density=0.5)
    _check(lambda: kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0,
                               n_delay=10, seed=3), x=x, min_rate=0.01)


@needs_compiler
@pytest.mark.parametrize("layer_kwargs", [{"return_sequences": False}, {"go_backwards": True}])
def test_last_output_only_and_go_backwards(layer_kwargs):
    _check(lambda: kspike.LIF(UNITS, thr=0.05, n_refractory=1, n_delay=3, seed=3),
           layer_kwargs=layer_kwargs, min_rate=0.0)


@needs_compiler
def test_matches_numpy_buffer_over_300_steps(rng):
    cell = kspike.ALIF(10, n_adaptive=5, thr=0.05, beta=1.0, tau_adaptation=50.0,
                       n_refractory=2, n_delay=5, connectivity=0.6, dale=0.75, seed=3)
    x = _spike_inputs(rng, (3, 300, 6))
    layer = kspike.SpikingRNN(cell, native=True, return_sequences=True, return_state=True)
    outputs = layer(x.astype("float32"))
    spikes, v_final = outputs[0].numpy(), outputs[1].numpy()
    w_in, w_rec = (w.numpy().astype("float64") for w in cell.effective_kernels()[:2])
    expected, v = numpy_delayed_network(x, w_in, w_rec, cell.input_delays,
                                        cell.recurrent_delays, cell.alpha, cell.rho, cell.thr,
                                        cell.beta_vector, cell.n_refractory)
    assert 200 < expected.sum() < 0.5 * expected.size
    np.testing.assert_array_equal(spikes, expected)
    np.testing.assert_allclose(v_final, v[:, -1], rtol=1e-4, atol=1e-5)


@needs_compiler
def test_two_calls_continue_one_sequence_stateful_and_with_states():
    x = _inputs(batch=4, steps=30, features=N_IN, density=0.5)

    def make():
        return kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0,
                           n_refractory=1, n_delay=6, seed=5)
    whole_tf, whole = _pair(make, x.shape, return_sequences=True, return_state=True)
    reference = [o.numpy() for o in whole_tf(x)]
    together = [o.numpy() for o in whole(x)]
    np.testing.assert_array_equal(together[0], reference[0])
    # Two calls, the states (the buffer last) passed from the first to the second.
    first = whole(x[:, :13])
    second = whole(x[:, 13:], initial_state=list(first[1:]))
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]], 1), reference[0])
    for a, b in zip(second[1:], reference[1:]):
        np.testing.assert_allclose(b, a.numpy(), rtol=1e-6, atol=1e-6)
    # stateful=True keeps them between calls, natively as in the TensorFlow loop.
    stateful = _pair(make, (4, None, N_IN), return_sequences=True, stateful=True)
    for layer in stateful:
        layer.build((4, None, N_IN))
    runs = [[layer(x[:, :13]).numpy(), layer(x[:, 13:]).numpy()] for layer in stateful]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate(runs[1], 1), reference[0])
    for a, b in zip(stateful[0].states, stateful[1].states):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)


@needs_compiler
def test_native_dispatch_for_delayed_cells(monkeypatch):
    calls = _delayed_forward_calls(monkeypatch)
    x = _inputs(batch=2, steps=8, features=N_IN)
    layer = kspike.SpikingRNN(kspike.LIF(UNITS, n_delay=3, seed=1), return_sequences=True)
    layer(x)                                    # eager inference: the native forward alone
    assert calls == [False]
    tf.function(lambda x: layer(x))(x)          # a user function: the TensorFlow loop
    assert calls == [False]
    fallback = kspike.SpikingRNN(kspike.LIF(UNITS, n_delay=3, seed=1), native=False)
    fallback(x)
    mask = np.ones((2, 8), bool)
    layer(x, mask=mask)                         # masks: Keras' loop over cell.call
    assert calls == [False]
    strict = kspike.SpikingRNN(kspike.LIF(UNITS, n_delay=3, seed=1), native=True)
    with pytest.raises(ValueError, match="native=True.*a mask was given"):
        strict(x, mask=mask)


@needs_compiler
def test_predict_evaluate_and_trainer_run_the_native_delayed_forward(monkeypatch):
    # Without a tape, model.predict, model.evaluate and the Trainer's evaluation trace the
    # native delayed forward alone (no backward buffers), with the spikes of the TensorFlow
    # loop; a user's tf.function keeps the TensorFlow loop (it may be exported).
    calls = _delayed_forward_calls(monkeypatch)
    models = [keras.Sequential([
        keras.Input((T, N_IN)),
        kspike.SpikingRNN(kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0,
                                      n_refractory=1, n_delay=10, connectivity=0.5,
                                      output="all", seed=3),
                          return_sequences=True, native=flag),
        kspike.LeakyReadout(3, seed=1)]) for flag in ("auto", False)]
    fast, reference = models
    reference.set_weights(fast.get_weights())
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.5)
    y = np.random.default_rng(0).random((B, T, 3)).astype("float32")
    spikes = [keras.Model(m.inputs, m.layers[0].output).predict(x, batch_size=8, verbose=0)
              for m in models]
    assert calls == [False, False], calls            # a full batch of 8 and a partial one
    assert 0.02 < spikes[1][..., :UNITS].mean() < 0.6
    np.testing.assert_array_equal(spikes[0][..., :UNITS], spikes[1][..., :UNITS])
    np.testing.assert_allclose(spikes[0], spikes[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fast.predict(x, verbose=0), reference.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    for model in models:
        model.compile(loss="mse")
    np.testing.assert_allclose(fast.evaluate(x, y, verbose=0),
                               reference.evaluate(x, y, verbose=0), rtol=1e-5)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
    losses = [kspike.Trainer(model, "adam", "mse", verbose=0).evaluate(data)["loss"]
              for model in models]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert calls == [False] * 5, calls               # and predict, evaluate, the Trainer
    tf.function(lambda v: fast(v))(x)
    assert calls == [False] * 5, calls
