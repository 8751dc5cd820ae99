"""e-prop (kspike.learning.EProp) against autodiff of an independently written network.

The reference network below re-implements docs/neurons.md step by step (it does not call
kspike's maths) with ``tf.stop_gradient`` on z_{t-1} where it enters the recurrent input and the
reset term (not where it enters b_t), as docs/eprop.md prescribes. Symmetric e-prop must
equal the autodiff gradient of that network.
"""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
import kspike.learning
import kspike.regularizers
from kspike.learning import EProp

sg = tf.stop_gradient
RTOL64 = 1e-10   # float64: e-prop and autodiff agree to round-off
RTOL32 = 1e-5    # float32


def _layer_constants(cell):
    return dict(alpha=np.exp(-cell.dt / cell.tau),
                rho=np.exp(-cell.dt / getattr(cell, "tau_adaptation", 1.0)),
                thr=cell.thr, beta=np.asarray(cell.beta_vector),
                n_ref=cell.n_refractory, gamma=cell.dampening_factor,
                adaptive=hasattr(cell, "tau_adaptation"))


def reference_forward(x, layers, readout, stop_between_layers=True):
    """Independent unrolled network. ``layers``: list of (constants, w_in, w_rec, bias) with
    tf.Variables; ``readout``: (kappa, w_out, b_out). Returns (Y (B,T,n_out), [Z per layer])."""
    dtype = x.dtype
    batch, steps = x.shape[0], x.shape[1]
    inputs = [x[:, t] for t in range(steps)]
    all_spikes = []
    for i, (c, w_in, w_rec, bias) in enumerate(layers):
        if i > 0 and stop_between_layers:
            inputs = [sg(s) for s in inputs]
        n = w_in.shape[1]
        v = b = z = r = tf.zeros((batch, n), dtype)
        beta = tf.constant(c["beta"], dtype)
        outs = []
        for t in range(steps):
            z_prev = z
            z_stop = sg(z_prev)
            current = inputs[t] @ w_in
            if w_rec is not None:
                current = current + z_stop @ w_rec
            if bias is not None:
                current = current + bias
            if c["adaptive"]:
                b = c["rho"] * b + (1 - c["rho"]) * z_prev
                A = c["thr"] + beta * b
            else:
                A = tf.constant(c["thr"], dtype)
            v = c["alpha"] * v + (1 - c["alpha"]) * current - A * z_stop
            u = (v - A) / A
            psi = c["gamma"] * tf.nn.relu(1.0 - tf.abs(u))
            allowed = tf.cast(tf.equal(r, 0.0), dtype) if c["n_ref"] else tf.ones_like(u)
            forward = tf.cast(u > 0, dtype) * allowed
            z = forward + (u * sg(psi) - sg(u * psi)) * allowed
            if c["n_ref"]:
                r = tf.where(forward > 0, tf.cast(c["n_ref"], dtype), tf.maximum(r - 1.0, 0.0))
            outs.append(z)
        inputs = outs
        all_spikes.append(tf.stack(outs, axis=1))
    kappa, w_out, b_out = readout
    acc = tf.zeros((batch, w_out.shape[1]), dtype)
    ys = []
    for t in range(steps):
        acc = kappa * acc + (1 - kappa) * (inputs[t] @ w_out)
        ys.append(acc + b_out)
    return tf.stack(ys, axis=1), all_spikes


def reference_variables(model):
    layers = []
    for layer in model.layers[:-1]:
        cell = layer.cell
        w_in, w_rec, bias = cell.effective_kernels(cell.state_dtype)
        layers.append((_layer_constants(cell), tf.Variable(w_in),
                       None if w_rec is None else tf.Variable(w_rec),
                       None if bias is None else tf.Variable(bias)))
    ro = model.layers[-1]
    readout = (ro.kappa, tf.Variable(ro.kernel.numpy()), tf.Variable(ro.bias.numpy()))
    return layers, readout


