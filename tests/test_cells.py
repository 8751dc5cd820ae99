"""LIF/ALIF cells: exact dynamics against an independent NumPy implementation of docs/neurons.md,
gradients proven by finite differences, Keras integration and argument checks."""
import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import surrogates

T_LONG = 600


# ----------------------------------------------------------------------------- reference
def numpy_reference(x, w_in, w_rec, bias, tau, dt, thr, beta, tau_adaptation, n_refractory):
    """docs/neurons.md in float64 NumPy, written from the text only.

    x (B, T, n_in); beta a (n,) vector (0 = LIF neuron). Returns z, v, A, each (B, T, n).
    The refractory rule is tracked with the time of the last spike: a neuron that spiked at t'
    may spike again from t' + n_refractory + 1 on.
    """
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    n = w_in.shape[1]
    alpha = np.exp(-dt / tau)
    rho = np.exp(-dt / tau_adaptation)
    w_rec = None if w_rec is None else np.asarray(w_rec, np.float64) * (1.0 - np.eye(n))
    v = np.zeros((batch, n))
    b = np.zeros((batch, n))
    z = np.zeros((batch, n))
    last_spike = np.full((batch, n), -10 ** 9)
    zs, vs, As = [], [], []
    for t in range(steps):
        current = x[:, t] @ w_in
        if w_rec is not None:
            current = current + z @ w_rec
        if bias is not None:
            current = current + bias
        b = rho * b + (1.0 - rho) * z
        A = thr + beta * b
        v = alpha * v + (1.0 - alpha) * current - A * z
        may_spike = (t - last_spike) > n_refractory
        z = (((v - A) / A > 0) & may_spike).astype(np.float64)
        last_spike = np.where(z > 0, t, last_spike)
        zs.append(z)
        vs.append(v)
        As.append(A)
    return np.stack(zs, 1), np.stack(vs, 1), np.stack(As, 1)


def _input(rng, batch, steps, n_in, rate=0.1):
    spikes = rng.uniform(size=(batch, steps, n_in)) < rate
    return (spikes * rng.uniform(0.5, 1.5, size=spikes.shape)).astype("float32")


def _weights(cell):
    w_in, w_rec, bias = cell.effective_kernels("float64")
    return (w_in.numpy(), None if w_rec is None else w_rec.numpy(),
            None if bias is None else bias.numpy())


CASES = {
    "lif": dict(cls="LIF", thr=0.03),
    "alif": dict(cls="ALIF", thr=0.02, beta=1.0, tau_adaptation=100.0),
    "mixed_refractory": dict(cls="ALIF", thr=0.02, n_adaptive=5, n_refractory=3, beta=1.8,
                             tau_adaptation=200.0),
    "lif_refractory": dict(cls="LIF", thr=0.03, n_refractory=2, tau=10.0, dt=0.5),
    "feedforward_bias": dict(cls="ALIF", thr=0.02, recurrent=False, use_bias=True,
                             n_refractory=1, bias_initializer=keras.initializers.RandomUniform(
                                 -0.01, 0.03, seed=5)),
    "recurrent_bias": dict(cls="LIF", thr=0.03, use_bias=True,
                           bias_initializer=keras.initializers.RandomUniform(-0.01, 0.02, seed=6)),
}


def _make_cell(case, **extra):
    kwargs = dict(CASES[case])
    cls = getattr(kspike, kwargs.pop("cls"))
    return cls(12, output="all", seed=3, **kwargs, **extra)


