"""Stabilising initialisation (docs/stabilizing.md): the chosen values satisfy conditions I-IV
of Herranz-Celotti & Rouat numerically (written in the paper's units here, independently of
kspike), condition III gives the dampening the paper predicts, and a deep stack keeps firing
where the default initialisation goes silent."""
import math
import warnings

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


def np_column_sums(w):
    """Sums of the positive and of the negative entries of each column, diagonal excluded."""
    if w.shape[0] == w.shape[1]:
        w = w * (1.0 - np.eye(w.shape[0]))
    return np.where(w > 0, w, 0.0).sum(0), np.where(w < 0, w, 0.0).sum(0)


def np_bounds(w_rec, w_in, bias, alpha, thr):
    """Per-neuron stationary voltage extremes (kspike units) for inputs and spikes in [0, 1]."""
    rp, rm = np_column_sums(w_rec)
    ip, im = np_column_sums(w_in)
    return rm + im + bias - thr / (1 - alpha), rp + ip + bias


def np_residual_iv(psi, alpha, thr, n, m2, v_low, v_high, points=200001):
    """-1 + alpha^2 + ((n-1)(1-alpha)^2 m2 + thr^2) E[(psi(x)/thr)^2], x = (v - thr)/thr uniform
    over each neuron's [v_low, v_high], averaged over neurons (dense uniform quadrature)."""
    es2 = []
    for lo, hi in zip(np.atleast_1d(v_low), np.atleast_1d(v_high)):
        x = np.linspace((lo - thr) / thr, (hi - thr) / thr, points)
        es2.append(np.mean((psi(x) / thr) ** 2))
    return -1 + alpha ** 2 + ((n - 1) * (1 - alpha) ** 2 * m2 + thr ** 2) * np.mean(es2)


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


def test_condition_three_holds_in_the_papers_units():
    alpha, thr, n = 0.9, 0.05, 40
    w = np.random.default_rng(1).normal(0.01, 0.05, (n, n))          # kspike units
    gamma, s_plus, s_minus = init.dampening(w, alpha, thr)
    rp, rm = np_column_sums(w)
    np.testing.assert_allclose(s_plus, rp, rtol=1e-12)
    np.testing.assert_allclose(s_minus, rm, rtol=1e-12)
    # The paper: y_t = alpha y + W_in x + W_rec z - thr z, psi on y - thr. Its weights are
    # (1 - alpha) kspike's, its dampening kspike's / thr; condition III reads
    # gamma S+ (|S-| + thr) = (1 - alpha) |S-| with the column-averaged sums.
    paper_plus, paper_minus = np_column_sums((1 - alpha) * w)
    sp, sm = paper_plus.mean(), -paper_minus.mean()
    assert (gamma / thr) * sp * (sm + thr) == pytest.approx((1 - alpha) * sm, rel=1e-12)
    per, _, _ = init.dampening(w, alpha, thr, per_neuron=True)
    assert per.shape == (n,)
    np.testing.assert_allclose((per / thr) * paper_plus * (-paper_minus + thr),
                               (1 - alpha) * -paper_minus, rtol=1e-12)
    # The diagonal is no connection in kspike: it does not enter.
    w_diag = w.copy()
    np.fill_diagonal(w_diag, 5.0)
    assert init.dampening(w_diag, alpha, thr)[0] == gamma
    # A tensor kernel gives the same.
    assert init.dampening(tf.constant(w), alpha, thr)[0] == pytest.approx(gamma, rel=1e-12)


@pytest.mark.parametrize("n, predicted", [(128, 0.204), (256, 0.144)])
def test_condition_three_reproduces_the_papers_dampening(n, predicted):
    # Settings of the paper's public code: Glorot-uniform W_rec, thr = 0.01, tau = 0.1 ms at
    # dt = 1 ms (alpha = e^-10); 128 neurons (sequential MNIST) gives the paper's 0.204, 256
    # neurons (SHD) 0.144. Each draw moves the column means by ~1 %: four draws, +-0.003.
    values = []
    for seed in range(4):
        cell = kspike.LIF(n, tau=0.1, thr=0.01,
                          recurrent_initializer=keras.initializers.GlorotUniform(seed=seed))
        keras.layers.RNN(cell).build((None, None, 20))
        _, w_rec, _ = cell.effective_kernels(tf.float64)
        gamma, _, _ = init.dampening(w_rec, cell.alpha, cell.thr)
        values.append(gamma / cell.thr)          # the paper's units: peak of dz/dv
    assert abs(np.mean(values) - predicted) < 0.003, values
    # The expectation: E[S+] = -E[S-] = (n - 1) a / 4 for U(-a, a), a = sqrt(3 / n) (the
    # diagonal is no connection in kspike); alpha ~ 0.
    expected = (n - 1) * math.sqrt(3 / n) / 4
    assert abs(np.mean(values) - 1 / (expected + 0.01)) < 0.002, values


