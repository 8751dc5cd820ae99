"""kspike.SpikingRNN: outputs and gradients equal to keras.layers.RNN(same cell).

The generic keras.layers.RNN loop differentiated by TensorFlow is the reference for the
hand-written backward pass of SpikingRNN: every test builds the two layers with the same cell
configuration and weights and compares outputs (spikes exactly), final states and gradients with
respect to the inputs, every trainable weight and the initial states. A NumPy re-implementation
of the forward equations checks the layer's values independently.
"""
import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import dynamics

B, T, N_IN, UNITS = 3, 24, 6, 10


def _inputs(seed=0, batch=B, steps=T, features=N_IN, density=0.5, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (batch, steps, features)) * (rng.uniform(size=(batch, steps,
                                                                                  features))
                                                             < density)
    return (scale * x).astype("float32")


def _initial_states(cell, seed=1, batch=B, big_refractory=False):
    rng = np.random.default_rng(seed)
    states = {"v": rng.uniform(-0.5, 1.0, (batch, cell.units)) * cell.thr,
              "b": rng.uniform(0.0, 0.05, (batch, cell.units)),
              "z": (rng.uniform(size=(batch, cell.units)) < 0.3).astype(float),
              "r": rng.integers(0, cell.n_refractory + 1, (batch, cell.units)).astype(float)}
    if big_refractory:
        # Counters that outlast the sequence carry a gradient from the final r to r_0.
        states["r"][0, :3] = T + 2
    return [tf.constant(states[name], tf.float32) for name in cell.state_names]


def _pair(make_cell, x_shape, fast_kwargs=None, **layer_kwargs):
    generic = keras.layers.RNN(make_cell(), **layer_kwargs)
    fast = kspike.SpikingRNN(make_cell(), **layer_kwargs, **(fast_kwargs or {}))
    generic.build(x_shape)
    fast.build(x_shape)
    assert len(generic.weights) == len(fast.weights)
    for source, target in zip(generic.weights, fast.weights):
        target.assign(source)
    return generic, fast


def _outputs_and_grads(layer, x, initial=None, mask=None, compiled=True, seed=7):
    x_var = tf.Variable(x)
    init_vars = None if initial is None else [tf.Variable(s) for s in initial]
    rng = np.random.default_rng(seed)
    weights = {}

    def loss_weights(i, shape):
        if i not in weights:
            weights[i] = tf.constant(rng.normal(size=shape).astype("float32"))
        return weights[i]

    out_shapes = layer.compute_output_shape(x.shape)
    if not isinstance(out_shapes, (list, tuple)) or isinstance(out_shapes[0], int) or \
            out_shapes[0] is None:
        out_shapes = [out_shapes]
    for i, shape in enumerate(out_shapes):
        loss_weights(i, tuple(x.shape[0] if s is None else s for s in shape))

    def compute():
        with tf.GradientTape() as tape:
            out = layer(x_var, initial_state=init_vars, mask=mask)
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            loss = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32) * weights[i])
                             for i, o in enumerate(outs)])
        sources = [x_var] + list(layer.trainable_variables) + (init_vars or [])
        return outs, tape.gradient(loss, sources)

    if compiled:
        compute = tf.function(compute)
    outs, grads = compute()
    return [o.numpy() for o in outs], [None if g is None else g.numpy() for g in grads]


def _assert_close(reference, value, rtol=2e-5, atol=1e-6, what=""):
    if reference is None and value is None:
        return   # a variable the loss does not depend on, in both layers
    assert value is not None and reference is not None, f"missing gradient {what}"
    assert reference.shape == value.shape, what
    scale = np.max(np.abs(reference)) if reference.size else 0.0
    err = np.max(np.abs(reference - value)) if reference.size else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err} (scale {scale})"