def _reference_for(cell, x):
    w_in, w_rec, bias = _weights(cell)
    adaptive = isinstance(cell, kspike.ALIF)
    return numpy_reference(
        x, w_in, w_rec, bias, cell.tau, cell.dt, cell.thr, cell.beta_vector,
        cell.tau_adaptation if adaptive else 1.0, cell.n_refractory)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference_float32(case):
    x = _input(np.random.default_rng(11), 2, T_LONG, 10)
    cell = _make_cell(case)
    layer = keras.layers.RNN(cell, return_sequences=True)
    y = tf.function(layer)(tf.constant(x)).numpy()
    z, v, A = kspike.split_outputs(y)
    z_ref, v_ref, A_ref = _reference_for(cell, x)
    assert 0.005 < z_ref.mean() < 0.5, "the input must make the neurons spike"
    if cell.n_refractory:
        assert _refractory_was_active(z_ref, cell.n_refractory)
    np.testing.assert_array_equal(z, z_ref)
    # float32 state arithmetic over 600 steps: the max abs error reached here is 1.3e-6 on v
    # (|v| up to 0.8) and 5e-7 on A.
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=5e-6)
    np.testing.assert_allclose(A, A_ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("case", ["mixed_refractory", "lif_refractory", "feedforward_bias"])
def test_matches_numpy_reference_float64(case):
    keras.config.set_dtype_policy("float64")
    x = _input(np.random.default_rng(12), 2, T_LONG, 10)
    cell = _make_cell(case)
    y = tf.function(keras.layers.RNN(cell, return_sequences=True))(tf.constant(x, "float64"))
    assert y.dtype == tf.float64
    z, v, A = kspike.split_outputs(y.numpy())
    z_ref, v_ref, A_ref = _reference_for(cell, x)
    np.testing.assert_array_equal(z, z_ref)
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(A, A_ref, rtol=0, atol=1e-13)


def _refractory_was_active(z, n_refractory):
    """True if some neuron crossed threshold again inside its refractory window in the
    reference (so the refractory rule actually changed the spike train)."""
    spike_steps = [np.flatnonzero(z[b, :, j]) for b in range(z.shape[0]) for j in range(z.shape[2])]
    gaps = np.concatenate([np.diff(s) for s in spike_steps if len(s) > 1])
    return gaps.min() == n_refractory + 1


def test_refractory_changes_spikes():
    # The same weights and input without refractoriness give more spikes: the rule matters.
    x = _input(np.random.default_rng(11), 2, T_LONG, 10)
    cell = _make_cell("mixed_refractory")
    keras.layers.RNN(cell)(x[:, :2])
    w_in, w_rec, bias = _weights(cell)
    args = (x, w_in, w_rec, bias, cell.tau, cell.dt, cell.thr, cell.beta_vector, 200.0)
    z3 = numpy_reference(*args, 3)[0]
    z0 = numpy_reference(*args, 0)[0]
    assert z0.sum() > z3.sum()


def test_mixed_layer_beta_layout():
    cell = kspike.ALIF(6, n_adaptive=2, beta=1.5)
    np.testing.assert_array_equal(cell.beta_vector, [0, 0, 0, 0, 1.5, 1.5])
    np.testing.assert_array_equal(kspike.ALIF(3, beta=0.7).beta_vector, [0.7] * 3)
    np.testing.assert_array_equal(kspike.ALIF(3, n_adaptive=0).beta_vector, [0.0] * 3)
    np.testing.assert_array_equal(kspike.LIF(3).beta_vector, [0.0] * 3)


# ----------------------------------------------------------------------------- gradients
class SmoothSpike(surrogates.SpikeFunction):
    """Test-only stand-in: a smooth sigmoid in the forward pass, with its true derivative."""
    name = "smooth_test_only"

    def pseudo_derivative(self, x):
        s = tf.sigmoid(4.0 * x)
        return 4.0 * s * (1.0 - s)

    def __call__(self, x):
        return tf.sigmoid(4.0 * tf.convert_to_tensor(x))


class CustomGradientSpike(surrogates.SpikeFunction):
    """Test-only: forward H(x), backward psi of the triangular surrogate, through
    tf.custom_gradient (the textbook formulation, independent of kspike's stop-gradient form)."""
    name = "custom_gradient_test_only"

    def pseudo_derivative(self, x):
        return self.dampening * tf.nn.relu(1.0 - tf.abs(self.sharpness * x))

    def __call__(self, x):
        @tf.custom_gradient
        def spike(x):
            def grad(dy):
                return dy * self.pseudo_derivative(x)
            return tf.cast(x > 0, x.dtype), grad
        return spike(tf.convert_to_tensor(x))


def _tiny_network(surrogate, n_adaptive=2, recurrent=True, n_refractory=0):
    cell = kspike.ALIF(4, n_adaptive=n_adaptive, thr=0.05, beta=1.5, tau_adaptation=30.0,
                       tau=10.0, surrogate=surrogate, recurrent=recurrent, use_bias=True,
                       n_refractory=n_refractory, output="all", seed=7,
                       bias_initializer=keras.initializers.RandomUniform(0.0, 0.05, seed=8))
    layer = keras.layers.RNN(cell, return_sequences=True)
    return cell, layer


def test_bptt_matches_finite_differences_of_smooth_network():
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(3)
    x = tf.constant(rng.uniform(0, 1, size=(2, 25, 3)), "float64")
    cell, layer = _tiny_network(SmoothSpike())
    layer(x[:, :1])
    readout = tf.constant(rng.normal(size=(25, 12)), "float64")

    @tf.function
    def loss_fn():
        # Loss on z, v and A at every step: gradients pass through the reset, the adaptation
        # and the recurrence.
        return tf.reduce_sum(layer(x) * readout)

    variables = cell.trainable_variables
    assert len(variables) == 3  # input kernel, recurrent kernel, bias
    with tf.GradientTape() as tape:
        loss = loss_fn()
    grads = tape.gradient(loss, variables)
    eps = 1e-6
    for var, grad in zip(variables, grads):
        base = var.numpy()
        numeric = np.zeros_like(base)
        for index in np.ndindex(base.shape):
            if var.name == "recurrent_kernel" and index[0] == index[1]:
                continue  # the diagonal is not a parameter (always 0)
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


@pytest.mark.parametrize("n_refractory", [0, 2])
def test_spike_gradient_equals_custom_gradient_formulation(n_refractory):
    """kspike's stop-gradient spike gives the same BPTT gradients as forward H, backward psi
    written with tf.custom_gradient, through a whole recurrent ALIF network."""
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(4)
    x = tf.constant((rng.uniform(size=(3, 40, 3)) < 0.3) * 1.0, "float64")
    readout = tf.constant(rng.normal(size=(40, 12)), "float64")
    results = []
    for surrogate in (surrogates.get("triangular", dampening=0.3, sharpness=0.5),
                      CustomGradientSpike(dampening=0.3, sharpness=0.5)):
        keras.utils.set_random_seed(0)
        cell, layer = _tiny_network(surrogate, n_refractory=n_refractory)
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(y * readout)
        grads = tape.gradient(loss, cell.trainable_variables)
        results.append((y.numpy(), [g.numpy() for g in grads]))
    (y1, g1), (y2, g2) = results
    z = kspike.split_outputs(y1)[0]
    assert 0.02 < z.mean() < 0.6
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip(g1, g2):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- Keras
def _seq(batch=3, steps=20, n_in=5, seed=0):
    return _input(np.random.default_rng(seed), batch, steps, n_in, rate=0.3)


def test_return_sequences_and_state():
    x = _seq()
    cell = kspike.ALIF(6, n_adaptive=3, thr=0.02, n_refractory=1)
    layer = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    seq, *states = layer(x)
    assert seq.shape == (3, 20, 6) and len(states) == 4
    assert all(s.shape == (3, 6) for s in states)
    np.testing.assert_array_equal(states[2].numpy(), seq[:, -1].numpy())  # z state = last spikes
    last = keras.layers.RNN(cell)(x)
    np.testing.assert_array_equal(last.numpy(), seq[:, -1].numpy())
    # Stepping the cell by hand from get_initial_state gives the same states.
    manual = cell.get_initial_state(batch_size=3)
    for t in range(20):
        out, manual = cell(x[:, t], manual)
    for a, b in zip(manual, states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-7)
    # Continuing from returned states equals one run over the whole sequence.
    first = layer(x[:, :8])
    second = layer(x[:, 8:], initial_state=list(first[1:]))
    np.testing.assert_allclose(second[0].numpy(), seq[:, 8:].numpy(), atol=0)


def test_get_initial_state():
    for cell, n_states in [(kspike.ALIF(5), 4), (kspike.LIF(5), 3)]:
        states = cell.get_initial_state(batch_size=7)
        assert len(states) == n_states == len(cell.state_size)
        for s in states:
            assert s.shape == (7, 5) and s.dtype == tf.float32
            assert not np.any(s.numpy())


def test_stateful_equals_one_run():
    x = _seq(batch=2, steps=30)
    cell = kspike.LIF(6, n_refractory=2, seed=1)
    full = keras.layers.RNN(cell, return_sequences=True)(x).numpy()
    stateful = keras.layers.RNN(cell, return_sequences=True, stateful=True)
    parts = [stateful(x[:, i:i + 10]).numpy() for i in range(0, 30, 10)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    stateful.reset_state()
    np.testing.assert_array_equal(stateful(x[:, :10]).numpy(), full[:, :10])


def test_go_backwards():
    x = _seq()
    cell = kspike.ALIF(6, thr=0.02, seed=2)
    backwards = keras.layers.RNN(cell, return_sequences=True, go_backwards=True)(x)
    forwards = keras.layers.RNN(cell, return_sequences=True)(x[:, ::-1])
    np.testing.assert_array_equal(backwards.numpy(), forwards.numpy())


def test_masking_holds_state():
    x = _seq(steps=20)
    x_padded = np.concatenate([x[:, :12], np.zeros_like(x[:, 12:])], axis=1)
    x_padded[:, 12:] = -1.0  # mask value
    cell = kspike.ALIF(6, thr=0.02, seed=3, n_refractory=1)
    masked = keras.Sequential([keras.Input((20, 5)), keras.layers.Masking(-1.0),
                               keras.layers.RNN(cell, return_state=True)])
    out, *states = masked(x_padded)
    ref, *ref_states = keras.layers.RNN(cell, return_state=True)(x[:, :12])
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    for a, b in zip(states, ref_states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    compute = policy.split("_")[1]
    x = _seq(steps=60)
    cell = kspike.ALIF(8, n_adaptive=4, thr=0.02, n_refractory=1, output="all", seed=4)
    layer = keras.layers.RNN(cell, return_sequences=True)
    # States stay float32 (the cell's own arithmetic) while outputs use the compute dtype.
    out, states = cell(tf.constant(x[:, 0]), cell.get_initial_state(3))
    assert out.dtype == compute and all(s.dtype == tf.float32 for s in states)
    assert cell.input_kernel.dtype == tf.float32

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
        return y, tape.gradient(loss, cell.trainable_variables)

    y, grads = run(tf.constant(x))
    assert y.dtype == compute
    y = tf.cast(y, "float32").numpy()
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g.numpy())) for g in grads)
    z = kspike.split_outputs(y)[0]
    assert set(np.unique(z)) <= {0.0, 1.0} and z.mean() > 0.01
    # Against the float64 reference with the same weights: 16-bit input matmuls may flip a
    # rare near-threshold spike; demand agreement on nearly all of them.
    z_ref = numpy_reference(x.astype(compute).astype("float64"), *_weights(cell), cell.tau,
                            cell.dt, cell.thr, cell.beta_vector, cell.tau_adaptation,
                            cell.n_refractory)[0]
    assert np.mean(z == z_ref) > 0.97