def test_condition_four_has_no_solution_at_the_papers_settings():
    # Same settings, exponential surrogate at the paper's default dampening 1 (thr in kspike's
    # units): Glorot weights give (n - 1) E[W_rec^2] = 1 - 1/n and E_s,2 <= gamma^2, so the
    # gradient norm stays below 1 for every sharpness (no sharpness of 1.02 can come out).
    n, thr = 128, 0.01
    cell = kspike.LIF(n, tau=0.1, thr=thr,
                      recurrent_initializer=keras.initializers.GlorotUniform(seed=0),
                      input_initializer=keras.initializers.GlorotUniform(seed=1))
    keras.layers.RNN(cell).build((None, None, 80))
    w_in, w_rec, _ = (None if k is None else k.numpy() for k in cell.effective_kernels(tf.float64))
    m2 = float(np.mean(w_rec[~np.eye(n, dtype=bool)] ** 2))
    assert (n - 1) * (1 - cell.alpha) ** 2 * m2 == pytest.approx(1 - 1 / n, rel=0.03)
    ranges = init.voltage_bounds(w_rec, w_in, cell.alpha, thr)
    with pytest.raises(ValueError, match="below 1"):
        init.sharpness("exponential", 1.0 * thr, cell.alpha, thr, n, m2, voltage_range=ranges)


def test_voltage_bounds_hold_in_an_independent_simulation():
    rng = np.random.default_rng(2)
    n, n_in, alpha, thr = 12, 7, 0.8, 0.1
    w_in = rng.normal(0, 0.4, (n_in, n))
    w_rec = rng.normal(0.02, 0.2, (n, n))
    np.fill_diagonal(w_rec, 0.0)
    bias = rng.normal(0, 0.05, n)
    x_bounds = init.voltage_bounds(w_rec, w_in, alpha, thr, bias)
    v_low, v_high = np_bounds(w_rec, w_in, bias, alpha, thr)
    np.testing.assert_allclose(thr * (1 + x_bounds[:, 0]), v_low, rtol=1e-12)
    np.testing.assert_allclose(thr * (1 + x_bounds[:, 1]), v_high, rtol=1e-12)
    # kspike's step in NumPy, inputs and spikes in {0, 1}: v never leaves the bounds.
    v, z = np.zeros(n), np.zeros(n)
    lowest, highest = np.full(n, np.inf), np.full(n, -np.inf)
    for t in range(400):
        x = (rng.random(n_in) < 0.5).astype(float)
        v = alpha * v + (1 - alpha) * (x @ w_in + z @ w_rec + bias) - thr * z
        z = (v > thr).astype(float)
        lowest, highest = np.minimum(lowest, v), np.maximum(highest, v)
    assert np.all(lowest >= v_low - 1e-12) and np.all(highest <= v_high + 1e-12)
    # The upper bound is reached: every excitatory input and presynaptic spike of neuron 0 on
    # at every step, neuron 0 itself silent.
    drive = np.sum(np.maximum(w_in[:, 0], 0)) + np.sum(np.maximum(w_rec[:, 0], 0)) + bias[0]
    v = 0.0
    for t in range(200):
        v = alpha * v + (1 - alpha) * drive
    assert v == pytest.approx(v_high[0], rel=1e-9)


def test_condition_four_solves_with_the_papers_voltage_range():
    rng = np.random.default_rng(3)
    n, n_in, alpha, thr = 20, 10, 0.9, 0.05
    w_rec = rng.normal(0.0, 0.1, (n, n))
    np.fill_diagonal(w_rec, 0.0)
    w_in = rng.normal(0.0, 1.0 / math.sqrt(n_in), (n_in, n))
    off = ~np.eye(n, dtype=bool)
    m2 = float(np.mean(w_rec[off] ** 2))
    ranges = init.voltage_bounds(w_rec, w_in, alpha, thr)
    v_low, v_high = np_bounds(w_rec, w_in, 0.0, alpha, thr)
    for name, psi in [("triangular", lambda x, g, s: np_psi_triangular(x, g, s)),
                      ("ntail", lambda x, g, s: np_psi_ntail(x, g, s, 1.56))]:
        s = init.sharpness(name, 2.0, alpha, thr, n, m2, voltage_range=ranges)
        residual = np_residual_iv(lambda x: psi(x, 2.0, s), alpha, thr, n, m2, v_low, v_high)
        assert abs(residual) < 1e-4, (name, s, residual)
        # Not the old [-1, 1] range: there this sharpness leaves the condition far from met.
        old = np_residual_iv(lambda x: psi(x, 2.0, s), alpha, thr, n, m2, 0.0, 2 * thr)
        assert old > 0.5


