"""Firing-rate and voltage regularisers, the activity probe and model.fit regularisation.

Reference values are independent NumPy re-implementations of the formulas written here."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import regularizers as R


def _two_layer_model(output_all=True, T=12):
    inp = keras.Input((T, 5))
    h1 = keras.layers.RNN(kspike.ALIF(8, thr=0.05, seed=1), return_sequences=True,
                          name="alif")(inp)
    h2 = keras.layers.RNN(kspike.LIF(6, thr=0.05, seed=2,
                                     output="all" if output_all else "spikes"),
                          return_sequences=True, name="lif")(h1)
    z2 = keras.layers.Lambda(lambda t: t[..., :6], name="spikes_only")(h2) if output_all else h2
    out = kspike.LeakyReadout(3, seed=3, name="readout")(z2)
    return keras.Model(inp, out, name="net")


def _inputs(B=4, T=12, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant((rng.random((B, T, n)) < 0.4).astype("float32"))


def _np_rate_penalty(z, dt, target, strength):
    rate = z.mean(axis=(0, 1)) / dt
    return strength * np.sum((rate - target) ** 2)


def _np_voltage_penalty(v, A, strength, lower, upper):
    u = (v - A) / A
    excess = np.maximum(u - upper, 0) ** 2 + np.maximum(lower - u, 0) ** 2
    return strength * excess.sum(-1).mean()


def test_firing_rate_value_matches_numpy_with_cell_dt():
    rng = np.random.default_rng(1)
    z1 = (rng.random((3, 10, 4)) < 0.3).astype("float32")
    z2 = (rng.random((3, 10, 5)) < 0.1).astype("float32")
    acts = [R.LayerActivity("a", tf.constant(z1), None, None, 2.0, None),
            R.LayerActivity("b", tf.constant(z2), None, None, 0.5, None)]
    reg = kspike.FiringRateRegularizer(target=20.0, strength=0.7)
    expected = _np_rate_penalty(z1, 2.0, 0.02, 0.7) + _np_rate_penalty(z2, 0.5, 0.02, 0.7)
    np.testing.assert_allclose(float(reg(acts)), expected, rtol=1e-6)
    only_b = kspike.FiringRateRegularizer(target=20.0, strength=0.7, layers=["b"])
    np.testing.assert_allclose(float(only_b(acts)), _np_rate_penalty(z2, 0.5, 0.02, 0.7),
                               rtol=1e-6)


def test_spike_gradient_matches_autodiff_and_formula():
    rng = np.random.default_rng(2)
    z = tf.Variable((rng.random((3, 7, 4)) < 0.4).astype("float32"))
    reg = kspike.FiringRateRegularizer(target=50.0, strength=0.3)
    with tf.GradientTape() as tape:
        penalty = reg.layer_penalty(z, 2.0)
    auto = tape.gradient(penalty, z).numpy()
    rate = z.numpy().mean(axis=(0, 1)) / 2.0
    formula = np.broadcast_to(2 * 0.3 * (rate - 0.05) / (3 * 7 * 2.0), z.shape)
    np.testing.assert_allclose(reg.spike_gradient(z, 2.0).numpy(), formula, rtol=1e-5)
    np.testing.assert_allclose(auto, formula, rtol=1e-5)


def test_voltage_penalty_and_gradient():
    rng = np.random.default_rng(3)
    v = rng.normal(0.0, 0.1, (2, 6, 5)).astype("float32")
    A = (0.05 + rng.random((2, 6, 5)) * 0.05).astype("float32")
    reg = kspike.VoltageRegularizer(strength=0.4, lower=-1.0, upper=0.5)
    acts = [R.LayerActivity("x", None, tf.constant(v), tf.constant(A), 1.0, None)]
    expected = _np_voltage_penalty(v, A, 0.4, -1.0, 0.5)
    assert expected > 0  # the data reaches outside the band, so the test can fail
    np.testing.assert_allclose(float(reg(acts)), expected, rtol=1e-5)
    vv = tf.Variable(v)
    with tf.GradientTape() as tape:
        penalty = reg.layer_penalty(vv, tf.constant(A))
    np.testing.assert_allclose(reg.voltage_gradient(v, A).numpy(),
                               tape.gradient(penalty, vv).numpy(), rtol=1e-5, atol=1e-8)


def test_record_activity_is_the_same_forward_pass():
    model = _two_layer_model()
    x = _inputs()
    predictions, acts = R.record_activity(model, x)
    np.testing.assert_array_equal(predictions.numpy(), model(x).numpy())
    assert [a.name for a in acts] == ["alif", "lif"]
    inner = keras.Model(model.inputs, [model.get_layer("alif").output,
                                       model.get_layer("lif").output])
    z1, all2 = inner(x)
    z2, v2, A2 = kspike.split_outputs(all2)
    np.testing.assert_array_equal(acts[0].spikes.numpy(), z1.numpy())
    assert acts[0].voltage is None and acts[0].threshold is None
    np.testing.assert_array_equal(acts[1].spikes.numpy(), z2.numpy())
    np.testing.assert_array_equal(acts[1].voltage.numpy(), v2.numpy())
    np.testing.assert_array_equal(acts[1].threshold.numpy(), A2.numpy())
    assert acts[0].dt == 1.0
    assert float(tf.reduce_sum(acts[0].spikes)) > 0  # the network is not silent


def test_record_activity_sequential_and_spiking_rnn():
    model = keras.Sequential([keras.Input((10, 3)),
                              kspike.SpikingRNN(kspike.LIF(5, thr=0.05, dt=0.5, seed=0),
                                                return_sequences=True, name="srnn"),
                              kspike.LeakyReadout(2, seed=0)])
    x = _inputs(T=10, n=3)
    predictions, acts = R.record_activity(model, x)
    np.testing.assert_array_equal(predictions.numpy(), model(x).numpy())
    assert [a.name for a in acts] == ["srnn"] and acts[0].dt == 0.5
    rates = R.mean_firing_rates(acts)
    np.testing.assert_allclose(float(rates["srnn"]),
                               1000 * acts[0].spikes.numpy().mean() / 0.5, rtol=1e-6)


def test_clear_errors():
    model = _two_layer_model(output_all=False)
    x = _inputs()
    _, acts = R.record_activity(model, x)
    with pytest.raises(ValueError, match="voltage sequence of layer 'alif'.*output='all'"):
        kspike.VoltageRegularizer()(acts)
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        kspike.FiringRateRegularizer(layers=["nope"])(acts)
    with pytest.raises(ValueError, match="target"):
        kspike.FiringRateRegularizer(target=-0.1)
    with pytest.raises(TypeError, match="strength"):
        kspike.FiringRateRegularizer(strength="high")
    with pytest.raises(ValueError, match="lower"):
        kspike.VoltageRegularizer(lower=1.0, upper=0.0)
    with pytest.raises(TypeError, match="regularizers"):
        R.with_regularization(model, [3])

    inp = keras.Input((12, 5))
    last = keras.layers.RNN(kspike.LIF(4), name="last_only")(inp)
    short = keras.Model(inp, keras.layers.Dense(2)(last))
    _, acts = R.record_activity(short, x)
    assert acts[0].spikes is None
    with pytest.raises(ValueError, match="'last_only'.*return_sequences=True"):
        kspike.FiringRateRegularizer()(acts)

    inner = keras.Sequential([keras.Input((12, 5)),
                              keras.layers.RNN(kspike.LIF(4), return_sequences=True,
                                               name="deep")])
    outer_in = keras.Input((12, 5))
    outer = keras.Model(outer_in, kspike.LeakyReadout(2)(inner(outer_in)), name="outer")
    with pytest.raises(ValueError, match="nested model"):
        R.record_activity(outer, x)


def test_with_regularization_in_model_fit():
    model = _two_layer_model()
    regs = [kspike.FiringRateRegularizer(target=10.0, strength=0.5),
            kspike.VoltageRegularizer(strength=0.01, layers=["lif"])]
    fit_model = R.with_regularization(model, regs)
    x = _inputs(B=8)
    y = np.random.default_rng(0).integers(0, 3, (8, 12)).astype("int32")

    out = fit_model(x)
    np.testing.assert_array_equal(out.numpy(), model(x).numpy())
    _, acts = R.record_activity(model, x)
    expected = sum(_np_rate_penalty(a.spikes.numpy(), a.dt, 0.01, 0.5) for a in acts)
    expected += _np_voltage_penalty(acts[1].voltage.numpy(), acts[1].threshold.numpy(), 0.01,
                                    -1.0, 1.0)
    assert len(fit_model.losses) == 1
    np.testing.assert_allclose(float(fit_model.losses[0]), expected, rtol=1e-5)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fit_model.compile(keras.optimizers.Adam(0.05), loss)
    evaluated = fit_model.evaluate(x, y, verbose=0, batch_size=8)
    np.testing.assert_allclose(evaluated, float(loss(y, model(x))) + expected, rtol=1e-4)

    before = [w.numpy().copy() for w in model.trainable_variables]
    rate_before = float(tf.reduce_mean(acts[0].spikes))
    fit_model.fit(x, y, epochs=15, batch_size=8, verbose=0)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_variables)]
    assert all(changed)  # the shared weights of `model` were trained
    _, acts_after = R.record_activity(model, x)
    # The rate penalty dominates at this strength: the busy first layer slows down.
    assert float(tf.reduce_mean(acts_after[0].spikes)) < 0.8 * rate_before


def test_config_round_trips():
    reg = kspike.FiringRateRegularizer(target=30.0, strength=0.2, layers=["a"])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(reg))
    assert isinstance(again, kspike.FiringRateRegularizer)
    assert again.get_config() == reg.get_config()
    vreg = kspike.VoltageRegularizer(strength=0.1, lower=-2.0, upper=0.5)
    again = kspike.VoltageRegularizer.from_config(vreg.get_config())
    assert again.get_config() == vreg.get_config()
    layer = R.ActivityPenalty([reg, vreg], [("a", 1.0, "spikes", 4, True)])
    rebuilt = R.ActivityPenalty.from_config(layer.get_config())
    assert [r.get_config() for r in rebuilt.regularizers] == [reg.get_config(),
                                                              vreg.get_config()]
    assert rebuilt.layer_specs == layer.layer_specs


def test_bptt_gradients_include_the_regulariser():
    model = _two_layer_model(output_all=False)
    x = _inputs()
    y = np.random.default_rng(4).integers(0, 3, (4, 12)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    reg = kspike.FiringRateRegularizer(target=10.0, strength=2.0)
    result = kspike.learning.BPTT().compute(model, x, y, loss, regularizers=[reg])
    inner = keras.Model(model.inputs, [model.output, model.get_layer("alif").output,
                                       model.get_layer("lif").output])
    with tf.GradientTape() as tape:
        out, z1, z2 = inner(x)
        # The LSNN penalty written out independently of kspike's regulariser code.
        rates = [tf.reduce_mean(z, axis=(0, 1)) for z in (z1, z2)]
        penalty = 2.0 * tf.add_n([tf.reduce_sum(tf.square(r - 0.01)) for r in rates])
        total = loss(y, out) + penalty
    expected = tape.gradient(total, model.trainable_variables)
    np.testing.assert_allclose(float(result.loss), float(total), rtol=1e-6)
    for got, want in zip(result.gradients, expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(result.logs["regularization"]), float(penalty), rtol=1e-6)
    n1, n2 = 8, 6
    rate_hz = 1000 * (float(tf.reduce_sum(z1)) + float(tf.reduce_sum(z2))) / (4 * 12 * (n1 + n2))
    np.testing.assert_allclose(float(result.logs["firing_rate"]), rate_hz, rtol=1e-5)
    # With the regulariser the gradient differs from the task-only gradient.
    plain = kspike.learning.BPTT().gradients(model, x, y, loss)
    assert not np.allclose(plain[0].numpy(), result.gradients[0].numpy())


def test_regularized_model_saves_and_reloads(tmp_path):
    inp = keras.Input((12, 5))
    z = keras.layers.RNN(kspike.ALIF(8, thr=0.05, seed=1), return_sequences=True)(inp)
    model = keras.Model(inp, kspike.LeakyReadout(3, seed=2)(z))
    fit_model = R.with_regularization(model, [kspike.FiringRateRegularizer(10.0, 0.2)])
    x = _inputs()
    out = fit_model(x)
    penalty = float(fit_model.losses[0])
    path = tmp_path / "regularized.keras"
    fit_model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(again(x).numpy(), out.numpy())
    np.testing.assert_allclose(float(again.losses[0]), penalty, rtol=1e-6)


def test_firing_rate_logs_are_hz_with_each_layers_dt():
    """One helper for every rule: per-layer keys ``firing_rate/<layer>`` and an overall mean
    weighted by neuron counts, 1000 * mean(z) / dt in Hz."""
    rng = np.random.default_rng(3)
    z1 = (rng.random((3, 10, 4)) < 0.3).astype("float32")
    z2 = (rng.random((3, 10, 6)) < 0.1).astype("float32")
    activities = [R.LayerActivity("a", tf.constant(z1), None, None, 2.0, None),
                  R.LayerActivity("none", None, None, None, 1.0, None),
                  R.SpikeRate("b", tf.constant(z2.mean()), 0.5, 6)]
    logs = R.firing_rate_logs(activities)
    assert set(logs) == {"firing_rate", "firing_rate/a", "firing_rate/b"}
    rate_a, rate_b = 1000.0 * z1.mean() / 2.0, 1000.0 * z2.mean() / 0.5
    np.testing.assert_allclose(float(logs["firing_rate/a"]), rate_a, rtol=1e-6)
    np.testing.assert_allclose(float(logs["firing_rate/b"]), rate_b, rtol=1e-6)
    np.testing.assert_allclose(float(logs["firing_rate"]), (4 * rate_a + 6 * rate_b) / 10,
                               rtol=1e-6)
    assert R.firing_rate_logs([]) == {}
    with pytest.raises(TypeError, match="activities"):
        R.firing_rate_logs([0.5])


def _rule_model(T):
    inp = keras.Input((T, 5))
    h = keras.layers.RNN(kspike.LIF(7, thr=0.03, dt=2.0, seed=1), return_sequences=True,
                         name="lif")(inp)
    h = keras.layers.RNN(kspike.ALIF(5, thr=0.03, dt=2.0, seed=2), return_sequences=True,
                         name="alif")(h)
    return keras.Model(inp, kspike.LeakyReadout(2, dt=2.0, seed=3)(h))


@pytest.mark.parametrize("rule", ["EProp", "STLLR", "RateBP"])
def test_every_rule_logs_firing_rates_in_hz(rule):
    T = 15
    model = _rule_model(T)
    x = _inputs(B=3, T=T, n=5, seed=4)
    _, activity = R.record_activity(model, x)
    expected = R.firing_rate_logs(activity)
    assert float(expected["firing_rate/lif"]) > 0 and float(expected["firing_rate/alif"]) > 0
    y = tf.zeros((3, 2)) if rule == "RateBP" else tf.zeros((3, T, 2))
    result = getattr(kspike.learning, rule)().compute(model, x, y,
                                                      keras.losses.MeanSquaredError())
    assert set(result.logs) >= set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(result.logs[key]), float(value), rtol=1e-5,
                                   err_msg=key)


def test_firing_rate_target_is_in_hz_like_the_logs():
    """target=10.0 is 10 Hz (it was 10 kHz in spikes per ms, accepted silently): the penalty
    is zero when every neuron fires at the target rate as logged by firing_rate_logs."""
    z = np.zeros((2, 100, 3), "float32")
    z[:, ::10] = 1.0                      # one spike every 10 steps of 2 ms: 50 Hz
    acts = [R.LayerActivity("a", tf.constant(z), None, None, 2.0, None)]
    np.testing.assert_allclose(float(R.firing_rate_logs(acts)["firing_rate"]), 50.0)
    assert float(kspike.FiringRateRegularizer(target=50.0, strength=1.0)(acts)) == 0.0
    # The difference is taken in spikes per ms (LSNN's form): 0.7 * 3 * ((50 - 20) / 1000)^2.
    np.testing.assert_allclose(
        float(kspike.FiringRateRegularizer(target=20.0, strength=0.7)(acts)),
        0.7 * 3 * 0.03 ** 2, rtol=1e-5)
    assert kspike.FiringRateRegularizer().target == 10.0


def test_firing_rate_target_validation():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`target` must be a finite number >= 0"):
            kspike.FiringRateRegularizer(target=bad)
    with pytest.raises(ValueError, match="`target` is a firing rate in Hz.*1000.*5000"):
        kspike.FiringRateRegularizer(target=5000.0)
    with pytest.warns(UserWarning, match=r"asks for 0.01 Hz.*pass target=10"):
        kspike.FiringRateRegularizer(target=0.01)
    kspike.FiringRateRegularizer(target=0.0)   # a silent target is fine


def test_firing_rate_configs_saved_in_spikes_per_ms_load_in_hz():
    old = {"target": 0.02, "strength": 0.5, "layers": None}   # written before targets in Hz
    assert kspike.FiringRateRegularizer.from_config(old).target == pytest.approx(20.0)
    reg = kspike.FiringRateRegularizer(target=20.0, strength=0.5)
    assert kspike.FiringRateRegularizer.from_config(reg.get_config()).target == 20.0