def test_fit_and_zero_diagonal_kept():
    x = _seq(batch=8, steps=15, n_in=4)
    y = np.random.default_rng(0).integers(0, 2, size=(8, 15))
    cell = kspike.ALIF(6, n_adaptive=3, thr=0.02, dampening_factor=1.0, seed=5)
    model = keras.Sequential([keras.Input((15, 4)),
                              keras.layers.RNN(cell, return_sequences=True),
                              kspike.LeakyReadout(2, tau=5.0)])
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=5, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    w_rec = cell.recurrent_kernel.numpy()
    assert np.all(np.diag(w_rec) == 0.0)
    assert np.abs(w_rec - before[1]).max() > 1e-3  # it did train


def test_keras_file_round_trip(tmp_path):
    x = _seq(steps=25)
    inputs = keras.Input((25, 5))
    h = keras.layers.RNN(kspike.ALIF(7, n_adaptive=3, thr=0.02, n_refractory=2, use_bias=True,
                                     surrogate=surrogates.get("ntail", tail=2.0, sharpness=2.0),
                                     seed=6), return_sequences=True)(inputs)
    h = keras.layers.RNN(kspike.LIF(5, output="all", surrogate="gaussian", dampening_factor=0.5,
                                    seed=7), return_sequences=True)(h)
    outputs = kspike.LeakyReadout(3, tau=7.0)(h)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: `import kspike` is enough
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    cell = loaded.layers[1].cell
    assert isinstance(cell, kspike.ALIF) and cell.n_adaptive == 3 and cell.n_refractory == 2
    assert cell.spike_function == surrogates.get("ntail", tail=2.0, sharpness=2.0)
    lif = loaded.layers[2].cell
    assert lif.spike_function == surrogates.get("gaussian", dampening=0.5)
    for cls, cell in [(kspike.ALIF, model.layers[1].cell), (kspike.LIF, model.layers[2].cell)]:
        rebuilt = cls.from_config(cell.get_config())
        assert rebuilt.get_config() == cell.get_config()


