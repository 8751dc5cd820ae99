"""The native backward pass over the zeros of the pseudo-derivative and of the spikes.

dW_rec and dW_in are summed per block of steps over the (active presynaptic, step) pairs, and
the recurrent product dI_t W_rec^T adds only the rows of the neurons with a nonzero
pseudo-derivative term: for every surrogate the gradients must equal those of the TensorFlow
loop (which takes dense products), and ``kspike.native.backward_stats`` must show the sparse
product taken where a compact surrogate leaves most terms at zero, and dense otherwise.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import engine, native, surrogates

from test_engine import _assert_close, _inputs
from test_native import B, N_IN, SURROGATES, T, UNITS, _check, needs_compiler

COMPACT = ("rectangular", "triangular")
# Rational functions, never 0 (the exponential ones underflow to 0 far from the threshold).
NEVER_ZERO = ("fast_sigmoid", "ntail", "cauchy")


def _alif(spike_function, units=UNITS, **kwargs):
    return lambda: kspike.ALIF(units, n_adaptive=units // 2, thr=0.05, tau_adaptation=30.0,
                               n_refractory=2, surrogate=spike_function, seed=3, **kwargs)


@needs_compiler
@pytest.mark.parametrize("block_steps", [1, 3])
@pytest.mark.parametrize("name,extra", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_every_surrogate_equals_tensorflow_loop(name, extra, block_steps, monkeypatch):
    # Sparse inputs (dW_in from the active inputs), the default threshold of the sparse
    # product, weight-gradient blocks of 1 and 3 steps (T = 40: a partial last block).
    monkeypatch.setattr(engine, "_WEIGHT_BLOCK_STEPS", block_steps)
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.15, scale=3.0)
    spike_function = surrogates.get(name, dampening=0.45, sharpness=1.5, **extra)
    native.backward_stats(reset=True)
    _check(_alif(spike_function), x=x, generic=False)
    stats = native.backward_stats()
    # One backward call of the native layer, all entries counted.
    assert stats["entries"] == T * B * UNITS
    shards = (stats["sparse_steps"] + stats["dense_steps"]) // T
    assert shards >= 1 and stats["sparse_steps"] + stats["dense_steps"] == shards * T
    assert stats["dense_steps"] >= shards            # the last step is always dense
    if name in COMPACT:
        assert stats["psi_fraction"] < 0.3 and stats["sparse_steps"] > 0
    elif name in NEVER_ZERO:
        # Nonzero everywhere outside refractory periods: (nearly) every step dense; only a
        # step where refractoriness zeroes most entries of a batch shard can fall under the
        # sparse threshold.
        assert stats["psi_fraction"] > 0.7
        assert stats["dense_steps"] >= 0.9 * shards * T


@needs_compiler
def test_sparse_product_taken_for_compact_surrogate():
    # A narrow triangular surrogate: every step but the last (the gradient of the final v)
    # adds only the rows of the neurons with a nonzero term.
    triangular = surrogates.get("triangular", sharpness=4.0)
    native.backward_stats(reset=True)
    _check(_alif(triangular, units=40), generic=False)
    stats = native.backward_stats()
    shards = stats["dense_steps"]
    assert shards >= 1
    assert stats["sparse_steps"] == shards * (T - 1)
    assert 0 < stats["nonzero_terms"] <= stats["nonzero_psi"] < 0.3 * stats["entries"]


@needs_compiler
def test_nonzero_pseudo_derivatives_counted_exactly():
    # The count of the op equals NumPy's count of psi((v - A) / A) != 0 outside refractory
    # periods, from the voltages and thresholds of the same forward pass.
    n_refractory = 2
    triangular = surrogates.get("triangular", sharpness=2.0)
    cell = kspike.ALIF(UNITS, n_adaptive=UNITS // 2, thr=0.05, tau_adaptation=30.0,
                       n_refractory=n_refractory, surrogate=triangular, seed=3, output="all")
    layer = kspike.SpikingRNN(cell, return_sequences=True, native=True)
    x = _inputs(batch=B, steps=T, features=N_IN, density=0.5)
    out = layer(x).numpy()
    z, v, A = out[..., :UNITS], out[..., UNITS:2 * UNITS], out[..., 2 * UNITS:]
    psi = keras.ops.convert_to_numpy(triangular.pseudo_derivative((v - A) / A))
    padded = np.concatenate([np.zeros((B, n_refractory, UNITS)), z], axis=1)
    recent = sum(padded[:, n_refractory - k:n_refractory - k + T]
                 for k in range(1, n_refractory + 1))
    expected = int(np.sum((psi != 0) & (recent == 0)))
    assert 0 < expected < 0.5 * B * T * UNITS
    import tensorflow as tf
    native.backward_stats(reset=True)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x)[..., :UNITS] * np.linspace(-1.0, 1.0, UNITS))
    tape.gradient(loss, layer.trainable_variables)
    stats = native.backward_stats(reset=True)
    assert stats["entries"] == B * T * UNITS
    assert stats["nonzero_psi"] == expected
    # output="all" hands the backward op gradients of v: every step takes the dense product.
    assert stats["sparse_steps"] == 0 and stats["dense_steps"] >= T
    assert native.backward_stats()["entries"] == 0


def _weight_gradients(layer, x, seed=7):
    """The gradients of a weighted spike sum with respect to the layer's weights only, in a
    tf.function (no gradient of the inputs, so no op of the graph reads dL/dI_t)."""
    w = tf.constant(np.random.default_rng(seed).normal(
        size=(x.shape[0], x.shape[1], layer.cell.units)).astype("float32"))

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) * w)
        return tape.gradient(loss, layer.trainable_variables)

    return [g.numpy() for g in gradients()]


@needs_compiler
@pytest.mark.parametrize("density,use_bias,block_steps", [
    (0.15, False, 0), (0.15, False, 3), (0.9, False, 0), (0.15, True, 0)],
    ids=["sparse_inputs", "sparse_inputs_blocks_of_3", "dense_inputs", "bias"])
def test_weight_gradients_without_stored_current_gradient(density, use_bias, block_steps,
                                                          monkeypatch):
    # A training step that needs no input gradient: the backward op leaves dL/dI_t unwritten
    # (its weight sums read a buffer of one block of steps; dense inputs' dW_in is summed per
    # step in the loop) unless the bias gradient reads it, and the weight gradients equal
    # the TensorFlow loop's.
    monkeypatch.setattr(engine, "_WEIGHT_BLOCK_STEPS", block_steps)
    x = _inputs(batch=B, steps=T, features=N_IN, density=density, scale=3.0)
    triangular = surrogates.get("triangular", sharpness=1.5)
    bias = dict(use_bias=True, bias_initializer=keras.initializers.RandomUniform(
        0.0, 0.05, seed=2)) if use_bias else {}
    layers = [kspike.SpikingRNN(_alif(triangular, **bias)(), return_sequences=True,
                                native=flag) for flag in (False, True)]
    for layer in layers:
        layer.build(x.shape)
    layers[1].set_weights(layers[0].get_weights())
    assert len(layers[1].trainable_variables) == (3 if use_bias else 2)   # W_in, W_rec[, b]
    expected = _weight_gradients(layers[0], x)
    native.backward_stats(reset=True)
    result = _weight_gradients(layers[1], x)
    stats = native.backward_stats()
    assert stats["current_written"] + stats["current_skipped"] == 1
    assert stats["current_written" if use_bias else "current_skipped"] == 1
    for variable, a, b in zip(layers[1].trainable_variables, expected, result):
        _assert_close(a, b, rtol=2e-5, what=variable.path)
        assert np.abs(a).max() > 0, variable.path
