"""Stabilising initialisation (REFERENCE.md section 8): the chosen values satisfy conditions I-IV
numerically, and a deep stack keeps firing where the default initialisation goes silent."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import init


def built_cell(units=50, n_in=30, **kwargs):
    cell = kspike.LIF(units, seed=0, **kwargs)
    layer = keras.layers.RNN(cell, return_sequences=True)
    layer.build((None, None, n_in))
    return cell, layer


def np_psi_triangular(x, gamma, s):
    return gamma * np.maximum(0.0, 1.0 - np.abs(s * x))


def np_psi_ntail(x, gamma, s, q):
    return gamma * (1.0 + 2.0 * np.abs(s * x) / (q - 1.0)) ** (-q)


def test_condition_one_keeps_the_mean_voltage_at_threshold():
    n, tau, thr = 80, 20.0, 0.03
    alpha = math.exp(-1.0 / tau)
    mu = init.recurrent_mean(n, alpha, thr)
    # Fixed point of the mean step with firing probability 1/2 and zero-mean input:
    # v = alpha v + (1 - alpha) (n - 1) mu / 2 - thr / 2.
    v_star = ((1 - alpha) * (n - 1) * mu / 2 - thr / 2) / (1 - alpha)
    assert v_star == pytest.approx(thr, rel=1e-12)
    # The paper's units carry the (1 - alpha) factor into the weight.
    assert (1 - alpha) * mu == pytest.approx((3 - 2 * alpha) * thr / (n - 1), rel=1e-12)


def test_stabilize_satisfies_conditions_one_to_four():
    cell, _ = built_cell(units=50, n_in=30, thr=0.03, surrogate="triangular")
    input_mean, input_var = 0.2, 0.16
    report = init.stabilize(cell, input_mean, input_var, seed=3)
    n, alpha, thr = 50, math.exp(-1.0 / 20.0), 0.03
    w = cell.recurrent_kernel.numpy().astype(np.float64)
    off = ~np.eye(n, dtype=bool)
    assert np.all(np.diag(w) == 0.0)
    # I
    mu = (3 - 2 * alpha) * thr / ((1 - alpha) * (n - 1))
    assert np.mean(w[off]) == pytest.approx(mu, rel=1e-5)
    # II
    var_in = np.var(cell.input_kernel.numpy().astype(np.float64))
    var = (input_var + input_mean ** 2) * var_in * 30 / (n - 1) - mu ** 2 / 2
    assert var > 0
    assert np.var(w[off]) == pytest.approx(var, rel=1e-4)
    assert report.recurrent_var == pytest.approx(var, rel=1e-9)
    # III: the synchronous factor alpha + gamma c sits exactly on the bound 1.
    gamma = cell.spike_function.dampening
    assert gamma == pytest.approx(report.dampening) and cell.dampening_factor == gamma
    s_plus = np.where(w > 0, w, 0).sum(0).mean()
    s_minus = np.where(w < 0, w, 0).sum(0).mean()
    c = (1 - alpha) * (s_plus + s_minus) / thr - 1
    assert alpha + gamma * c == pytest.approx(1.0, abs=1e-5)
    # IV, with an independent quadrature of the triangular psi over x in [-1, 1].
    s = cell.spike_function.sharpness
    x = np.linspace(-1.0, 1.0, 400001)
    es2 = np.mean((np_psi_triangular(x, gamma, s) / thr) ** 2)
    residual = -1 + alpha ** 2 + ((n - 1) * (1 - alpha) ** 2 * np.mean(w[off] ** 2)
                                  + thr ** 2) * es2
    assert abs(residual) < 1e-4
    assert 0.1 < s < 10.0
    assert "condition IV sharpness" in str(report)
    assert cell.get_config()["surrogate"]["sharpness"] == pytest.approx(s)


def test_dampening_negative_mode_and_ntail_sharpness():
    alpha, thr = 0.9, 0.05
    w = -np.abs(np.random.default_rng(1).normal(0.0, 0.05, (20, 20)))
    gamma, s_plus, s_minus = init.dampening(w, alpha, thr)
    assert np.all(s_plus == 0.0) and np.all(s_minus < 0)
    c = (1 - alpha) * s_minus.mean() / thr - 1
    assert alpha + gamma * c == pytest.approx(-1.0, abs=1e-12)
    f = kspike.surrogates.get("ntail", dampening=0.3, tail=1.56)
    s = init.sharpness(f, 0.6, alpha, thr, 20, 0.002)
    x = np.linspace(-1.0, 1.0, 400001)
    es2 = np.mean((np_psi_ntail(x, 0.6, s, 1.56) / thr) ** 2)
    assert abs(-1 + alpha ** 2 + (19 * (1 - alpha) ** 2 * 0.002 + thr ** 2) * es2) < 1e-4


def _stack_rates(x, stabilized, thr=0.06, layers=5, units=64):
    keras.utils.set_random_seed(1)
    stack = []
    for i in range(layers):
        layer = keras.layers.RNN(kspike.LIF(units, thr=thr, seed=10 + i), return_sequences=True)
        layer.build((None, None, x.shape[-1] if i == 0 else units))
        stack.append(layer)
    if stabilized:
        reports = init.stabilize_stack(stack, float(x.mean()), float(x.var()), seed=10)
        assert len(reports) == layers
    h, rates = x, []
    for layer in stack:
        h = np.asarray(tf.function(layer)(h))   # graph mode: faster than eager RNN
        rates.append(float(h[:, 30:].mean()))
    return rates


def test_deep_stack_keeps_firing_where_default_goes_silent():
    rng = np.random.default_rng(0)
    x = (rng.random((8, 150, 40)) < 0.1).astype(np.float32)
    default = _stack_rates(x, stabilized=False)
    stable = _stack_rates(x, stabilized=True)
    assert default[-1] < 0.005, default                      # silent at depth 5
    assert all(0.02 < r < 0.95 for r in stable), stable       # neither silent nor saturated
    assert stable[-1] > 0.1, stable


def test_stabilizing_recurrent_initializer_moments_and_config():
    initializer = init.StabilizingRecurrent(tau=20.0, thr=0.03, n_in=40, input_mean=0.2,
                                            input_var=0.16, seed=2)
    n = 300
    alpha = math.exp(-1.0 / 20.0)
    mu = (3 - 2 * alpha) * 0.03 / ((1 - alpha) * (n - 1))
    var = (0.16 + 0.04) * (1.0 / 40) * 40 / (n - 1) - mu ** 2 / 2
    assert initializer.moments(n) == pytest.approx((mu, var), rel=1e-12)
    cell = kspike.LIF(n, thr=0.03, recurrent_initializer=initializer)
    keras.layers.RNN(cell).build((None, None, 40))
    w = cell.recurrent_kernel.numpy().astype(np.float64)
    off = w[~np.eye(n, dtype=bool)]
    assert np.all(np.diag(w) == 0)
    assert abs(off.mean() - mu) < 4 * math.sqrt(var / off.size)
    assert off.var() == pytest.approx(var, rel=0.02)
    clone = init.StabilizingRecurrent.from_config(initializer.get_config())
    assert clone.get_config() == initializer.get_config()
    restored = kspike.LIF.from_config(cell.get_config())
    assert isinstance(restored.recurrent_initializer, init.StabilizingRecurrent)
    with pytest.raises(ValueError, match="square"):
        initializer((3, 4))


def test_errors_are_clear():
    cell = kspike.LIF(10)
    with pytest.raises(ValueError, match="not built"):
        init.stabilize(cell, 0.1, 0.1)
    ff, _ = built_cell(recurrent=False)
    with pytest.raises(ValueError, match="recurrent"):
        init.stabilize(ff, 0.1, 0.1)
    with pytest.raises(TypeError, match="cell"):
        init.stabilize(keras.layers.Dense(3), 0.1, 0.1)
    rec, _ = built_cell()
    with pytest.raises(ValueError, match="input_var"):
        init.stabilize(rec, 0.1, -1.0)
    with pytest.raises(ValueError, match="n_rec"):
        init.recurrent_mean(1, 0.9, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        init.recurrent_mean(10, 1.0, 0.01)
    with pytest.raises(ValueError, match="square"):
        init.dampening(np.zeros((3, 4)), 0.9, 0.01)
    with pytest.raises(ValueError, match="no solution"):
        init.sharpness("triangular", 0.01, 0.2, 0.01, 10, 0.0)