def test_output_all_and_split_outputs():
    x = _seq(steps=30)
    for cell in (kspike.LIF(4, thr=0.05, output="all"), kspike.ALIF(4, thr=0.02, output="all")):
        y = keras.layers.RNN(cell, return_sequences=True)(x)
        assert y.shape == (3, 30, 12) and cell.output_size == 12
        z, v, A = kspike.split_outputs(y)
        assert z.shape == v.shape == A.shape == (3, 30, 4)
        assert set(np.unique(z.numpy())) <= {0.0, 1.0}
        spikes = keras.layers.RNN(type(cell).from_config({**cell.get_config(),
                                                          "output": "spikes"}),
                                  return_sequences=True)
        spikes(x[:, :1])
        spikes.set_weights([w.numpy() for w in cell.weights])
        np.testing.assert_array_equal(spikes(x).numpy(), z.numpy())
        if isinstance(cell, kspike.LIF):
            np.testing.assert_array_equal(A.numpy(), np.full((3, 30, 4), cell.thr, "float32"))
        else:
            assert np.all(A.numpy() >= np.float32(cell.thr)) and np.any(A.numpy() > cell.thr)
    z, v, A = kspike.split_outputs(np.arange(6.0).reshape(1, 6))
    np.testing.assert_array_equal(v, [[2.0, 3.0]])
    with pytest.raises(ValueError, match="3 \\* units"):
        kspike.split_outputs(np.zeros((2, 7)))


