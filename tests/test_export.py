"""kspike.export: SavedModel with serve / initial_state / step, streaming equals whole-sequence
serving, gradients through the reloaded model, refusals and directory safety."""
import os

import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import export


def _spikes(batch, steps, n_in, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return ((rng.uniform(size=(batch, steps, n_in)) < 0.3)
            * rng.uniform(0.5, 1.5, size=(batch, steps, n_in))).astype(dtype)


def _lsnn(steps=30, n_in=5, rnn=keras.layers.RNN, output="spikes"):
    return keras.Sequential([
        keras.Input((steps, n_in)),
        rnn(kspike.ALIF(8, n_adaptive=4, thr=0.02, n_refractory=2, use_bias=True, seed=1),
            return_sequences=True),
        keras.layers.Dense(6, activation="relu"),
        keras.layers.Dropout(0.5),
        rnn(kspike.LIF(5, thr=0.02, seed=2, output=output), return_sequences=True),
        kspike.LeakyReadout(3, tau=10.0),
    ])


def _tiny(steps=10, n_in=5):
    return keras.Sequential([keras.Input((steps, n_in)),
                             keras.layers.RNN(kspike.LIF(3, seed=8), return_sequences=True)])


def _stream(loaded, x):
    states = loaded.initial_state(tf.constant(x.shape[0]))
    outputs = []
    for t in range(x.shape[1]):
        y_t, states = loaded.step(x[:, t], states)
        outputs.append(y_t.numpy())
    return np.stack(outputs, 1), states


def _save_load(model, directory):
    path = export.saved_model(model, directory)
    assert path == os.path.abspath(directory)
    return tf.saved_model.load(path)


def test_xla_compiled_step_streams_like_serve(tmp_path):
    x = _spikes(3, 30, 5)
    model = _lsnn()
    path = export.saved_model(model, tmp_path / "lsnn_xla", jit_compile=True)
    loaded = tf.saved_model.load(path)
    live = model(x).numpy()
    streamed, _ = _stream(loaded, x)
    # XLA may round differently; on this short stream no spike flips.
    np.testing.assert_allclose(streamed, live, rtol=1e-5, atol=1e-5)
    checked = export.load(path)
    states = checked.initial_state(3)
    with pytest.raises(ValueError, match="states"):
        checked.step(x[:2, 0], states)
    with pytest.raises(TypeError, match="jit_compile"):
        export.saved_model(model, tmp_path / "other", jit_compile="yes")
    assert not os.path.exists(tmp_path / "other")


def test_serve_and_step_reproduce_the_model(tmp_path):
    x = _spikes(3, 30, 5)
    model = _lsnn()
    loaded = _save_load(model, tmp_path / "lsnn")
    live = model(x).numpy()
    # serve takes any T, so the readout filters with its scan instead of the (T, T) matmul
    # the model uses for its static T: float32 round-off.
    np.testing.assert_allclose(loaded.serve(x).numpy(), live, rtol=0, atol=1e-6)
    streamed, states = _stream(loaded, x)
    np.testing.assert_allclose(streamed, live, rtol=1e-5, atol=1e-6)
    # States: ALIF (v, b, z, r), LIF (v, z, r), readout zhat; batch 3.
    assert [tuple(s.shape) for s in states] == [(3, 8)] * 4 + [(3, 5)] * 3 + [(3, 3)]
    initial = loaded.initial_state(3)   # a Python int works too
    assert len(initial) == 8 and not any(np.any(s.numpy()) for s in initial)
    # The serving_default signature is the whole-sequence serve.
    out = loaded.signatures["serving_default"](x=tf.constant(x))
    np.testing.assert_allclose(list(out.values())[0].numpy(), live, rtol=0, atol=1e-6)


def test_streamed_spikes_identical_float64(tmp_path):
    keras.config.set_dtype_policy("float64")
    x = _spikes(2, 60, 4, seed=1, dtype="float64")
    model = keras.Sequential([
        keras.Input((60, 4)),
        keras.layers.RNN(kspike.ALIF(6, thr=0.02, n_refractory=1, seed=3),
                         return_sequences=True),
        keras.layers.RNN(kspike.LIF(5, thr=0.02, output="all", seed=4), return_sequences=True),
    ])
    loaded = _save_load(model, tmp_path / "f64")
    live = model(x).numpy()
    streamed, states = _stream(loaded, x)
    assert streamed.dtype == np.float64 and states[0].dtype == tf.float64
    z, v, A = kspike.split_outputs(live)
    assert z.mean() > 0.02
    z_s, v_s, A_s = kspike.split_outputs(streamed)
    np.testing.assert_array_equal(z_s, z)
    np.testing.assert_allclose(v_s, v, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(loaded.serve(x).numpy(), live)


def test_functional_nested_and_last_output(tmp_path):
    x = _spikes(2, 25, 4, seed=2)
    inner = keras.Sequential([keras.Input((25, 7)),
                              keras.layers.TimeDistributed(keras.layers.Dense(6)),
                              keras.layers.Activation("sigmoid")])
    inputs = keras.Input((25, 4))
    h = keras.layers.RNN(kspike.ALIF(7, thr=0.02, seed=5), return_sequences=True)(inputs)
    h = inner(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.RNN(kspike.LIF(5, thr=0.05, recurrent=False, seed=6))(h)  # last output
    outputs = keras.layers.Dense(2, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    loaded = _save_load(model, tmp_path / "functional")
    live = model(x).numpy()
    assert live.shape == (2, 2)
    np.testing.assert_allclose(loaded.serve(x).numpy(), live, rtol=0, atol=1e-7)
    streamed, _ = _stream(loaded, x)
    np.testing.assert_allclose(streamed[:, -1], live, rtol=1e-5, atol=1e-6)


def test_keras_lstm_and_spiking_rnn(tmp_path):
    x = _spikes(2, 20, 5, seed=3)
    model = keras.Sequential([keras.Input((20, 5)), keras.layers.LSTM(6, return_sequences=True),
                              kspike.SpikingRNN(kspike.ALIF(5, thr=0.02, seed=7),
                                                return_sequences=True),
                              kspike.LeakyReadout(2)])
    loaded = _save_load(model, tmp_path / "mixed_layers")
    live = model(x).numpy()
    np.testing.assert_allclose(loaded.serve(x).numpy(), live, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_stream(loaded, x)[0], live, rtol=1e-5, atol=1e-5)


def test_gradients_through_reloaded_model(tmp_path):
    x = tf.constant(_spikes(2, 15, 5, seed=4))
    model = _lsnn(steps=15)
    loaded = _save_load(model, tmp_path / "grad")

    def input_gradient(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x) ** 2)
        return tape.gradient(loss, x).numpy()

    live = input_gradient(lambda x: model(x, training=False))
    reloaded = input_gradient(loaded.serve)
    assert np.abs(live).max() > 1e-3
    np.testing.assert_allclose(reloaded, live, rtol=1e-5, atol=1e-7)
    # Through the streaming step too: d y_T / d x_0 flows through the states.
    states = loaded.initial_state(2)
    x0 = x[:, 0]
    with tf.GradientTape() as tape:
        tape.watch(x0)
        y_t, states = loaded.step(x0, states)
        loss = tf.reduce_sum(y_t ** 2)
        for t in range(1, 15):
            y_t, states = loaded.step(x[:, t], states)
            loss += tf.reduce_sum(y_t ** 2)
    grad = tape.gradient(loss, x0).numpy()
    np.testing.assert_allclose(grad, live[:, 0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_export(tmp_path, policy):
    keras.config.set_dtype_policy(policy)
    x = _spikes(2, 12, 5, seed=5)
    model = _lsnn(steps=12)
    loaded = export.load(export.saved_model(model, tmp_path / policy))
    assert [spec.dtype for spec in loaded.state_specs[:7]] == [tf.float32] * 7
    live = tf.cast(model(x), "float32").numpy()
    served = tf.cast(loaded.serve(x), "float32").numpy()
    assert np.all(np.isfinite(served))
    # serve takes any T: the readout filters with its scan, not the (T, T) matmul of the
    # model's static T, so the two differ by half-precision round-off (bfloat16: 2^-9 here).
    np.testing.assert_allclose(served, live, rtol=0, atol=4e-3)
    states = loaded.initial_state(2)
    for t in range(12):
        y_t, states = loaded.step(x[:, t], states)
    assert np.all(np.isfinite(tf.cast(y_t, "float32").numpy()))
    assert states[0].dtype == tf.float32


def test_loaded_model_argument_checks(tmp_path):
    model = _lsnn(steps=3)
    path = export.saved_model(model, tmp_path / "checked")
    loaded = export.load(path)
    states = loaded.initial_state(3)
    x_t = np.zeros((3, 5), "float32")
    with pytest.raises(ValueError, match="`states` must be a list of 8 tensors.*received 7"):
        loaded.step(x_t, states[:7])
    with pytest.raises(ValueError, match=r"`states\[4\]` must have shape \(3, 5\)"):
        loaded.step(x_t, states[:4] + [np.zeros((3, 6), "float32")] + states[5:])
    with pytest.raises(ValueError, match=r"`states\[0\]` must have shape \(2, 8\)"):
        loaded.step(x_t[:2], states)
    with pytest.raises(ValueError, match=r"`x_t` must have shape \(batch, 5\)"):
        loaded.step(np.zeros((3, 4), "float32"), states)
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, time, 5\)"):
        loaded.serve(np.zeros((3, 5), "float32"))
    with pytest.raises(ValueError, match="batch_size"):
        loaded.initial_state(0)
    y_t, new_states = loaded.step(x_t, states)
    assert y_t.shape == (3, 3) and len(new_states) == 8
    # The raw TensorFlow object refuses bad arguments too (TensorFlow's own errors), never
    # silently: wrong count, wrong size, and a batch mismatch caught by an in-graph check.
    raw = tf.saved_model.load(path)
    with pytest.raises((TypeError, ValueError)):
        raw.step(x_t, states[:7])
    with pytest.raises((TypeError, ValueError)):
        raw.step(np.zeros((3, 4), "float32"), states)
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch size of x_t"):
        raw.step(x_t[:2], states)
    with pytest.raises(ValueError, match="not a SavedModel"):
        export.load(tmp_path)


def _unsupported_models():
    seq = keras.Input((10, 4))
    cell = lambda: kspike.LIF(3)  # noqa: E731
    yield "go_backwards", keras.Sequential(
        [seq, keras.layers.RNN(cell(), return_sequences=True, go_backwards=True)])
    yield "stateful", keras.Sequential(
        [keras.Input((10, 4), batch_size=2),
         keras.layers.RNN(cell(), return_sequences=True, stateful=True)])
    yield "repeat_vector", keras.Sequential(
        [seq, keras.layers.RNN(cell()), keras.layers.RepeatVector(3, name="repeat_vector")])
    yield "reshape", keras.Sequential(
        [seq, keras.layers.RNN(cell()), keras.layers.Dense(2),
         keras.layers.Reshape((1, 2), name="reshape"), kspike.LeakyReadout(2)])
    yield "conv1d", keras.Sequential([seq, keras.layers.Conv1D(3, 3, name="conv1d")])
    yield "masking", keras.Sequential([seq, keras.layers.Masking(name="masking"),
                                       keras.layers.RNN(cell())])
    yield "axis=1", keras.Sequential([seq, keras.layers.Softmax(axis=1)])
    inputs = keras.Input((10, 4))
    h = keras.layers.RNN(cell(), return_sequences=True)(inputs)
    residual = keras.layers.Dense(3, name="residual_branch")(inputs)
    yield "residual_branch", keras.Model(inputs, keras.layers.Add()([h, residual]))
    a, b = keras.Input((10, 4)), keras.Input((10, 4))
    yield "2 inputs", keras.Model([a, b], keras.layers.Add()([a, b]))
    yield "sequences", keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def test_unsupported_models_are_refused(tmp_path):
    for expected, model in _unsupported_models():
        target = tmp_path / "out"
        with pytest.raises(export.ExportError, match=expected.replace("(", r"\(")):
            export.saved_model(model, target)
        assert not target.exists()   # nothing written on refusal
    assert issubclass(export.ExportError, ValueError)
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        export.saved_model(kspike.LIF(3), tmp_path / "x")


def test_directory_safety(tmp_path):
    model = _tiny()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export.saved_model(model, busy)
    assert os.listdir(busy) == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        export.saved_model(model, a_file, overwrite=True)
    assert a_file.read_text() == "keep"
    with pytest.raises(TypeError, match="`directory`"):
        export.saved_model(model, 3)
    with pytest.raises(TypeError, match="`overwrite`"):
        export.saved_model(model, tmp_path / "new", overwrite="yes")
    # overwrite=True replaces a previous export only: the user's file is refused, kept.
    with pytest.raises(FileExistsError, match="not a previous export.*notes.txt"):
        export.saved_model(model, busy, overwrite=True)
    assert os.listdir(busy) == ["notes.txt"]
    (busy / "notes.txt").unlink()
    export.saved_model(model, busy)
    # A refused model does not touch an existing export either, even with overwrite=True.
    export.saved_model(model, busy, overwrite=True)
    assert "saved_model.pb" in os.listdir(busy)
    bad = keras.Sequential([keras.Input((10, 5)), keras.layers.Conv1D(2, 2)])
    with pytest.raises(export.ExportError):
        export.saved_model(bad, busy, overwrite=True)
    x = _spikes(1, 10, 5)
    reloaded = tf.saved_model.load(str(busy))   # keep a reference: it owns the variables
    np.testing.assert_allclose(reloaded.serve(x).numpy(), model(x).numpy(), atol=1e-7)
    # An empty existing directory is fine; no staging directories are left behind.
    empty = tmp_path / "empty"
    empty.mkdir()
    export.saved_model(model, empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "file.txt"]


def test_available_from_package():
    assert kspike.export is export
    assert callable(kspike.export.saved_model)


def test_spiking_rnn_gradients_through_reloaded_model(tmp_path):
    x = tf.constant(_spikes(2, 15, 5, seed=6))
    model = _lsnn(steps=15, rnn=kspike.SpikingRNN)
    loaded = _save_load(model, tmp_path / "spiking_rnn")
    np.testing.assert_allclose(loaded.serve(x).numpy(), model(x).numpy(), rtol=0, atol=1e-6)
    grads = []
    for fn in (lambda x: model(x, training=False), loaded.serve):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x) ** 2)
        grads.append(tape.gradient(loss, x).numpy())
    assert np.abs(grads[0]).max() > 1e-3
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