def test_stabilize_applies_conditions_one_to_four():
    cell, _ = built_cell(units=50, n_in=30, thr=0.03, surrogate="triangular")
    input_mean, input_var = 0.2, 0.16
    with pytest.warns(UserWarning, match="condition IV cannot be met"):
        report = init.stabilize(cell, input_mean, input_var, seed=3)
    n, alpha, thr = 50, math.exp(-1.0 / 20.0), 0.03
    w = cell.recurrent_kernel.numpy().astype(np.float64)
    w_in = cell.input_kernel.numpy().astype(np.float64)
    off = ~np.eye(n, dtype=bool)
    assert np.all(np.diag(w) == 0.0)
    # I
    mu = (3 - 2 * alpha) * thr / ((1 - alpha) * (n - 1))
    assert np.mean(w[off]) == pytest.approx(mu, rel=1e-5)
    # II
    var = (input_var + input_mean ** 2) * np.var(w_in) * 30 / (n - 1) - mu ** 2 / 2
    assert var > 0
    assert np.var(w[off]) == pytest.approx(var, rel=1e-4)
    assert report.recurrent_var == pytest.approx(var, rel=1e-9)
    # III, in the paper's units.
    gamma = cell.spike_function.dampening
    assert gamma == pytest.approx(report.dampening) and cell.dampening_factor == gamma
    plus, minus = np_column_sums((1 - alpha) * w)
    sp, sm = plus.mean(), -minus.mean()
    assert (gamma / thr) * sp * (sm + thr) == pytest.approx((1 - alpha) * sm, rel=1e-5)
    assert report.paper_dampening == pytest.approx(gamma / thr)
    # IV over the paper's per-neuron range: even the widest pseudo-derivative allowed leaves the
    # gradient norm below 1 at this dampening, so the widest is kept and the residual reported.
    s = cell.spike_function.sharpness
    assert s == pytest.approx(1e-3)
    v_low, v_high = np_bounds(w, w_in, 0.0, alpha, thr)
    residual = np_residual_iv(lambda x: np_psi_triangular(x, gamma, s), alpha, thr, n,
                              np.mean(w[off] ** 2), v_low, v_high)
    assert report.condition_iv_residual == pytest.approx(residual, abs=1e-6)
    assert residual < -0.05
    # The ceiling: psi = gamma everywhere gives the largest E_s,2 of all sharpnesses.
    ceiling = -1 + alpha ** 2 + ((n - 1) * (1 - alpha) ** 2 * np.mean(w[off] ** 2)
                                 + thr ** 2) * (gamma / thr) ** 2
    assert residual <= ceiling < 0
    assert "condition IV unmet" in str(report)
    assert cell.get_config()["surrogate"]["sharpness"] == pytest.approx(s)


def test_sharpness_on_a_fixed_range_and_ntail():
    alpha, thr = 0.9, 0.05
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*condition IV cannot be met")
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
    with pytest.raises(ValueError, match="voltage_range"):
        init.stabilize(rec, 0.1, 0.1, voltage_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="n_rec"):
        init.recurrent_mean(1, 0.9, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        init.recurrent_mean(10, 1.0, 0.01)
    with pytest.raises(ValueError, match="square"):
        init.dampening(np.zeros((3, 4)), 0.9, 0.01)
    negative = -np.abs(np.random.default_rng(1).normal(0.0, 0.05, (20, 20)))
    with pytest.raises(ValueError, match="no positive"):
        init.dampening(negative, 0.9, 0.05)
    with pytest.raises(ValueError, match="no negative"):
        init.dampening(-negative, 0.9, 0.05)
    with pytest.raises(ValueError, match="columns"):
        init.voltage_bounds(np.zeros((4, 4)), np.zeros((2, 3)), 0.9, 0.01)
    with pytest.raises(ValueError, match="no solution"):
        init.sharpness("triangular", 0.01, 0.2, 0.01, 10, 0.0)
    with pytest.raises(ValueError, match="sharpness_bounds"):
        init.sharpness("triangular", 0.5, 0.2, 0.01, 10, 0.1, sharpness_bounds=(2.0, 1.0))