def _compare(make_cell, layer_kwargs=None, initial=False, mask=None, compiled=True,
             x=None, big_refractory=False, rtol=2e-5, min_rate=0.02, fast_kwargs=None,
             out_atol=1e-6):
    layer_kwargs = dict(layer_kwargs or {})
    x = _inputs() if x is None else x
    generic, fast = _pair(make_cell, x.shape, fast_kwargs, **layer_kwargs)
    assert fast.specialised
    init = _initial_states(fast.cell, batch=x.shape[0], big_refractory=big_refractory) \
        if initial else None
    out_g, grad_g = _outputs_and_grads(generic, x, init, mask, compiled)
    out_f, grad_f = _outputs_and_grads(fast, x, init, mask, compiled)
    assert len(out_g) == len(out_f)
    units = fast.cell.units
    spikes = out_g[0][..., :units]
    assert min_rate <= spikes.mean() <= 0.6, f"uninformative firing rate {spikes.mean()}"
    for i, (a, b) in enumerate(zip(out_g, out_f)):
        assert a.shape == b.shape
        if i == 0 or out_atol <= 1e-6:
            # spikes identical (and, in the default loop, the final states bit for bit)
            np.testing.assert_array_equal(a[..., :units], b[..., :units])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=out_atol)
    names = ["inputs"] + [w.path for w in fast.trainable_variables] + \
        [f"initial {s}" for s in (fast.cell.state_names if initial else ())]
    assert len(grad_g) == len(grad_f) == len(names)
    for name, a, b in zip(names, grad_g, grad_f):
        _assert_close(a, b, rtol=rtol, what=name)
    return out_f, grad_f


