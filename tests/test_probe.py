"""kspike.Probe / kspike.plotting.probe: the voltages and thresholds of layers trained with
output="spikes" equal those of the same layers run with output="all"."""
import keras
import numpy as np
import pytest

import kspike


def _x(seed=0, shape=(2, 25, 4)):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=shape) < 0.3).astype("float32")


def _model():
    inputs = keras.Input((None, 4))
    h = kspike.SpikingRNN(kspike.ALIF(6, n_adaptive=3, thr=0.03, seed=1),
                          return_sequences=True, name="alif")(inputs)
    h = keras.layers.Dense(5, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=2),
                           name="dense")(h)
    h = kspike.LIFNeurons(tau=2.0, thr=0.5, name="lif")(h)
    h = keras.layers.RNN(kspike.LIF(3, thr=0.05, seed=3), return_sequences=True, name="rnn")(h)
    return keras.Model(inputs, kspike.LeakyReadout(2, seed=4, name="readout")(h))


def test_probe_equals_output_all():
    model = _model()
    x = _x()
    y, records = kspike.Probe(model)(x)
    np.testing.assert_allclose(y, model(x).numpy(), rtol=0, atol=1e-6)
    assert [r.name for r in records] == ["alif", "lif", "rnn"]
    # The same layers with output="all" and the same weights, run by hand.
    alif = keras.layers.RNN(kspike.ALIF(6, n_adaptive=3, thr=0.03, seed=1, output="all"),
                            return_sequences=True)
    alif.build((None, None, 4))
    alif.set_weights(model.get_layer("alif").get_weights())
    z, v, A = (np.asarray(a) for a in kspike.split_outputs(alif(x)))
    np.testing.assert_array_equal(records[0].spikes, z)
    np.testing.assert_allclose(records[0].voltage, v, rtol=0, atol=1e-6)
    np.testing.assert_allclose(records[0].threshold, A, rtol=0, atol=1e-6)
    assert records[0].dt == 1.0 and 0 < z.mean() < 1
    assert not np.allclose(A[..., 3:], 0.03)       # the adaptive neurons adapt
    s, v_lif = kspike.LIFNeurons(tau=2.0, thr=0.5, output="all")(
        model.get_layer("dense")(z))
    np.testing.assert_array_equal(records[1].spikes, np.asarray(s))
    np.testing.assert_allclose(records[1].voltage, np.asarray(v_lif), rtol=0, atol=1e-6)
    assert records[1].threshold is None and 0 < np.mean(s) < 1
    lif = keras.layers.RNN(kspike.LIF(3, thr=0.05, seed=3, output="all"), return_sequences=True)
    lif.build((None, None, 5))
    lif.set_weights(model.get_layer("rnn").get_weights())
    z3, v3, _ = (np.asarray(a) for a in kspike.split_outputs(lif(np.asarray(s))))
    np.testing.assert_array_equal(records[2].spikes, z3)
    np.testing.assert_allclose(records[2].voltage, v3, rtol=0, atol=1e-6)


def test_probe_follows_weight_changes_and_refuses():
    model = _model()
    probe = kspike.Probe(model)
    x = _x(1)
    before = probe(x)[1][0].voltage
    layer = model.get_layer("alif")
    layer.set_weights([w * 2.0 for w in layer.get_weights()])
    _, records = kspike.plotting.probe(model, x)
    np.testing.assert_allclose(probe(x)[1][0].voltage, records[0].voltage, atol=1e-6)
    assert not np.allclose(records[0].voltage, before)
    with pytest.raises(ValueError, match="no spiking layer"):
        kspike.Probe(keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(2)]))
