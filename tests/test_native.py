"""kspike.native: the C++ time loops of SpikingRNN against the TensorFlow loops and Keras.

Every case runs the same layer three ways: ``SpikingRNN(native=True)``,
``SpikingRNN(native=False)`` (kspike's TensorFlow loop) and ``keras.layers.RNN`` (TensorFlow's
autodiff of the cell), and compares spikes (identical), voltages and thresholds, final states
and the gradients with respect to inputs, weights and initial states.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

import kspike
from kspike import engine, native, surrogates

from test_engine import _assert_close, _initial_states, _inputs, _outputs_and_grads

pytestmark = pytest.mark.heavy(60)

HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
# Where a compiler exists the native loops must build (the first test fails otherwise), so
# these tests run on every machine that can run them, and only a machine without g++ skips.
needs_compiler = pytest.mark.skipif(not HAS_COMPILER,
                                    reason="no C++ compiler: the TensorFlow loop is used")
# 17 rows: two shards of unequal size on a 2-thread pool (the batch split must not matter).
B, T, N_IN, UNITS = 17, 40, 6, 12


@needs_compiler
def test_native_loops_compile_where_a_compiler_exists():
    assert native.available(), native._state["error"]


def _three_layers(make_cell, x_shape, **layer_kwargs):
    layers = [keras.layers.RNN(make_cell(), **layer_kwargs),
              kspike.SpikingRNN(make_cell(), native=False, **layer_kwargs),
              kspike.SpikingRNN(make_cell(), native=True, **layer_kwargs)]
    for layer in layers:
        layer.build(x_shape)
    for layer in layers[1:]:
        for source, target in zip(layers[0].weights, layer.weights):
            target.assign(source)
    return layers


def _check(make_cell, layer_kwargs=None, initial=True, x=None, rtol=2e-5, min_rate=0.02,
           density=0.5, generic=True):
    assert native.available(), native._state["error"]
    layer_kwargs = {"return_sequences": True, "return_state": True, **(layer_kwargs or {})}
    x = _inputs(batch=B, steps=T, features=N_IN, density=density) if x is None else x
    generic_layer, tf_loop, native_loop = _three_layers(make_cell, x.shape, **layer_kwargs)
    init = _initial_states(generic_layer.cell, batch=x.shape[0]) if initial else None
    # generic=False: against kspike's TensorFlow loop only (keras.layers.RNN is the slow one).
    results = [_outputs_and_grads(layer, x, init) for layer in
               ((generic_layer,) if generic else ()) + (tf_loop, native_loop)]
    (out_t, grad_t), (out_n, grad_n) = results[-2:]
    out_g, grad_g = results[0]          # keras.layers.RNN, or the TensorFlow loop again
    units = generic_layer.cell.units
    rate = out_g[0][..., :units].mean()
    assert min_rate <= rate <= 0.6, f"uninformative firing rate {rate}"
    z_final = 1 + list(generic_layer.cell.state_names).index("z")
    for reference in (out_g, out_t):
        np.testing.assert_array_equal(reference[0][..., :units], out_n[0][..., :units])
        np.testing.assert_array_equal(reference[z_final], out_n[z_final])   # spikes
        for a, b in zip(reference, out_n):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # The element-wise updates round as TensorFlow's; only the products sum in another order.
    for a, b in zip(out_t, out_n):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    names = ["inputs"] + [w.path for w in native_loop.trainable_variables] + \
        [f"initial {s}" for s in (generic_layer.cell.state_names if initial else ())]
    assert len(grad_g) == len(grad_t) == len(grad_n) == len(names)
    for name, a, t, b in zip(names, grad_g, grad_t, grad_n):
        _assert_close(a, b, rtol=rtol, what=f"{name} (vs keras.layers.RNN)")
        _assert_close(t, b, rtol=rtol, what=f"{name} (vs the TensorFlow loop)")
    return out_n, grad_n


CELLS = {
    "lif": lambda: kspike.LIF(UNITS, thr=0.05, seed=3),
    "lif_refractory_bias": lambda: kspike.LIF(
        UNITS, thr=0.05, n_refractory=2, use_bias=True,
        bias_initializer=keras.initializers.RandomUniform(0.0, 0.05, seed=2), seed=3),
    "lif_feedforward": lambda: kspike.LIF(UNITS, thr=0.05, recurrent=False, seed=3),
    "alif": lambda: kspike.ALIF(UNITS, thr=0.05, beta=1.8, tau_adaptation=30.0, seed=3),
    "alif_mix_refractory": lambda: kspike.ALIF(
        UNITS, n_adaptive=5, thr=0.05, tau_adaptation=30.0, n_refractory=3, seed=3),
    "alif_all_outputs_bias": lambda: kspike.ALIF(
        UNITS, n_adaptive=6, thr=0.05, tau_adaptation=30.0, n_refractory=1, use_bias=True,
        output="all", seed=3),
    "lif_all_outputs": lambda: kspike.LIF(UNITS, thr=0.05, output="all", seed=3),
}


@needs_compiler
@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_options_equal_tensorflow_loop_and_keras(name):
    _check(CELLS[name])


@needs_compiler
@pytest.mark.parametrize("name", ["alif_mix_refractory", "lif_refractory_bias"])
def test_sparse_inputs(name):
    # At most a quarter of the inputs active: x_t W_in and dW_in add the active inputs' rows.
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.15, scale=3.0)
    assert 0.0 < np.mean(x != 0) <= 0.25
    _check(CELLS[name], x=x)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("density", [0.15, 0.5])
def test_forward_in_blocks_of_rows(rows, density, monkeypatch):
    # The forward op runs the batch in blocks of rows over all steps (17 rows: blocks of 3
    # with a tail of 2, within two shards on a 2-thread pool); sparse and dense inputs,
    # training (forward and backward) and inference give the results of the TensorFlow loop.
    monkeypatch.setattr(engine, "_FORWARD_ROWS_PER_BLOCK", rows)
    x = _inputs(batch=B, steps=T, features=N_IN, density=density, scale=3.0)
    out_n, _ = _check(CELLS["alif_all_outputs_bias"], x=x, generic=False)
    layer = kspike.SpikingRNN(CELLS["alif_all_outputs_bias"](), return_sequences=True,
                              return_state=True, native=True)
    layer.build(x.shape)
    inference = [np.asarray(o) for o in layer(x, initial_state=_initial_states(
        layer.cell, batch=B))]
    with tf.GradientTape():
        training = [np.asarray(o) for o in layer(x, initial_state=_initial_states(
            layer.cell, batch=B))]
    for a, b in zip(training, inference):
        np.testing.assert_array_equal(a, b)


def _forward_op_v(x, sparse_inputs=None):
    """v_1 .. v_T (T, B, n) of the native forward op for an ALIF layer on ``x``: the op
    decides sparse or dense inputs itself (``sparse_inputs`` None), else as told."""
    cell = kspike.ALIF(UNITS, n_adaptive=5, thr=0.05, seed=3)
    layer = kspike.SpikingRNN(cell)
    layer.build(x.shape)
    params = cell.parameters("float32")
    w_in, w_rec, _ = cell.effective_kernels("float32")
    zeros = tf.zeros((x.shape[0], UNITS))
    outputs = native.load().kspike_spiking_forward(
        x=x, sparse_inputs=bool(sparse_inputs), w_in=tf.convert_to_tensor(w_in),
        w_rec=tf.convert_to_tensor(w_rec), bias=tf.zeros((0,)),
        beta=tf.constant(cell.beta_vector, tf.float32), v0=zeros, b0=zeros, z0=zeros,
        r0=zeros, recurrent=True, has_bias=False, store_backward=False,
        count_inputs=sparse_inputs is None, **engine.native_neuron_attrs(cell, params))
    return outputs[1].numpy(), bool(outputs[9])


@needs_compiler
def test_forward_op_counts_its_inputs_like_the_training_pass():
    # The op decides sparse inputs (at most a quarter nonzero) by its own exact count and
    # returns the decision, which a training pass hands to the backward op: right on both
    # sides of the boundary. The two products round differently on these inputs, so v tells
    # which one ran.
    assert native.available(), native._state["error"]
    rng = np.random.default_rng(4)
    size = B * T * N_IN
    for nonzero, sparse in ((size // 4, True), (size // 4 + 1, False)):
        flat = np.zeros(size, "float32")
        flat[rng.permutation(size)[:nonzero]] = rng.uniform(0.1, 3.0, nonzero)
        x = tf.constant(flat.reshape(B, T, N_IN))
        decided, used = _forward_op_v(x)
        assert used is sparse
        told, told_used = _forward_op_v(x, sparse)
        np.testing.assert_array_equal(decided, told)
        assert told_used is sparse
        other, other_used = _forward_op_v(x, not sparse)
        assert np.any(decided != other) and other_used is (not sparse)


SURROGATES = [("rectangular", {}), ("triangular", {}), ("exponential", {}), ("gaussian", {}),
              ("sigmoid", {}), ("fast_sigmoid", {}), ("ntail", {"tail": 2.5}),
              ("cauchy", {}), ("multi_gaussian", {})]


@needs_compiler
@pytest.mark.parametrize("name,extra", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_every_catalogue_surrogate_with_parameters(name, extra):
    spike_function = surrogates.get(name, dampening=0.45, sharpness=0.7, **extra)
    _check(lambda: kspike.ALIF(UNITS, n_adaptive=7, thr=0.05, tau_adaptation=30.0,
                               n_refractory=2, surrogate=spike_function, output="all",
                               seed=3))


@needs_compiler
@pytest.mark.parametrize("name,extra", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_sparse_backward_product_every_surrogate(name, extra, monkeypatch):
    # dL/dz_{t-1} += dI_t W_rec^T formed in every step but the last from the rows of the
    # neurons with a nonzero pseudo-derivative term (a threshold fraction of 1): the same
    # gradients as the dense product of the TensorFlow loop, compact surrogate or not.
    monkeypatch.setattr(engine, "_SPARSE_BACKWARD_FRACTION", 1.0)
    spike_function = surrogates.get(name, dampening=0.45, sharpness=1.5, **extra)
    _check(lambda: kspike.ALIF(UNITS, n_adaptive=7, thr=0.05, tau_adaptation=30.0,
                               n_refractory=2, surrogate=spike_function, seed=3),
           generic=False)


@needs_compiler
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_sparse_backward_product_lif_and_last_output(fraction, monkeypatch):
    # Dense, mixed (the default threshold) and sparse steps; LIF neurons; and gradients that
    # enter through the final states only.
    monkeypatch.setattr(engine, "_SPARSE_BACKWARD_FRACTION", fraction)
    triangular = surrogates.get("triangular", sharpness=3.0)
    _check(lambda: kspike.LIF(UNITS, thr=0.05, n_refractory=2, surrogate=triangular,
                              seed=3), generic=False)
    _check(lambda: kspike.ALIF(UNITS, n_adaptive=5, thr=0.05, tau_adaptation=30.0,
                               surrogate=triangular, seed=3), dict(return_sequences=False),
           generic=False)
    # 268 neurons: one 256-column block of the vectorised product and a tail.
    _check(lambda: kspike.ALIF(268, n_adaptive=100, thr=0.05, tau_adaptation=30.0,
                               n_refractory=1, surrogate=triangular, seed=3), generic=False)


@needs_compiler
def test_last_output_only_and_go_backwards():
    _check(CELLS["alif_mix_refractory"], dict(return_sequences=False))
    _check(CELLS["alif_all_outputs_bias"], dict(go_backwards=True))


@needs_compiler
def test_dense_initial_spikes_and_single_row():
    # z_0 need not be 0/1 (a user's initial state): the spike-sparse products still hold.
    assert native.available(), native._state["error"]
    x = _inputs(batch=1, steps=T, features=N_IN)
    generic, _, native_loop = _three_layers(CELLS["alif"], x.shape, return_sequences=True)
    rng = np.random.default_rng(5)
    init = [tf.constant(rng.uniform(0.0, 1.0, (1, UNITS)).astype("float32"))
            for _ in generic.cell.state_names]
    init[-1] = tf.zeros((1, UNITS))                  # refractory counters
    (out_g, grad_g), (out_n, grad_n) = [_outputs_and_grads(layer, x, init)
                                        for layer in (generic, native_loop)]
    np.testing.assert_array_equal(out_g[0], out_n[0])
    for a, b in zip(grad_g, grad_n):
        _assert_close(a, b, what="gradient")


@needs_compiler
def test_auto_falls_back_where_native_cannot_run():
    assert native.available(), native._state["error"]
    cell = kspike.ALIF(UNITS, thr=0.05, seed=3)
    layer = kspike.SpikingRNN(cell, return_sequences=True)
    layer.build((B, T, N_IN))
    assert layer._native_ops("float32", "float32", masked=False) is not None
    assert layer._native_ops("float32", "float32", masked=True) is None
    assert layer._native_ops("float64", "float64", masked=False) is None
    assert layer._native_ops("float32", "float16", masked=False) is None

    class Custom(surrogates.Triangular):
        def pseudo_derivative(self, x):
            return 2.0 * super().pseudo_derivative(x)

    custom = kspike.SpikingRNN(kspike.ALIF(UNITS, surrogate=Custom()), return_sequences=True)
    custom.build((B, T, N_IN))
    assert custom._native_ops("float32", "float32", masked=False) is None


@needs_compiler
def test_xla_compiled_training_step_uses_the_tensorflow_loop():
    # compile(jit_compile=True) traces the layer inside an XLA cluster, which cannot hold the
    # native ops: "auto" runs the TensorFlow loop there, and training works.
    assert native.available(), native._state["error"]
    x = _inputs(batch=4, steps=10, features=N_IN)
    y = np.random.default_rng(0).integers(0, 2, (4, 10))
    model = keras.Sequential([keras.Input((10, N_IN)),
                              kspike.SpikingRNN(kspike.ALIF(UNITS, thr=0.05),
                                                return_sequences=True),
                              kspike.LeakyReadout(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_native_true_refuses_clearly_where_it_cannot_run():
    layer = kspike.SpikingRNN(kspike.ALIF(UNITS, thr=0.05), return_sequences=True,
                              native=True)
    x = tf.constant(_inputs(batch=2, steps=5, features=N_IN))
    mask = tf.ones((2, 5), bool)
    with pytest.raises(ValueError, match="native=True"):
        with tf.GradientTape():
            layer(x, mask=mask)
    with pytest.raises(ValueError, match="`native` must be 'auto', True or False"):
        kspike.SpikingRNN(kspike.ALIF(UNITS), native="yes")
    with pytest.raises(ValueError, match="`native`"):
        kspike.SpikingRNN(kspike.ALIF(UNITS), native=1)


class _DoubledTriangular(surrogates.Triangular):
    def pseudo_derivative(self, x):
        return 2.0 * super().pseudo_derivative(x)


@pytest.mark.parametrize("case, expected", [
    ("mask", "a mask was given"),
    ("float64", "the state dtype is float64"),
    ("mixed_float16", "the compute dtype of the matmuls is float16"),
    ("surrogate", "the surrogate .* of type _DoubledTriangular is not a catalogue class"),
    ("jit_compile", "jit_compile=True"),
    ("environment", "KSPIKE_NATIVE='0' is set in the environment"),
])
def test_native_true_names_the_one_condition_that_failed(case, expected, monkeypatch):
    if case == "environment":
        monkeypatch.setenv("KSPIKE_NATIVE", "0")
    if case in ("float64", "mixed_float16"):
        keras.config.set_dtype_policy(case)
    cell = kspike.ALIF(UNITS, thr=0.05, surrogate=_DoubledTriangular()
                       if case == "surrogate" else "triangular")
    layer = kspike.SpikingRNN(cell, return_sequences=True, native=True,
                              jit_compile=case == "jit_compile")
    x = tf.constant(_inputs(batch=2, steps=5, features=N_IN))
    mask = tf.ones((2, 5), bool) if case == "mask" else None
    with pytest.raises(ValueError, match="native=True") as error:
        with tf.GradientTape():
            layer(x, mask=mask)
    # Keras appends the call's arguments to the message: only kspike's part is checked.
    message = str(error.value).split("Arguments received")[0]
    assert re.search(expected, message), message
    # One condition: the reasons of the other cases do not appear.
    others = ("mask was given", "dtype", "surrogate", "jit_compile=True", "KSPIKE_NATIVE",
              "GPU")
    assert sum(other in message for other in others) == 1, message


def test_native_blocked_by_gpus_and_by_an_enclosing_xla_function(monkeypatch):
    cell = kspike.LIF(UNITS)
    assert engine.why_not_native(cell, "float32", "float32", masked=False) is None
    assert "XLA-compiled function" in engine.why_not_native(
        cell, "float32", "float32", masked=False, xla_context=True)
    fake_gpus = [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: fake_gpus if kind == "GPU" else [])
    reason = engine.why_not_native(cell, "float32", "float32", masked=False)
    assert reason.startswith("the process has 1 GPU(s) (/device:GPU:0)"), reason
    assert not engine.native_applies(cell, "float32", "float32", masked=False)


def test_config_round_trip_keeps_native():
    layer = kspike.SpikingRNN(kspike.LIF(UNITS), native=False, return_sequences=True)
    clone = kspike.SpikingRNN.from_config(layer.get_config())
    assert clone.native is False
    assert kspike.SpikingRNN(kspike.LIF(UNITS)).get_config()["native"] == "auto"


@needs_compiler
def test_command_line_build():
    result = subprocess.run([sys.executable, "-m", "kspike.native"], capture_output=True,
                            timeout=600, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "native loops ready" in result.stdout and ".so" in result.stdout


def test_cache_key_is_independent_of_where_kspike_is_installed(monkeypatch, tmp_path):
    # The same source in another folder (another checkout or virtual environment) reuses the
    # compiled library; a changed source or compiler does not.
    key = native._library_key(tf)
    copy = tmp_path / "elsewhere" / "spiking_ops.cc"
    copy.parent.mkdir()
    shutil.copyfile(native.SOURCE, copy)
    monkeypatch.setattr(native, "SOURCE", str(copy))
    assert native._library_key(tf) == key
    copy.write_text(copy.read_text() + "\n// changed\n")
    assert native._library_key(tf) != key
    shutil.copyfile(native.__file__.replace("__init__.py", "spiking_ops.cc"), copy)
    monkeypatch.setenv("CXX", str(tmp_path / "another-compiler"))
    assert native._library_key(tf) != key


def test_disabled_by_environment_variable(monkeypatch, tmp_path):
    # As in a fresh process that has not loaded them yet; no compiler is looked for.
    monkeypatch.setattr(native, "_state", {"loaded": False, "module": None, "error": None,
                                            "library": None})
    monkeypatch.setenv("KSPIKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    for value in ("0", "off", " False "):
        monkeypatch.setenv("KSPIKE_NATIVE", value)
        assert native.load() is None and not native.available()
        assert "KSPIKE_NATIVE" in native.unavailable_reason()
    assert native._state["error"] is None and not os.listdir(tmp_path)


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    # A machine whose compiler fails: one clear warning, then the TensorFlow loop.
    monkeypatch.setattr(native, "_state", {"loaded": False, "module": None, "error": None,
                                            "library": None})
    monkeypatch.setenv("KSPIKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="native SpikingRNN loops are unavailable"):
        assert native.load() is None
    assert native.load() is None          # decided once per process
    layer = kspike.SpikingRNN(kspike.LIF(UNITS, thr=0.05, seed=3), return_sequences=True)
    x = tf.constant(_inputs(batch=2, steps=8, features=N_IN))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grads = tape.gradient(loss, layer.trainable_variables)
    assert all(g is not None for g in grads)


def _native_forward_calls(monkeypatch):
    """The ``for_backward`` flag of every native forward traced or run from now on."""
    calls = []
    original = engine._NativeBackend.forward

    def forward(self, inputs):
        calls.append(self.for_backward)
        return original(self, inputs)
    monkeypatch.setattr(engine._NativeBackend, "forward", forward)
    return calls


def _twin_models(output="spikes", return_sequences=True, steps=T):
    """The same model with native="auto" and native=False (equal weights), compiled."""
    models = []
    for native_flag in ("auto", False):
        model = keras.Sequential([
            keras.Input((steps, N_IN)),
            kspike.SpikingRNN(kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, n_refractory=2,
                                          output=output, seed=3),
                              return_sequences=return_sequences, native=native_flag),
            kspike.LeakyReadout(3) if return_sequences else keras.layers.Dense(3)])
        model.compile("adam", "mse")
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    return models


@needs_compiler
@pytest.mark.parametrize("output, return_sequences", [("spikes", True), ("all", True),
                                                      ("spikes", False)])
def test_inference_runs_the_native_forward(monkeypatch, output, return_sequences):
    # predict, evaluate and eager calls (no tape) run the native forward alone, with the
    # outputs of the TensorFlow loop (spikes identical).
    assert native.available(), native._state["error"]
    calls = _native_forward_calls(monkeypatch)
    fast, reference = _twin_models(output, return_sequences)
    x = _inputs(batch=B, steps=T, features=N_IN)
    y = np.random.default_rng(0).random((B, T, 3) if return_sequences else (B, 3))
    layer = fast.layers[0]
    spikes = layer(x)[..., :UNITS].numpy()
    assert spikes.mean() > 0.02
    np.testing.assert_array_equal(spikes, reference.layers[0](x)[..., :UNITS].numpy())
    np.testing.assert_allclose(layer(x).numpy(), reference.layers[0](x).numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(fast.predict(x, verbose=0), reference.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.evaluate(x, y, verbose=0),
                               reference.evaluate(x, y, verbose=0), rtol=1e-5)
    assert calls == [False, False, False, False], calls   # eager x2, predict, evaluate


@needs_compiler
@pytest.mark.parametrize("rows", [0, 3])
def test_predict_spikes_equal_the_tensorflow_loop(rows, monkeypatch):
    # model.predict runs the forward op alone (no backward buffers, its own count of the
    # inputs, rows in blocks) over batches of 16 and a partial one: the spikes of the
    # TensorFlow loop exactly, v and A to float32 round-off, sparse and dense inputs.
    monkeypatch.setattr(engine, "_FORWARD_ROWS_PER_BLOCK", rows)
    calls = _native_forward_calls(monkeypatch)
    models = [keras.Sequential([
        keras.Input((T, N_IN)),
        kspike.SpikingRNN(kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, n_refractory=2,
                                      output="all", seed=3),
                          return_sequences=True, native=flag)]) for flag in ("auto", False)]
    models[1].set_weights(models[0].get_weights())
    for density in (0.1, 0.5):
        x = _inputs(batch=40, steps=T, features=N_IN, density=density, scale=3.0)
        fast, reference = [m.predict(x, batch_size=16, verbose=0) for m in models]
        assert 0.02 < reference[..., :UNITS].mean() < 0.6
        np.testing.assert_array_equal(fast[..., :UNITS], reference[..., :UNITS])
        np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-7)
    assert calls and not any(calls), calls


@needs_compiler
def test_trainer_validation_runs_the_native_forward(monkeypatch):
    calls = _native_forward_calls(monkeypatch)
    fast, reference = _twin_models()
    x = _inputs(batch=8, steps=T, features=N_IN)
    y = np.random.default_rng(0).random((8, T, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    losses = [kspike.Trainer(model, "adam", "mse", verbose=0).evaluate(data)["loss"]
              for model in (fast, reference)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert calls == [False]


@needs_compiler
def test_user_functions_run_the_tensorflow_forward(monkeypatch):
    # A tf.function of the user (it may be saved later) traces the TensorFlow loop, also when
    # it is traced inside Keras' predict function.
    calls = _native_forward_calls(monkeypatch)
    fast, _ = _twin_models()
    x = _inputs(batch=4, steps=T, features=N_IN)
    tf.function(lambda v: fast(v))(x)
    assert calls == []
    inner = tf.function(lambda v: fast.layers[0](v))
    wrapped = keras.Sequential([keras.Input((T, N_IN)), keras.layers.Lambda(inner)])
    wrapped.predict(x, verbose=0)
    assert calls == []


@needs_compiler
def test_exports_hold_no_native_op(tmp_path):
    # The native ops run under a gradient tape, eagerly and in Keras' fit / evaluate /
    # predict functions only: every route of export, taken after all of these, writes a graph
    # of TensorFlow ops alone, which loads and serves in a process that never imports kspike.
    assert native.available(), native._state["error"]
    model = keras.Sequential([
        keras.Input((T, N_IN)),
        kspike.SpikingRNN(kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, n_refractory=2, seed=3),
                          return_sequences=True, native=True),
        kspike.LeakyReadout(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = _inputs(batch=B, steps=T, features=N_IN)
    y = np.random.default_rng(0).integers(0, 3, (B, T))
    model.fit(x, y, epochs=1, batch_size=B, verbose=0, validation_data=(x, y))
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    expected = model(x).numpy()

    class UserModule(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec((None, T, N_IN))])
        def serve(self, v):
            return self.model(v)

    user = UserModule(model)
    np.testing.assert_allclose(user.serve(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    paths = {"kspike": kspike.export.saved_model(model, tmp_path / "kspike_export")}
    paths["keras"] = str(tmp_path / "keras_export")
    model.export(paths["keras"], verbose=False)
    paths["tf"] = str(tmp_path / "tf_saved_model")
    tf.saved_model.save(model, paths["tf"])
    paths["user"] = str(tmp_path / "user_function")
    tf.saved_model.save(user, paths["user"])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", expected)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"paths = {paths!r}\n"
        f"x = tf.constant(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"expected = np.load({str(tmp_path / 'y.npy')!r})\n"
        "outputs = {\n"
        "    'kspike': lambda m: m.serve(x),\n"
        "    'keras': lambda m: m.serve(x),\n"
        "    'tf': lambda m: list(m.signatures['serving_default'](x).values())[0],\n"
        "    'user': lambda m: m.serve(x)}\n"
        "for route, path in paths.items():\n"
        "    y = outputs[route](tf.saved_model.load(path)).numpy()\n"
        "    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5, err_msg=route)\n"
        "assert 'kspike' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr.decode()[-3000:]


@needs_compiler
def test_stacked_layers_train_natively_end_to_end(monkeypatch):
    # Two SpikingRNN layers (the lower one's spikes are the upper one's inputs): both run the
    # native forward and backward ops, with the gradients of the TensorFlow loops.
    backward_calls = []
    original = engine._NativeBackend.backward

    def backward(self, *args):
        backward_calls.append(self.cell.name)
        return original(self, *args)
    monkeypatch.setattr(engine._NativeBackend, "backward", backward)
    x = tf.constant(_inputs(batch=B, steps=T, features=N_IN))
    results = []
    for native_flag in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((T, N_IN))] + [
            kspike.SpikingRNN(kspike.ALIF(UNITS, n_adaptive=6, thr=0.05, n_refractory=2,
                                          seed=3 + i, name=f"alif_{i}"),
                              return_sequences=True, native=native_flag)
            for i in range(2)] + [kspike.LeakyReadout(3, seed=5)])
        weights = np.linspace(-1.0, 1.0, 3).astype("float32")
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * weights)
        results.append((y.numpy(), tape.gradient(loss, model.trainable_variables)))
    assert backward_calls == ["alif_1", "alif_0"]
    (y_n, g_n), (y_t, g_t) = results
    np.testing.assert_allclose(y_n, y_t, rtol=1e-5, atol=1e-6)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in g_t)
    for variable, a, b in zip(model.trainable_variables, g_t, g_n):
        _assert_close(a.numpy(), b.numpy(), rtol=2e-5, what=variable.path)