def test_weights_and_zero_diagonal_at_init():
    cell = kspike.ALIF(50, seed=0)
    cell.build((None, 20))
    assert cell.input_kernel.shape == (20, 50) and cell.recurrent_kernel.shape == (50, 50)
    assert cell.bias is None
    w = cell.recurrent_kernel.numpy()
    assert np.all(np.diag(w) == 0)
    # N(0, 1) / sqrt(fan_in) as in LSNN.
    assert np.std(cell.input_kernel.numpy()) == pytest.approx(1 / np.sqrt(20), rel=0.1)
    assert np.std(w[~np.eye(50, dtype=bool)]) == pytest.approx(1 / np.sqrt(50), rel=0.1)
    ff = kspike.LIF(3, recurrent=False, use_bias=True)
    ff.build((None, 2))
    assert ff.recurrent_kernel is None and ff.bias.shape == (3,)
    assert len(ff.trainable_variables) == 2
    # The same seed gives the same weights.
    again = kspike.ALIF(50, seed=0)
    again.build((None, 20))
    np.testing.assert_array_equal(again.input_kernel.numpy(), cell.input_kernel.numpy())


# ----------------------------------------------------------------------------- bad input
BAD_ARGUMENTS = [
    (dict(units=0), ValueError, "units"),
    (dict(units=-3), ValueError, "units"),
    (dict(units=2.5), ValueError, "units"),
    (dict(units="8"), TypeError, "units"),
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=-5.0), ValueError, "tau"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(tau=float("inf")), ValueError, "tau"),
    (dict(thr=0.0), ValueError, "thr"),
    (dict(thr=-0.1), ValueError, "thr"),
    (dict(thr=float("nan")), ValueError, "thr"),
    (dict(dt=0.0), ValueError, "dt"),
    (dict(dt=float("inf")), ValueError, "dt"),
    (dict(n_refractory=-1), ValueError, "n_refractory"),
    (dict(n_refractory=1.5), ValueError, "n_refractory"),
    (dict(n_refractory=True), TypeError, "n_refractory"),
    (dict(dampening_factor=0.0), ValueError, "dampening_factor"),
    (dict(dampening_factor=float("nan")), ValueError, "dampening_factor"),
    (dict(surrogate="boxcar"), ValueError, "triangular"),
    (dict(surrogate=3), TypeError, "surrogate"),
    (dict(output="voltage"), ValueError, "output"),
    (dict(dale=1.0), ValueError, "dale"),
    (dict(dale=0.0), ValueError, "dale"),
    (dict(dale=float("nan")), ValueError, "dale"),
    (dict(connectivity=0.0), ValueError, "connectivity"),
    (dict(connectivity=1.5), ValueError, "connectivity"),
    (dict(connectivity=float("inf")), ValueError, "connectivity"),
    (dict(recurrent="yes"), TypeError, "recurrent"),
    (dict(seed="abc"), TypeError, "seed"),
]
BAD_ALIF_ARGUMENTS = [
    (dict(n_adaptive=-1), ValueError, "n_adaptive"),
    (dict(n_adaptive=9), ValueError, "n_adaptive"),
    (dict(n_adaptive=2.5), ValueError, "n_adaptive"),
    (dict(tau_adaptation=0.0), ValueError, "tau_adaptation"),
    (dict(tau_adaptation=float("nan")), ValueError, "tau_adaptation"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
]


def test_bad_arguments():
    for cls, cases in [(kspike.LIF, BAD_ARGUMENTS), (kspike.ALIF, BAD_ARGUMENTS +
                                                     BAD_ALIF_ARGUMENTS)]:
        for kwargs, error, name in cases:
            kwargs = {"units": 8, **kwargs}
            with pytest.raises(error) as info:
                cls(**kwargs)
            message = str(info.value)
            assert name in message, (cls.__name__, kwargs, message)
            value = [v for k, v in kwargs.items() if k != "units"] or [kwargs["units"]]
            assert repr(value[0]) in message or name == "triangular", message


def test_bad_inputs():
    cell = kspike.ALIF(4)
    with pytest.raises(ValueError, match=r"\(batch, time, features\)"):
        keras.layers.RNN(cell)(np.zeros((2, 5), "float32"))  # missing time axis
    layer = keras.layers.RNN(kspike.LIF(4), return_sequences=True)
    layer(np.zeros((2, 3, 5), "float32"))
    with pytest.raises(ValueError, match="5 input features.*6"):
        layer(np.zeros((2, 3, 6), "float32"))
    with pytest.raises(ValueError, match=r"\(batch, 5\)"):
        layer.cell(np.zeros((2, 3, 5), "float32"), layer.cell.get_initial_state(2))
    with pytest.raises(ValueError, match="expects 3 states"):
        layer.cell(np.zeros((2, 5), "float32"), layer.cell.get_initial_state(2)[:2])
    with pytest.raises(ValueError, match="State `v`.*\\(batch, 4\\)"):
        layer.cell(np.zeros((2, 5), "float32"), [np.zeros((2, 3), "float32")] * 3)
    model = keras.Sequential([keras.Input((None, 5)), keras.layers.RNN(kspike.LIF(4))])
    with pytest.raises(ValueError):
        model(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="5 input features"):
        model.predict(np.zeros((2, 3, 7), "float32"), verbose=0)
    with pytest.raises(ValueError, match="known input feature size"):
        kspike.LIF(3).build((None, None))


def test_rewired_cells_refuse_kernel_initializers_and_keep_their_config():
    """Initialisers/constraints of kernels that DEEP R owns would be ignored: say so."""
    for name in ("input_initializer", "recurrent_initializer", "input_constraint",
                 "recurrent_constraint"):
        with pytest.raises(ValueError, match=name):
            kspike.ALIF(8, connectivity=0.5, **{name: "zeros" if "init" in name else "non_neg"})
        with pytest.raises(ValueError, match=name):
            kspike.LIF(8, dale=0.8, **{name: "zeros" if "init" in name else "non_neg"})
    cell = kspike.ALIF(8, connectivity=0.5, dale=0.8, seed=3)
    clone = kspike.ALIF.from_config(cell.get_config())
    assert clone.get_config() == cell.get_config()


def test_sequence_without_time_or_feature_axis_names_the_fix():
    # A (batch, time) spike train or a (batch, features) vector given to keras.layers.RNN.
    for build in (lambda: keras.layers.RNN(kspike.ALIF(5))(np.zeros((2, 4), "float32")),
                  lambda: keras.Sequential([keras.Input((4,)),
                                            keras.layers.RNN(kspike.LIF(5))])):
        with pytest.raises(ValueError, match=r"rank 2.*\(batch, time, features\).*"
                                             r"x\[\.\.\., None\].*x\[:, None, :\]"):
            build()
