"""kspike.export.litert / load_litert: the .tflite step stepped T times equals the Keras model
and the SavedModel step; quantised variants within tolerance; file safety; argument checks."""
import os

import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import export

pytest.importorskip("ai_edge_litert")

STEPS = 30


def _spikes(batch, steps, n_in, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.uniform(size=(batch, steps, n_in)) < 0.3)
            * rng.uniform(0.5, 1.5, size=(batch, steps, n_in))).astype("float32")


def _model(*layers, n_in=5):
    return keras.Sequential([keras.Input((STEPS, n_in)), *layers])


def _rnn(cell):
    return keras.layers.RNN(cell, return_sequences=True)


CASES = {
    "lif": lambda: _model(_rnn(kspike.LIF(12, thr=0.02, seed=1))),
    "alif": lambda: _model(_rnn(kspike.ALIF(12, thr=0.02, beta=0.5, tau_adaptation=50.0,
                                            seed=1))),
    "mix_refractory": lambda: _model(_rnn(kspike.ALIF(12, n_adaptive=6, thr=0.02, beta=0.5,
                                                      n_refractory=3, use_bias=True,
                                                      seed=1))),
    "deep_r_sparse": lambda: _model(_rnn(kspike.LIF(12, thr=0.02, connectivity=0.2, seed=1))),
    "two_layers": lambda: _model(_rnn(kspike.ALIF(12, n_adaptive=6, thr=0.02, seed=1)),
                                 _rnn(kspike.LIF(6, thr=0.02, n_refractory=2, seed=2))),
    "spiking_rnn": lambda: _model(kspike.SpikingRNN(kspike.LIF(12, thr=0.02, seed=1),
                                                    return_sequences=True)),
}


def _convert(model, tmp_path, name="model.tflite", **kwargs):
    return export.load_litert(export.litert(model, tmp_path / name, **kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_runner_spikes_equal_model(case, tmp_path):
    model = CASES[case]()
    x = _spikes(2, STEPS, 5)
    runner = _convert(model, tmp_path, batch_size=2)
    y = runner.run(x)
    expected = model(x).numpy()
    assert expected.sum() > 10, "the test needs spikes"
    np.testing.assert_array_equal(y, expected)


def test_readout_outputs_equal_model_and_saved_model(tmp_path):
    model = _model(_rnn(kspike.ALIF(16, n_adaptive=8, thr=0.02, n_refractory=2, seed=1)),
                   keras.layers.Dense(6, activation="relu"),
                   kspike.LeakyReadout(3, tau=10.0, seed=3))
    x = _spikes(1, STEPS, 5, seed=4)
    runner = _convert(model, tmp_path)
    loaded = export.load(export.saved_model(model, tmp_path / "saved"))
    states, saved_states = runner.initial_state(), loaded.initial_state(1)
    assert [s.shape for s in states] == [tuple(s.shape) for s in saved_states]
    for t in range(STEPS):
        y_t, states = runner.step(x[:, t], states)
        saved_y, saved_states = loaded.step(x[:, t], saved_states)
        np.testing.assert_allclose(y_t, saved_y.numpy(), rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(states, saved_states):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.run(x), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(model(x).numpy()).max() > 1e-3


def test_float16_quantisation_within_tolerance(tmp_path):
    # float16 weights move each current by ~1e-3 relative: a spike within that of its
    # threshold may flip, so the output is compared with the tolerance of docs/litert.md
    # (1% of the output range; measured 0.08% for 256 ALIF neurons).
    model = _model(_rnn(kspike.ALIF(16, n_adaptive=8, thr=0.02, seed=1)),
                   kspike.LeakyReadout(3, tau=10.0, seed=3))
    x = _spikes(1, STEPS, 5, seed=4)
    expected = model(x).numpy()
    y16 = _convert(model, tmp_path, "f16.tflite", quantize="float16").run(x)
    scale = np.abs(expected).max()
    assert np.abs(y16 - expected).max() <= 0.01 * scale
    assert os.path.getsize(tmp_path / "f16.tflite") < os.path.getsize(
        export.litert(model, tmp_path / "f32.tflite"))
    y8 = _convert(model, tmp_path, "i8.tflite", quantize="int8").run(x)
    assert y8.shape == expected.shape and np.all(np.isfinite(y8))


def test_overwrite_refused_and_allowed(tmp_path):
    model = CASES["lif"]()
    path = tmp_path / "m.tflite"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.litert(model, path)
    assert path.read_bytes() == b"old"
    with pytest.raises(FileExistsError, match="directory"):
        export.litert(model, tmp_path)
    assert export.litert(model, path, overwrite=True) == str(path)
    assert path.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]     # no temporary left


def test_argument_checks(tmp_path):
    model = CASES["alif"]()
    with pytest.raises(ValueError, match="batch_size"):
        export.litert(model, tmp_path / "a.tflite", batch_size=0)
    with pytest.raises(ValueError, match="quantize"):
        export.litert(model, tmp_path / "a.tflite", quantize="int4")
    with pytest.raises(TypeError, match="path"):
        export.litert(model, 3)
    runner = _convert(model, tmp_path, batch_size=2)
    states = runner.initial_state()
    assert len(states) == 4 and all(s.shape == (2, 12) and s.dtype == np.float32
                                    for s in states)
    x_t = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"`x_t` must have shape \(2, 5\)"):
        runner.step(np.zeros((1, 5), np.float32), states)
    with pytest.raises(TypeError, match="`x_t` must have dtype float32"):
        runner.step(x_t.astype(np.float64), states)
    with pytest.raises(ValueError, match="list of 4 arrays"):
        runner.step(x_t, states[:3])
    with pytest.raises(ValueError, match=r"`states\[2\]` must have shape \(2, 12\)"):
        runner.step(x_t, states[:2] + [np.zeros((2, 11), np.float32)] + states[3:])
    with pytest.raises(TypeError, match=r"`states\[0\]` must be a numpy array"):
        runner.step(x_t, [tf.zeros((2, 12))] + states[1:])
    with pytest.raises(ValueError, match="`x` must be a numpy array of shape"):
        runner.run(np.zeros((2, 5), np.float32))


def test_unsupported_layer_refused(tmp_path):
    model = _model(keras.layers.Conv1D(4, 3))
    with pytest.raises(export.ExportError, match="conv1d"):
        export.litert(model, tmp_path / "c.tflite")
    assert not (tmp_path / "c.tflite").exists()


def test_missing_runtime_names_extra(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("ai_edge_litert"):
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"kspike\[edge\]"):
        export.load_litert(tmp_path / "x.tflite")