def flat_reference(layers, readout):
    out = []
    for _, w_in, w_rec, bias in layers:
        out.extend([w_in] + ([w_rec] if w_rec is not None else [])
                   + ([bias] if bias is not None else []))
    return out + [readout[1], readout[2]]


def build_model(cells, n_in, steps, n_out, tau_out=10.0):
    return keras.Sequential([keras.Input((steps, n_in))]
                            + [keras.layers.RNN(c, return_sequences=True) for c in cells]
                            + [kspike.LeakyReadout(n_out, tau=tau_out)])


def compare(got, want, rtol, mask_diagonal=None):
    got = np.asarray(got)
    want = np.asarray(want)
    if mask_diagonal is not None:
        want = want * (1.0 - np.eye(want.shape[0]))
    scale = max(np.abs(want).max(), 1e-12)
    error = np.abs(got - want).max() / scale
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"
    return error


def assert_gradients_match(model, got, want, rtol):
    """``got`` aligned with model.trainable_variables, ``want`` with flat_reference."""
    assert len(got) == len(want)
    errors = []
    for variable, g, w in zip(model.trainable_variables, got, want):
        assert g is not None, variable.path
        diag = 1 if "recurrent_kernel" in variable.path else None
        errors.append(compare(g, w, rtol, mask_diagonal=diag))
        assert np.abs(np.asarray(w)).max() > 0, f"{variable.path}: reference gradient is zero"
    return max(errors)


