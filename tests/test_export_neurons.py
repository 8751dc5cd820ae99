"""kspike.export and kspike.export.litert for the deep-SNN neuron layers (IFNeurons /
LIFNeurons) with convolutions in TimeDistributed / FoldTime, pooling, Flatten, Dense and the
time-mean readout: ``step`` x T equals ``serve`` (spikes identical), LiteRT stepping equals
``serve``, serve takes any T, serve-only exports, and a process that never imports kspike
runs both files."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _images(batch, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(batch, steps, 8, 8, 1)) < 0.4).astype("float32")


def _normal(seed):
    return keras.initializers.RandomNormal(0.0, 1.0, seed=seed)


def _conv_snn(steps=STEPS, mean=True, v_reset=0.0, fold=kspike.FoldTime):
    keras.utils.set_random_seed(3)
    layers = [keras.Input((steps, 8, 8, 1)),
              fold(keras.layers.Conv2D(4, 3, padding="same", use_bias=False,
                                        kernel_initializer=_normal(0)), name="conv"),
              kspike.LIFNeurons(tau=2.0, thr=0.5, v_reset=v_reset, name="lif1"),
              keras.layers.TimeDistributed(keras.layers.AveragePooling2D(2), name="pool"),
              fold(keras.layers.Flatten(), name="flatten"),
              keras.layers.Dense(10, kernel_initializer=_normal(1), name="dense"),
              kspike.IFNeurons(thr=0.2, v_reset=None, name="if2"),   # soft reset
              keras.layers.TimeDistributed(keras.layers.Dense(3), name="readout")]
    if mean:
        layers.append(keras.layers.GlobalAveragePooling1D(name="mean_over_time"))
    return keras.Sequential(layers)


def _spike_probe(model, name):
    """A model from the input to the neuron layer ``name`` (its spikes)."""
    return keras.Model(model.inputs, model.get_layer(name).output)


def _stream(step, initial_state, x):
    states = initial_state(tf.constant(x.shape[0]))
    outputs = []
    for t in range(x.shape[1]):
        y_t, states = step(tf.constant(x[:, t]), states)
        outputs.append(np.asarray(y_t))
    return np.stack(outputs, 1)


def _numpy_conv_snn(model, x):
    """The same network in NumPy, independent of kspike's code."""
    kernel = model.get_layer("conv").layer.kernel.numpy()          # (3, 3, 1, 4)
    dense_w, dense_b = (w.numpy() for w in model.get_layer("dense").weights)
    read_w, read_b = (w.numpy() for w in model.get_layer("readout").weights)
    batch, steps = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((batch, steps, 8, 8, 4))
    for i in range(3):
        for j in range(3):
            conv += padded[:, :, i:i + 8, j:j + 8, :] @ kernel[i, j]
    v1 = np.zeros((batch, 8, 8, 4))
    v2 = np.zeros((batch, 10))
    outputs = []
    for t in range(steps):
        h = v1 + (conv[:, t] - v1) / 2.0
        s1 = (h >= 0.5).astype(float)
        v1 = np.where(s1 > 0, 0.0, h)
        pooled = s1.reshape(batch, 4, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(batch, -1)
        h2 = v2 + pooled @ dense_w + dense_b
        s2 = (h2 >= 0.2).astype(float)
        v2 = h2 - 0.2 * s2
        outputs.append(s2 @ read_w + read_b)
    return np.mean(outputs, axis=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One conv SNN built on keras.Input((T, 8, 8, 1)), exported once to both formats."""
    directory = tmp_path_factory.mktemp("conv_snn")
    model = _conv_snn()
    saved = export.saved_model(model, directory / "saved")
    lite = export.litert(model, str(directory / "conv.tflite"))
    return model, saved, lite


def test_conv_snn_step_equals_serve(exported):
    model, saved, _ = exported
    x = _images(2)
    live = model(x).numpy()
    # The NumPy network agrees with the Keras model (float64 vs float32 round-off).
    np.testing.assert_allclose(live, _numpy_conv_snn(model, x), atol=1e-5)
    loaded = export.load(saved)
    assert loaded.fixed_steps is None and loaded.step_shape == (8, 8, 1)
    # The states: the two voltages (B, 8, 8, 4), (B, 10), the running sum and count.
    assert [tuple(s.shape) for s in loaded.initial_state(2)] == [
        (2, 8, 8, 4), (2, 10), (2, 3), (2, 1)]
    # Built on a fixed T, served for T, 2 T and T / 2 steps; the step of the time-mean
    # readout is the running mean, so step t gives the model's output on the first t steps.
    for steps in (STEPS, 2 * STEPS, STEPS // 2):
        x = _images(2, steps, seed=steps)
        served = loaded.serve(x).numpy()
        streamed = _stream(loaded.step, loaded.initial_state, x)
        np.testing.assert_allclose(streamed[:, -1], served, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(served, _numpy_conv_snn(model, x), atol=1e-5)
    np.testing.assert_allclose(streamed[:, 1], loaded.serve(x[:, :2]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"`x_t` must have shape \(batch, 8, 8, 1\)"):
        loaded.step(np.zeros((2, 8, 8), "float32"), loaded.initial_state(2))
    with pytest.raises(ValueError, match=r"`states\[0\]` must have shape \(2, 8, 8, 4\)"):
        loaded.step(np.zeros((2, 8, 8, 1), "float32"),
                    [np.zeros((2, 8, 8, 3), "float32")] + loaded.initial_state(2)[1:])


def test_spikes_identical_streamed_and_litert(tmp_path):
    # The chain up to the second neuron layer: its spikes, through TimeDistributed convs.
    model = _conv_snn(mean=False, fold=keras.layers.TimeDistributed)
    probe = _spike_probe(model, "if2")
    x = _images(1, seed=4)
    spikes = probe(x).numpy()
    assert 0.05 < spikes.mean() < 0.95
    module = export.StreamingModel(probe)
    np.testing.assert_array_equal(_stream(module.step, module.initial_state, x), spikes)
    np.testing.assert_array_equal(module.serve(x).numpy(), spikes)
    runner = export.load_litert(export.litert(probe, str(tmp_path / "spikes.tflite")))
    assert runner.step_shape == (8, 8, 1) and runner.output_shape == (10,)
    np.testing.assert_array_equal(runner.run(x), spikes)
    with pytest.raises(ValueError, match=r"`x_t` must have shape \(1, 8, 8, 1\)"):
        runner.step(np.zeros((1, 8, 8, 2), np.float32), runner.initial_state())


def test_serve_length_of_an_lsnn_built_on_fixed_T():
    model = keras.Sequential([keras.Input((10, 3)),
                              keras.layers.RNN(kspike.LIF(4, thr=0.05, seed=0),
                                               return_sequences=True),
                              kspike.LeakyReadout(2, seed=1)])
    loaded = export.StreamingModel(model)      # what saved_model writes
    x = (np.random.default_rng(2).uniform(size=(1, 25, 3)) < 0.3).astype("float32")
    np.testing.assert_allclose(loaded.serve(x).numpy(),
                               _stream(loaded.step, loaded.initial_state, x), atol=1e-6)


def test_neuron_layer_refusals(tmp_path):
    cases = [("output='all'", kspike.LIFNeurons(output="all", name="lif_all")),
             ("return_state=True", kspike.IFNeurons(return_state=True, name="if_state"))]
    for expected, layer in cases:
        model = keras.Sequential([keras.Input((5, 4)), layer])
        with pytest.raises(export.ExportError, match=expected.replace("(", r"\(")):
            export.saved_model(model, tmp_path / "x")
    reset = keras.Sequential([keras.Input((5, 4)), kspike.IFNeurons(v_reset=-0.5)])
    with pytest.raises(export.ExportError, match="v_reset"):
        export.litert(reset, str(tmp_path / "r.tflite"))
    # The SavedModel starts such a layer at V_0 = v_reset.
    loaded = export.StreamingModel(reset)
    x = np.random.default_rng(0).uniform(0, 1, (2, 5, 4)).astype("float32")
    np.testing.assert_array_equal(_stream(loaded.step, loaded.initial_state, x), reset(x))
    assert not os.path.exists(tmp_path / "x")


def test_serve_only_export_for_bidirectional(tmp_path, caplog):
    model = keras.Sequential([
        keras.Input((7, 3)),
        keras.layers.Bidirectional(keras.layers.RNN(kspike.LIF(4, thr=0.05, seed=0),
                                                    return_sequences=True)),
        keras.layers.Dense(2)])
    with pytest.raises(export.ExportError, match="streaming=False"):
        export.saved_model(model, tmp_path / "refused")
    path = export.saved_model(model, tmp_path / "serve_only", streaming=False)
    loaded = export.load(path)
    assert not loaded.streaming
    x = (np.random.default_rng(1).uniform(size=(2, 7, 3)) < 0.3).astype("float32")
    np.testing.assert_allclose(loaded.serve(x).numpy(), model(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="streaming=False"):
        loaded.step(x[:, 0], [])
    raw = tf.saved_model.load(path)
    assert not hasattr(raw, "step")
    with pytest.raises(TypeError, match="`streaming`"):
        export.saved_model(model, tmp_path / "bad", streaming="no")
    # A model that needs its static T (Flatten over time): serve-only, exactly T steps, and
    # the export says so.
    fixed = keras.Sequential([keras.Input((7, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    with caplog.at_level("WARNING", logger="kspike"):
        path = export.saved_model(fixed, tmp_path / "fixed", streaming=False)
    assert "exactly T=7 steps" in caplog.text
    loaded = export.load(path)
    assert loaded.fixed_steps == 7
    np.testing.assert_allclose(loaded.serve(x).numpy(), fixed(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, 7, 3\)"):
        loaded.serve(x[:, :5])


_WITHOUT_KSPIKE = textwrap.dedent("""
    import sys
    import numpy as np, tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    saved, lite, data = sys.argv[1:4]
    x = np.load(data)
    loaded = tf.saved_model.load(saved)
    states = loaded.initial_state(tf.constant(x.shape[0]))
    for t in range(x.shape[1]):
        y, states = loaded.step(tf.constant(x[:, t]), states)
    interpreter = Interpreter(model_path=lite)
    run = interpreter.get_signature_runner()
    names = sorted(k for k in run.get_input_details() if k.startswith("state_"))
    lite_states = {n: np.zeros(d["shape"], np.float32) for n, d in
                   sorted(run.get_input_details().items()) if n.startswith("state_")}
    for t in range(x.shape[1]):
        out = run(x_t=np.ascontiguousarray(x[:, t]), **lite_states)
        lite_states = {f"state_{i}": out[f"output_{i + 1}"] for i in range(len(names))}
    assert "kspike" not in sys.modules, "kspike was imported"
    np.save(data + ".serve.npy", loaded.serve(tf.constant(x)).numpy())
    np.save(data + ".step.npy", y.numpy())
    np.save(data + ".lite.npy", out["output_0"])
""")


def test_exports_run_without_kspike(exported, tmp_path):
    # The SavedModel (serve and step) and the LiteRT file (stepped with ai-edge-litert's
    # interpreter) in a fresh process that never imports kspike.
    model, saved, lite = exported
    x = _images(1, seed=5)
    data = str(tmp_path / "x.npy")
    np.save(data, x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1", PYTHONPATH="")
    # Run from an empty folder: the repository (and so kspike) is not on the path.
    run = subprocess.run([sys.executable, "-c", _WITHOUT_KSPIKE, saved, lite, data],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    live = model(x).numpy()
    for suffix in ("serve", "step", "lite"):
        np.testing.assert_allclose(np.load(f"{data}.{suffix}.npy"), live, rtol=1e-5,
                                   atol=1e-6)


def test_mixed_precision_neuron_layers_and_running_mean():
    keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential([keras.Input((None, 4)),
                              kspike.LIFNeurons(tau=2.0, thr=0.3, name="lif"),
                              keras.layers.TimeDistributed(keras.layers.Dense(3)),
                              keras.layers.GlobalAveragePooling1D()])
    module = export.StreamingModel(model)
    assert [s.dtype for s in module.state_specs] == [tf.float32] * 3
    x = np.random.default_rng(3).uniform(0, 1, (2, 40, 4)).astype("float32")
    streamed = _stream(module.step, module.initial_state, x)
    assert streamed.dtype == np.float16
    np.testing.assert_allclose(streamed[:, -1].astype("float32"),
                               module.serve(x).numpy().astype("float32"), rtol=0, atol=2e-3)