# ----------------------------------------------------------------------------- cell options
CELLS = {
    "lif": lambda: kspike.LIF(UNITS, thr=0.05, seed=3),
    "lif_refractory_bias_norec": lambda: kspike.LIF(
        UNITS, thr=0.05, n_refractory=2, recurrent=False, use_bias=True,
        bias_initializer=keras.initializers.RandomUniform(0.0, 0.05, seed=2), seed=3),
    "alif": lambda: kspike.ALIF(UNITS, thr=0.05, beta=1.8, tau_adaptation=30.0, seed=3),
    "alif_mix_refractory_ntail": lambda: kspike.ALIF(
        UNITS, n_adaptive=4, thr=0.05, tau_adaptation=30.0, n_refractory=3,
        surrogate=kspike.surrogates.get("ntail", dampening=0.5, sharpness=2.0, tail=2.5),
        seed=3),
    "alif_all_outputs_bias_gaussian": lambda: kspike.ALIF(
        UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0, n_refractory=1, use_bias=True,
        surrogate=kspike.surrogates.get("gaussian", dampening=0.4, sharpness=0.5),
        output="all", seed=3),
    "lif_all_outputs_multi_gaussian": lambda: kspike.LIF(
        UNITS, thr=0.05, surrogate="multi_gaussian", dampening_factor=0.7, output="all",
        seed=3),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_sequences_states_and_gradients_equal_generic(name):
    _compare(CELLS[name], dict(return_sequences=True, return_state=True), initial=True)


@pytest.mark.parametrize("name", ["alif_mix_refractory_ntail", "alif_all_outputs_bias_gaussian",
                                  "lif_refractory_bias_norec"])
def test_jit_compile_equals_generic(name):
    # XLA may round differently; on these short sequences no spike sits close enough to the
    # threshold to flip, so spikes are identical and values agree to float32 rounding.
    _compare(CELLS[name], dict(return_sequences=True, return_state=True), initial=True,
             fast_kwargs=dict(jit_compile=True), rtol=1e-4, out_atol=1e-5)


def test_jit_compile_with_mask_and_without_sequences():
    mask = np.ones((B, T), bool)
    mask[0, 5:9] = False
    mask[2, 15:] = False
    _compare(CELLS["alif_mix_refractory_ntail"], dict(return_sequences=True), initial=True,
             mask=tf.constant(mask), fast_kwargs=dict(jit_compile=True), rtol=1e-4,
             out_atol=1e-5)
    _compare(CELLS["alif_all_outputs_bias_gaussian"], dict(return_state=True), initial=True,
             fast_kwargs=dict(jit_compile=True), rtol=1e-4, out_atol=1e-5)


def test_last_output_only_eager():
    # Eager execution (TensorArrays backed by Python lists) must agree as well.
    _compare(CELLS["alif_mix_refractory_ntail"], dict(return_sequences=False),
             compiled=False)


@pytest.mark.parametrize("name", ["lif_all_outputs_multi_gaussian",
                                  "alif_all_outputs_bias_gaussian"])
def test_last_output_from_final_states(name):
    _compare(CELLS[name], dict(return_sequences=False, return_state=True), initial=True)


def test_refractory_counter_gradient_reaches_initial_state():
    out, grads = _compare(CELLS["alif_mix_refractory_ntail"],
                          dict(return_sequences=True, return_state=True), initial=True,
                          big_refractory=True)
    g_r0 = grads[-1]
    # r_0 = T + 2 > T: the counter runs down without being clipped, gradient 1 * dL/dr_T.
    assert np.all(g_r0[0, :3] != 0.0)


def test_go_backwards():
    _compare(CELLS["alif_all_outputs_bias_gaussian"],
             dict(return_sequences=True, return_state=True, go_backwards=True), initial=True)


@pytest.mark.parametrize("zero_output", [False, True])
def test_masking(zero_output):
    mask = np.ones((B, T), bool)
    mask[0, 15:] = False          # right padding
    mask[1, :4] = False           # left padding: outputs before the first step
    mask[2, 7:11] = False         # a hole
    _compare(CELLS["alif_mix_refractory_ntail"],
             dict(return_sequences=True, return_state=True, zero_output_for_mask=zero_output),
             initial=True, mask=tf.constant(mask), big_refractory=True)


def test_masking_last_output_all_outputs():
    mask = np.ones((B, T), bool)
    mask[0, 20:] = False
    mask[2, 3:9] = False
    _compare(CELLS["alif_all_outputs_bias_gaussian"], dict(return_sequences=False),
             mask=tf.constant(mask))


class _SignedMagnitudes:
    """A DEEP R-like kernel: W = sign * theta on a fixed mask, theta a trainable variable."""

    def __init__(self, layer, name, shape, seed, zero_diagonal):
        rng = np.random.default_rng(seed)
        mask = rng.uniform(size=shape) < 0.6
        if zero_diagonal:
            np.fill_diagonal(mask, False)
        self.sign = tf.constant(np.where(rng.uniform(size=shape) < 0.7, 1.0, -1.0) * mask,
                                tf.float32)
        self.theta = layer.add_weight(
            name=name + "_theta", shape=shape,
            initializer=keras.initializers.Constant(
                np.abs(rng.normal(size=shape)) / np.sqrt(shape[0])))

    def effective(self):
        return self.sign * self.theta


def _rewired_cell():
    cell = kspike.ALIF(UNITS, n_adaptive=5, thr=0.05, tau_adaptation=30.0, n_refractory=1,
                       recurrent=True, seed=3)
    original_build = cell.build

    def build(input_shape):
        # Replace the dense kernels by tensors computed from trainable magnitudes (the way
        # kspike.rewiring builds sparse, sign-constrained kernels).
        cell._rewired["input"] = _SignedMagnitudes(cell, "input", (N_IN, UNITS), 0, False)
        cell._rewired["recurrent"] = _SignedMagnitudes(cell, "recurrent", (UNITS, UNITS), 1,
                                                       True)
        original_build(input_shape)
    cell.build = build
    return cell


def test_tensor_kernels_gradients_reach_magnitudes():
    out, grads = _compare(_rewired_cell, dict(return_sequences=True), initial=True,
                          x=_inputs(scale=2.0))
    # The magnitudes are the first trainable variables; their gradients must be non-zero
    # (grads: inputs, input theta, recurrent theta, dense kernels, initial states).
    assert np.abs(grads[1]).sum() > 0 and np.abs(grads[2]).sum() > 0


def test_rewired_cell_with_connectivity():
    _compare(lambda: kspike.ALIF(UNITS, n_adaptive=5, thr=0.05, tau_adaptation=30.0,
                                 connectivity=0.5, seed=3),
             dict(return_sequences=True), initial=True, x=_inputs(scale=2.0))


# ----------------------------------------------------------------------------- numpy reference
def _numpy_alif(x, w_in, w_rec, bias, beta, thr, alpha, rho, n_refractory):
    """Independent NumPy forward pass of docs/neurons.md from zero states."""
    batch, steps, _ = x.shape
    n = w_in.shape[1]
    v = np.zeros((batch, n))
    b = np.zeros((batch, n))
    z = np.zeros((batch, n))
    r = np.zeros((batch, n))
    zs, vs, As = [], [], []
    for t in range(steps):
        current = x[:, t] @ w_in + z @ w_rec + bias
        b = rho * b + (1 - rho) * z
        A = thr + beta * b
        v = alpha * v + (1 - alpha) * current - A * z
        z_new = ((v - A) / A > 0).astype(float) * (r == 0)
        r = np.where(z_new > 0, n_refractory, np.maximum(r - 1, 0))
        z = z_new
        zs.append(z)
        vs.append(v)
        As.append(A)
    return np.stack(zs, 1), np.stack(vs, 1), np.stack(As, 1)


def test_forward_matches_numpy_reference():
    cell = CELLS["alif_all_outputs_bias_gaussian"]()
    layer = kspike.SpikingRNN(cell, return_sequences=True)
    x = _inputs(scale=1.5)
    y = layer(x).numpy()
    z, v, A = kspike.split_outputs(y)
    w_in, w_rec, bias = [None if w is None else w.numpy().astype(np.float64)
                         for w in cell.effective_kernels("float32")]
    z_np, v_np, A_np = _numpy_alif(x.astype(np.float64), w_in, w_rec, bias, cell.beta_vector,
                                   cell.thr, np.exp(-1 / 20.0), np.exp(-1 / 30.0), 1)
    assert 0.02 < z_np.mean() < 0.6
    np.testing.assert_allclose(v, v_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(A, A_np, rtol=1e-5, atol=1e-7)
    # A spike may only differ where the float64 voltage sits on the threshold.
    differs = z != z_np
    assert np.all(np.abs(((v_np - A_np) / A_np)[differs]) < 1e-4)


def test_neuron_step_vjp_matches_autodiff_of_neuron_step():
    rng = np.random.default_rng(3)
    n = 7
    cell = kspike.ALIF(n, n_adaptive=4, thr=0.05, n_refractory=2,
                       surrogate=kspike.surrogates.get("sigmoid", dampening=0.3))
    params = cell.parameters("float32")
    state = dynamics.NeuronState(*(tf.constant(a, tf.float32) for a in (
        rng.uniform(0, 0.1, (4, n)), rng.uniform(0, 0.1, (4, n)),
        (rng.uniform(size=(4, n)) < 0.5).astype(float), rng.integers(0, 2, (4, n)).astype(float))))
    current = tf.constant(rng.uniform(0, 0.3, (4, n)), tf.float32)
    g = [tf.constant(rng.normal(size=(4, n)), tf.float32) for _ in range(4)]
    with tf.GradientTape() as tape:
        tape.watch([current, state.v, state.b, state.z])
        new, A = dynamics.neuron_step(current, state, params)
        loss = tf.reduce_sum(new.z * g[0] + new.v * g[1] + new.b * g[2] + A * g[3])
    expected = tape.gradient(loss, [current, state.v, state.b, state.z])
    got = dynamics.neuron_step_vjp(g[0], g[1], g[2], g[3], new.v, A, state.z, params,
                                   dynamics.refractory_allowed(state.r, params))
    for e, o in zip(expected, got):
        np.testing.assert_allclose(o.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- layer behaviour
def test_stateful_continues_and_resets():
    x = _inputs(batch=2)
    generic, fast = _pair(CELLS["alif_mix_refractory_ntail"], x.shape, return_sequences=True,
                          stateful=True)
    for _ in range(2):
        np.testing.assert_array_equal(fast(x[:, :12]).numpy(), generic(x[:, :12]).numpy())
        np.testing.assert_array_equal(fast(x[:, 12:]).numpy(), generic(x[:, 12:]).numpy())
        for a, b in zip(generic.states, fast.states):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)
        fast.reset_states()
        generic.reset_states()
    whole = kspike.SpikingRNN(CELLS["alif_mix_refractory_ntail"](), return_sequences=True)
    whole.build(x.shape)
    for source, target in zip(fast.cell.weights, whole.cell.weights):
        target.assign(source)
    both = np.concatenate([fast(x[:, :12]).numpy(), fast(x[:, 12:]).numpy()], axis=1)
    np.testing.assert_array_equal(both, whole(x).numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mixed_precision(jit_compile):
    keras.config.set_dtype_policy("mixed_float16")
    x = _inputs(scale=1.5)
    generic, fast = _pair(CELLS["alif_mix_refractory_ntail"], x.shape,
                          dict(jit_compile=jit_compile), return_sequences=True,
                          return_state=True)
    out_g, grad_g = _outputs_and_grads(generic, x)
    out_f, grad_f = _outputs_and_grads(fast, x)
    assert out_f[0].dtype == out_g[0].dtype
    assert 0.02 < out_g[0].mean() < 0.6
    # The input products are computed in float16 in both loops but grouped differently, so
    # a spike may flip where the voltage sits within float16 rounding of the threshold.
    assert np.mean(out_g[0] != out_f[0]) < 0.01
    for a, b in zip(out_g[1:], out_f[1:]):
        assert a.dtype == b.dtype == np.float16
    for a, b in zip(grad_g, grad_f):
        _assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_keras_file_round_trip(tmp_path):
    x = _inputs()
    model = keras.Sequential([keras.Input((T, N_IN)),
                              kspike.SpikingRNN(CELLS["alif_mix_refractory_ntail"](),
                                                return_sequences=True),
                              kspike.LeakyReadout(2)])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.layers[0]
    assert isinstance(layer, kspike.SpikingRNN) and layer.specialised
    assert layer.cell.get_config() == model.layers[0].cell.get_config()
    assert layer.get_config()["return_sequences"] is True
    assert layer.jit_compile is False
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    compiled = kspike.SpikingRNN.from_config(
        dict(model.layers[0].get_config(), jit_compile=True))
    assert compiled.jit_compile is True and compiled.get_config()["jit_compile"] is True


def test_fallback_for_other_cells_and_unroll():
    x = _inputs(steps=6)
    fast = kspike.SpikingRNN(keras.layers.SimpleRNNCell(4), return_sequences=True)
    generic = keras.layers.RNN(keras.layers.SimpleRNNCell(4), return_sequences=True)
    fast.build(x.shape)
    generic.build(x.shape)
    for source, target in zip(generic.weights, fast.weights):
        target.assign(source)
    assert not fast.specialised
    np.testing.assert_allclose(fast(x).numpy(), generic(x).numpy(), rtol=1e-6)

    class CustomCall(kspike.LIF):
        def call(self, inputs, states, training=None):
            return super().call(inputs, states, training=training)

    assert not kspike.SpikingRNN(CustomCall(3)).specialised
    assert not kspike.SpikingRNN(kspike.LIF(3), unroll=True).specialised
    assert kspike.SpikingRNN(kspike.LIF(3)).specialised


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="return_sequences"):
        kspike.SpikingRNN(kspike.LIF(3), return_sequences="yes")
    with pytest.raises(TypeError, match="jit_compile"):
        kspike.SpikingRNN(kspike.LIF(3), jit_compile=1)
    with pytest.raises(TypeError, match="one cell"):
        kspike.SpikingRNN([kspike.LIF(3), kspike.LIF(3)])
    layer = kspike.SpikingRNN(kspike.LIF(3))
    layer(_inputs(steps=4))
    with pytest.raises(ValueError, match="input features"):
        layer(_inputs(steps=4, features=N_IN + 1))
    with pytest.raises(ValueError, match=r"\(batch, features\)|\(batch, time, features\)"):
        kspike.SpikingRNN(kspike.LIF(3))(np.zeros((2, 5), "float32"))


# ----------------------------------------------------------------------------- paths, export
def test_backward_path_only_under_a_tape(monkeypatch):
    from kspike import engine
    calls = []
    for name in ("_sequence_loop", "_plain_loop"):
        original = getattr(engine, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(engine, name, counted)
    layer = kspike.SpikingRNN(kspike.LIF(4, thr=0.05))
    x = _inputs(steps=5)
    layer(x)
    with tf.GradientTape():
        layer(x)
    assert calls == ["_plain_loop", "_sequence_loop"]


def test_graph_traced_without_tape_is_differentiated_correctly():
    # A function traced outside any tape runs the plain loop; differentiating it afterwards
    # (the function called under an eager tape) must still give the generic gradients.
    x = _inputs(steps=12, scale=1.5)
    generic, fast = _pair(CELLS["alif_mix_refractory_ntail"], x.shape, return_sequences=True)
    results = []
    for layer in (generic, fast):
        f = tf.function(lambda v, layer=layer: layer(v))
        x_var = tf.Variable(x)
        f(x_var)                                        # traced here, no tape
        with tf.GradientTape() as tape:
            y = f(x_var)
            loss = tf.reduce_sum(y * np.linspace(-1, 1, y.shape[-1]).astype("float32"))
        results.append((y.numpy(), tape.gradient(loss, [x_var] + layer.trainable_variables)))
    (y_g, g_g), (y_f, g_f) = results
    assert y_g.mean() > 0.02
    np.testing.assert_array_equal(y_f, y_g)
    for a, b in zip(g_g, g_f):
        _assert_close(a.numpy(), b.numpy(), what="late gradient")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_export_serve_and_step(tmp_path, jit_compile):
    from kspike import export
    x = _inputs(batch=2, scale=1.5)
    model = keras.Sequential([keras.Input((None, N_IN)),
                              kspike.SpikingRNN(CELLS["alif_mix_refractory_ntail"](),
                                                return_sequences=True,
                                                jit_compile=jit_compile),
                              kspike.LeakyReadout(2)])
    expected = model(x).numpy()
    directory = export.saved_model(model, tmp_path / "exported")
    loaded = tf.saved_model.load(directory)
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    states = loaded.initial_state(tf.constant(2))
    steps = []
    for t in range(T):
        y_t, states = loaded.step(tf.constant(x[:, t]), states)
        steps.append(y_t.numpy())
    np.testing.assert_allclose(np.stack(steps, 1), expected, rtol=1e-4, atol=1e-6)
    # serve holds the plain loop (traced without a tape): gradients through the reloaded
    # model equal those of the live one.
    x_var = tf.Variable(x)
    grads = []
    for f in (loaded.serve, model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(f(x_var) ** 2)
        grads.append(tape.gradient(loss, x_var).numpy())
    assert np.abs(grads[1]).max() > 0
    _assert_close(grads[1], grads[0], what="gradient through the SavedModel")


def test_model_fit_matches_generic_training_step():
    # One SGD step of model.fit moves the weights exactly as with keras.layers.RNN.
    x = _inputs(batch=4, scale=1.5)
    y = np.array([0, 1, 1, 0])
    models = []
    for layer_class in (keras.layers.RNN, kspike.SpikingRNN):
        model = keras.Sequential([keras.Input((T, N_IN)),
                                  layer_class(CELLS["alif_mix_refractory_ntail"](),
                                              return_sequences=True),
                                  kspike.LeakyReadout(2, seed=0),
                                  keras.layers.GlobalAveragePooling1D()])
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    before = [w.copy() for w in models[0].get_weights()]
    for model in models:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    moved = [np.abs(a - b).max() for a, b in zip(models[0].get_weights(), before)]
    assert max(moved) > 1e-4
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