def inputs(batch, steps, n_in, rate, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant((rng.random((batch, steps, n_in)) < rate).astype(dtype))


def _cells(kind):
    init = dict(bias_initializer=keras.initializers.RandomNormal(0.0, 0.1, seed=5))
    if kind == "lif":
        return [kspike.LIF(7, thr=0.03, n_refractory=2, seed=1)]
    if kind == "alif":
        return [kspike.ALIF(6, thr=0.03, beta=1.0, tau_adaptation=30.0, seed=1, use_bias=True,
                            **init)]
    if kind == "mixed":
        return [kspike.ALIF(7, n_adaptive=4, thr=0.03, beta=0.8, tau_adaptation=40.0,
                            n_refractory=3, seed=1, use_bias=True, **init)]
    raise AssertionError(kind)


LOSSES = {
    "regression": lambda: (keras.losses.MeanSquaredError(), None),
    "classification": lambda: (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                               None),
}


@pytest.mark.parametrize("memory_flat", [False, True])
@pytest.mark.parametrize("kind,task,online", [("lif", "regression", False),
                                               ("alif", "classification", False),
                                               ("mixed", "regression", True),
                                               ("mixed", "classification", False)])
def test_symmetric_eprop_equals_autodiff_with_stop_gradient(kind, task, online, memory_flat):
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 40, 5, 3
    model = build_model(_cells(kind), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64")
    rng = np.random.default_rng(1)
    if task == "regression":
        loss = keras.losses.MeanSquaredError()
        y = tf.constant(rng.standard_normal((batch, steps, n_out)))
        weight = None
    else:
        # Per-step cross-entropy restricted to a final window by sample_weight (B, T).
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        y = tf.constant(np.repeat(rng.integers(0, n_out, (batch, 1)), steps, axis=1))
        weight = tf.constant(np.where(np.arange(steps) >= steps - 10, 1.0, 0.0)[None].repeat(
            batch, 0))
    result = EProp(feedback="symmetric", online=online, memory_flat=memory_flat).compute(
        model, x, y, loss, sample_weight=weight)
    layers, readout = reference_variables(model)
    with tf.GradientTape() as tape:
        prediction, spikes = reference_forward(x, layers, readout)
        value = loss(y, prediction) if weight is None else loss(y, prediction, sample_weight=weight)
    want = tape.gradient(value, flat_reference(layers, readout))
    assert float(tf.reduce_sum(spikes[0])) > 10, "the test network must spike"
    np.testing.assert_allclose(result.predictions.numpy(), prediction.numpy(), atol=1e-12)
    np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-12)
    error = assert_gradients_match(model, result.gradients, want, RTOL64)
    print(f"{kind}/{task}/online={online}/memory_flat={memory_flat}: float64 max relative error {error:.2e}")


def test_window_averaged_classification():
    """Cross-entropy of the readout averaged over a cue window (sMNIST style)."""
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out, window = 4, 35, 5, 3, 8
    model = build_model(_cells("mixed"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64", seed=2)
    labels = tf.constant([0, 2, 1, 2])
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, y_pred):
        return xent(y_true, tf.reduce_mean(y_pred[:, -window:], axis=1))

    result = EProp().compute(model, x, labels, loss)
    layers, readout = reference_variables(model)
    with tf.GradientTape() as tape:
        prediction, _ = reference_forward(x, layers, readout)
        value = loss(labels, prediction)
    want = tape.gradient(value, flat_reference(layers, readout))
    assert_gradients_match(model, result.gradients, want, RTOL64)


def test_float32_tolerance():
    batch, steps, n_in, n_out = 4, 60, 6, 2
    model = build_model(_cells("mixed"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float32", seed=3)
    y = tf.constant(np.random.default_rng(3).standard_normal((batch, steps, n_out)),
                    tf.float32)
    loss = keras.losses.MeanSquaredError()
    result = EProp().compute(model, x, y, loss)
    layers, readout = reference_variables(model)
    with tf.GradientTape() as tape:
        prediction, _ = reference_forward(x, layers, readout)
        value = loss(y, prediction)
    want = tape.gradient(value, flat_reference(layers, readout))
    error = assert_gradients_match(model, result.gradients, want, RTOL32)
    print(f"float32 max relative error {error:.2e}")


@pytest.mark.parametrize("memory_flat", [False, True])
def test_firing_rate_regularizer_local_gradient(memory_flat):
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 30, 5, 2
    model = build_model(_cells("mixed"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.3, "float64", seed=4)
    y = tf.constant(np.random.default_rng(4).standard_normal((batch, steps, n_out)))
    loss = keras.losses.MeanSquaredError()
    regularizer = kspike.regularizers.FiringRateRegularizer(target=20.0, strength=3.0)
    result = EProp(memory_flat=memory_flat).compute(model, x, y, loss,
                                                    regularizers=[regularizer])
    layers, readout = reference_variables(model)
    with tf.GradientTape() as tape:
        prediction, spikes = reference_forward(x, layers, readout)
        rate = tf.reduce_mean(spikes[0], axis=(0, 1)) / model.layers[0].cell.dt
        penalty = 3.0 * tf.reduce_sum(tf.square(rate - 0.02))
        value = tf.cast(loss(y, prediction), tf.float64) + penalty
    want = tape.gradient(value, flat_reference(layers, readout))
    # kspike's regulariser computes in float32.
    np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-6)
    assert_gradients_match(model, result.gradients, want, RTOL32)
    # Without the regulariser the spiking-layer gradient differs (the term is not empty).
    plain = EProp().compute(model, x, y, loss).gradients
    assert np.abs(plain[0].numpy() - result.gradients[0].numpy()).max() > 1e-6


def test_random_feedback_and_stacked_layers():
    """Two stacked layers: every layer's gradient equals autodiff of its own stop-gradient
    network driven by its learning signal L_l(t) = Etilde(t) B_l (readout filter moved onto the
    error), and the readout's gradient is exact."""
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 30, 5, 2
    cells = [kspike.LIF(6, thr=0.03, seed=1),
             kspike.ALIF(5, n_adaptive=2, thr=0.03, beta=1.0, tau_adaptation=30.0, seed=2)]
    model = build_model(cells, n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.4, "float64", seed=5)
    y = tf.constant(np.random.default_rng(5).standard_normal((batch, steps, n_out)))
    loss = keras.losses.MeanSquaredError()
    # Both memory forms against the reference; their equality for every feedback is
    # tests/test_eprop_forms.py's.
    for feedback, memory_flat in (("symmetric", False), ("random", True)):
        rule = EProp(feedback=feedback, seed=7, memory_flat=memory_flat)
        result = rule.compute(model, x, y, loss)
        layers, readout = reference_variables(model)
        with tf.GradientTape(persistent=True) as tape:
            prediction, spikes = reference_forward(x, layers, readout)
            value = loss(y, prediction)
        error = tape.gradient(value, prediction)
        kappa = readout[0]
        # Etilde_t = sum_{t' >= t} (1 - kappa) kappa^(t' - t) error_t'
        filt = np.zeros_like(error.numpy())
        acc = 0.0
        for t in reversed(range(steps)):
            acc = kappa * acc + (1 - kappa) * error.numpy()[:, t]
            filt[:, t] = acc
        matrices = [w.numpy() for w in rule.feedback_weights]
        if feedback == "symmetric":
            assert len(matrices) == 1
            matrices.append(readout[1].numpy().T)
        with tf.GradientTape() as tape2:
            _, spikes2 = reference_forward(x, layers, readout)
            objective = sum(tf.reduce_sum(tf.constant(np.einsum("bto,on->btn", filt, m)) * s)
                            for m, s in zip(matrices, spikes2))
        want = tape2.gradient(objective, flat_reference(layers, readout)[:-2])
        want += tape.gradient(value, [readout[1], readout[2]])
        assert_gradients_match(model, result.gradients, want, RTOL64)
    # The random matrices are reproducible from the seed and scaled like the readout init.
    again = EProp(feedback="random", seed=7)
    again.compute(model, x, y, loss)
    for a, b in zip(again.feedback_weights, rule.feedback_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert [tuple(w.shape) for w in rule.feedback_weights] == [(2, 6), (2, 5)]


def test_adaptive_feedback_is_trained_and_checkpointed(tmp_path):
    keras.config.set_dtype_policy("float64")
    batch, steps, n_in, n_out = 3, 25, 5, 2
    model = build_model(_cells("alif"), n_in, steps, n_out)
    x = inputs(batch, steps, n_in, 0.4, "float64", seed=6)
    y = tf.constant(np.random.default_rng(6).standard_normal((batch, steps, n_out)))
    loss = keras.losses.MeanSquaredError()
    rule = EProp(feedback="adaptive", seed=3, weight_decay=0.1,
                 feedback_optimizer=keras.optimizers.SGD(0.5))
    rule.compute(model, x, y, loss, training=False)
    before = rule.feedback_weights[0].numpy().copy()
    result = rule.compute(model, x, y, loss)
    after = rule.feedback_weights[0].numpy()
    readout_grad = result.gradients[-2].numpy()            # (n, n_out)
    # SGD step on B with the readout's own gradient (transposed) plus weight decay.
    np.testing.assert_allclose(after, before - 0.5 * (readout_grad.T + 0.1 * before),
                               rtol=1e-10, atol=1e-14)
    # Saved with tf.train.Checkpoint(rule=...), restored into a fresh rule.
    path = tf.train.Checkpoint(rule=rule).write(str(tmp_path / "ckpt"))
    fresh = EProp(feedback="adaptive", seed=99, feedback_optimizer=keras.optimizers.SGD(0.5))
    fresh.compute(model, x, y, loss, training=False)
    tf.train.Checkpoint(rule=fresh).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.feedback_weights[0].numpy(), after)


def test_learns_and_works_with_spiking_rnn():
    """A few Adam steps of e-prop reduce the loss of a small regression task, on a model built
    with kspike.SpikingRNN."""
    steps, n_in = 40, 4
    model = keras.Sequential([keras.Input((steps, n_in)),
                              kspike.SpikingRNN(kspike.ALIF(16, n_adaptive=8, thr=0.03, seed=0),
                                                return_sequences=True),
                              kspike.LeakyReadout(1, tau=10.0)])
    x = inputs(8, steps, n_in, 0.3, "float32", seed=8)
    target = tf.sin(tf.linspace(0.0, 6.0, steps))[None, :, None] * tf.ones((8, 1, 1))
    loss = keras.losses.MeanSquaredError()
    optimizer = keras.optimizers.Adam(0.02)
    rule = EProp()
    losses = []
    for _ in range(40):
        result = rule.compute(model, x, target, loss)
        optimizer.apply(result.gradients, model.trainable_variables)
        losses.append(float(result.loss))
    assert losses[-1] < 0.5 * losses[0], losses


def _bad_models():
    steps = 10
    rnn = lambda **kw: keras.layers.RNN(kspike.LIF(4, **kw.pop("cell", {})),  # noqa: E731
                                        return_sequences=kw.pop("seq", True), **kw)
    yield "Dense", keras.Sequential([keras.Input((steps, 3)), rnn(), keras.layers.Dense(2)])
    yield "return_sequences=False", keras.Sequential([keras.Input((steps, 3)), rnn(seq=False),
                                                      keras.layers.Dense(2)])
    yield "not a recurrent layer over a kspike cell", keras.Sequential(
        [keras.Input((steps, 3)), keras.layers.GRU(4, return_sequences=True),
         kspike.LeakyReadout(2)])
    yield "output='all'", keras.Sequential([keras.Input((steps, 3)),
                                             rnn(cell={"output": "all"}),
                                             kspike.LeakyReadout(2)])
    yield "go_backwards=True", keras.Sequential([keras.Input((steps, 3)),
                                                 rnn(go_backwards=True),
                                                 kspike.LeakyReadout(2)])
    inp = keras.Input((steps, 3))
    h = rnn()(inp)
    out = kspike.LeakyReadout(2)(keras.layers.Add()([h, h]))
    yield "Add", keras.Model(inp, out)


@pytest.mark.parametrize("expected,model", list(_bad_models()))
def test_unsupported_models_raise(expected, model):
    x = tf.zeros((2, 10, 3))
    with pytest.raises(ValueError, match="EProp supports models") as info:
        EProp().gradients(model, x, tf.zeros((2, 10, 2)), keras.losses.MeanSquaredError())
    assert expected in str(info.value) or "not" in str(info.value)


def test_functional_chain_and_argument_errors():
    steps = 10
    inp = keras.Input((steps, 3))
    h = keras.layers.RNN(kspike.LIF(4), return_sequences=True)(inp)
    model = keras.Model(inp, kspike.LeakyReadout(2)(h))
    loss = keras.losses.MeanSquaredError()
    grads = EProp().gradients(model, tf.ones((2, steps, 3)), tf.zeros((2, steps, 2)), loss)
    assert [g.shape for g in grads] == [v.shape for v in model.trainable_variables]
    with pytest.raises(ValueError, match="`x` must have 3 input features"):
        EProp().gradients(model, tf.ones((2, steps, 4)), tf.zeros((2, steps, 2)), loss)
    with pytest.raises(ValueError, match="`x` must have shape"):
        EProp().gradients(model, tf.ones((2, 3)), tf.zeros((2, steps, 2)), loss)
    with pytest.raises(ValueError, match="`feedback` must be one of"):
        EProp(feedback="transposed")
    with pytest.raises(ValueError, match="weight_decay"):
        EProp(weight_decay=-1.0)
    with pytest.raises(TypeError, match="seed"):
        EProp(seed=1.5)
    with pytest.raises(ValueError, match="FiringRateRegularizer"):
        EProp().gradients(model, tf.ones((2, steps, 3)), tf.zeros((2, steps, 2)), loss,
                          regularizers=[kspike.regularizers.VoltageRegularizer()])
    rule = EProp(feedback="random", seed=4, online=True)
    assert EProp.from_config(rule.get_config()).get_config() == rule.get_config()
    assert "feedback='random'" in repr(rule)


def test_rewired_kernels_and_feed_forward_layer():
    """Gradients reach DEEP R magnitudes through the effective kernel: d/dtheta = S * dE/dW on
    active entries (chain rule), checked against a dense twin with the same effective weights;
    a recurrent=False layer has input weights only."""
    batch, steps, n_in, n_out = 3, 30, 5, 2
    x = inputs(batch, steps, n_in, 0.4, "float32", seed=9)
    y = tf.constant(np.random.default_rng(9).standard_normal((batch, steps, n_out)), tf.float32)
    loss = keras.losses.MeanSquaredError()
    sparse = build_model([kspike.LIF(6, thr=0.03, recurrent=False, seed=1),
                          kspike.ALIF(6, n_adaptive=3, thr=0.03, connectivity=0.5, seed=2)],
                         n_in, steps, n_out)
    dense = build_model([kspike.LIF(6, thr=0.03, recurrent=False, seed=1),
                         kspike.ALIF(6, n_adaptive=3, thr=0.03, seed=2)], n_in, steps, n_out)
    cell = sparse.layers[1].cell
    w_in, w_rec, _ = cell.effective_kernels("float32")
    dense.layers[0].cell.input_kernel.assign(sparse.layers[0].cell.input_kernel)
    dense.layers[1].cell.input_kernel.assign(w_in)
    dense.layers[1].cell.recurrent_kernel.assign(w_rec)
    dense.layers[2].set_weights(sparse.layers[2].get_weights())
    got = {id(v): g for v, g in zip(sparse.trainable_variables,
                                    EProp().gradients(sparse, x, y, loss))}
    ref = {id(v): g for v, g in zip(dense.trainable_variables,
                                    EProp().gradients(dense, x, y, loss))}
    assert len(sparse.layers[0].trainable_variables) == 1      # recurrent=False: W_in only
    assert got[id(sparse.layers[0].trainable_variables[0])] is not None
    dense_cell = dense.layers[1].cell
    for kind, dense_variable in (("input", dense_cell.input_kernel),
                                 ("recurrent", dense_cell.recurrent_kernel)):
        rewired = cell._rewired[kind]
        mask, sign = rewired.mask.numpy(), rewired.sign.numpy()
        want = ref[id(dense_variable)].numpy() * sign * mask
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got[id(rewired.magnitude)].numpy() * mask, want, rtol=1e-5,
                                   atol=1e-6 * np.abs(want).max())


def test_in_trainer_with_adaptive_feedback_and_regularizer():
    steps, n_in = 30, 4
    model = build_model([kspike.LIF(12, thr=0.03, seed=0)], n_in, steps, 1)
    rng = np.random.default_rng(0)
    x = (rng.random((16, steps, n_in)) < 0.3).astype("float32")
    target = np.sin(np.linspace(0, 6, steps))[None, :, None].repeat(16, 0).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, target)).batch(8).repeat()
    rule = EProp(feedback="adaptive", seed=2)
    trainer = kspike.Trainer(model, keras.optimizers.Adam(0.02),
                             keras.losses.MeanSquaredError(), rule=rule,
                             regularizers=[kspike.regularizers.FiringRateRegularizer(20.0, 0.1)])
    history = trainer.fit(ds, steps=12, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert any(k.startswith("firing_rate") for k in history.history)
    fresh = EProp(feedback="adaptive", seed=2)
    fresh.compute(model, tf.constant(x[:8]), tf.constant(target[:8]),
                  keras.losses.MeanSquaredError(), training=False)
    assert np.abs(fresh.feedback_weights[0].numpy()
                  - rule.feedback_weights[0].numpy()).max() > 1e-4
