"""Stabilising initialisation of Herranz-Celotti & Rouat, "Stabilizing Spiking Neuron Training"
(REFERENCE.md section 8), in kspike's convention.

kspike's step is v_t = alpha v_{t-1} + (1 - alpha) (x_t W_in + z_{t-1} W_rec) - thr z_{t-1} with
z_t = H((v_t - thr) / thr) (LIF, and ALIF at initialisation where b = 0), so the spike's
derivative with respect to the voltage is psi(x) / thr. The paper writes the step without the
(1 - alpha) factor; its weights are (1 - alpha) times kspike's. The four conditions, as read
here:

I. Mean recurrent weight: the voltage stays at threshold on average when neurons fire with
   probability 1/2 (a neuron sitting at threshold) and the input has zero mean:
   thr = alpha thr + (1 - alpha) (n_rec - 1) mu / 2 - thr / 2, i.e. in the paper's units
   mu = (3 - 2 alpha) thr / (n_rec - 1), and in kspike's units

       mu_rec = (3 - 2 alpha) thr / ((1 - alpha) (n_rec - 1)).

II. Recurrent variance: the recurrent current's second-moment term matches the input's,

       var_rec = (input_var + input_mean^2) Var(W_in) n_in / (n_rec - 1) - mu_rec^2 / 2

   (unchanged by the (1 - alpha) convention since both kernels scale alike; clipped at 0).

III. Dampening: with S+_j and S-_j the sums of the positive and negative entries of column j of
   W_rec (the inputs of neuron j), the voltage Jacobian dv_t / dv_{t-1} has entries
   alpha delta_jk + ((1 - alpha) W_rec[k, j] - thr delta_jk) psi_k / thr. Condition I gives W_rec
   a positive mean, which makes the synchronous mode (every neuron at the same pseudo-derivative
   value) the least stable direction: with every psi at its peak gamma, a uniform perturbation
   is multiplied per step by alpha + gamma c, c = (1 - alpha) (<S+> + <S->) / thr - 1, where
   <.> averages over the columns (the mean-field value of the Jacobian's outlier eigenvalue).
   The dampening is the largest gamma keeping that factor in [-1, 1]:

       gamma = (1 - alpha) / c if c > 0, else (1 + alpha) / |c|.

   Under condition I exactly, c = 2 (1 - alpha) and gamma = 1/2; other recurrent kernels move
   it. (A worst case over single neurons instead of the column average would give dampenings
   near 1 - alpha, far below the paper's values, so the average is used.)

IV. Sharpness: the expected squared norm of a Jacobian row equals 1 (gradients neither explode
   nor vanish through time):

       -1 + alpha^2 + ((n_rec - 1) (1 - alpha)^2 E[W_rec^2] + thr^2) E_s,2 = 0,
       E_s,2 = mean over x in ``voltage_range`` of (psi_s(x) / thr)^2,

   x = (v - thr) / thr the normalised voltage (default range [-1, 1], i.e. v from 0 to 2 thr),
   solved for the sharpness s at the dampening of condition III.

With these values the paper predicts dampening ~0.2 and sharpness ~1 for its settings. Example:

>>> cell = kspike.LIF(100)
>>> layer = keras.layers.RNN(cell, return_sequences=True); layer.build((None, None, 40))
>>> report = kspike.init.stabilize(cell, input_mean=0.1, input_var=0.09)
>>> print(report)
"""
import math
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from kspike import surrogates

__all__ = ["StabilizationReport", "recurrent_mean", "recurrent_variance", "dampening",
           "sharpness", "squared_pseudo_derivative_mean", "stabilize", "stabilize_stack",
           "StabilizingRecurrent"]


def _number(name, value, positive=False, allow_zero=True):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, received {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, received {value!r}.")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {bound}, received {value!r}.")
    return value


def _alpha(alpha):
    alpha = _number("alpha", alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha` (exp(-dt / tau)) must be in [0, 1), received {alpha!r}.")
    return alpha


def _n_rec(n_rec):
    if isinstance(n_rec, bool) or not isinstance(n_rec, (int, np.integer)) or n_rec < 2:
        raise ValueError(f"`n_rec` must be an integer >= 2 (recurrent neurons), received "
                         f"{n_rec!r}.")
    return int(n_rec)


def recurrent_mean(n_rec, alpha, thr):
    """Condition I: mean recurrent weight (kspike units), (3 - 2 alpha) thr / ((1 - alpha)(n_rec - 1)).

    Args:
        n_rec: number of recurrent neurons (>= 2).
        alpha: membrane decay exp(-dt / tau) in [0, 1).
        thr: firing threshold (> 0).
    """
    n_rec, alpha = _n_rec(n_rec), _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    return (3.0 - 2.0 * alpha) * thr / ((1.0 - alpha) * (n_rec - 1))


def recurrent_variance(n_rec, n_in, input_mean, input_var, input_weight_var, mean):
    """Condition II: variance of the recurrent weights, clipped at 0.

    (input_var + input_mean^2) input_weight_var n_in / (n_rec - 1) - mean^2 / 2.

    Args:
        n_rec: recurrent neurons (>= 2). n_in: input features (>= 1).
        input_mean, input_var: mean and variance of each input feature per time step (e.g. a
            Poisson input of rate p per step: p and p (1 - p)).
        input_weight_var: Var(W_in).
        mean: the recurrent mean of condition I.
    """
    n_rec = _n_rec(n_rec)
    if isinstance(n_in, bool) or not isinstance(n_in, (int, np.integer)) or n_in < 1:
        raise ValueError(f"`n_in` must be an integer >= 1, received {n_in!r}.")
    input_mean = _number("input_mean", input_mean)
    input_var = _number("input_var", input_var, positive=True)
    input_weight_var = _number("input_weight_var", input_weight_var, positive=True)
    mean = _number("mean", mean)
    value = (input_var + input_mean ** 2) * input_weight_var * n_in / (n_rec - 1) - mean ** 2 / 2
    return max(value, 0.0)


def dampening(recurrent_kernel, alpha, thr):
    """Condition III: the largest dampening gamma keeping the synchronous mode of the voltage
    Jacobian within [-1, 1] (see the module docstring).

    Args:
        recurrent_kernel: W_rec (n, n) (rows presynaptic, columns postsynaptic), array or tensor.
        alpha: membrane decay in [0, 1). thr: threshold (> 0).

    Returns:
        (gamma, S_plus, S_minus): the dampening and the column sums (n,) of the positive and of
        the negative entries (diagonal excluded).
    """
    alpha = _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    w = np.asarray(recurrent_kernel, np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"`recurrent_kernel` must be square (n, n), received shape {w.shape}.")
    w = w * (1.0 - np.eye(w.shape[0]))
    s_plus = np.where(w > 0, w, 0.0).sum(axis=0)
    s_minus = np.where(w < 0, w, 0.0).sum(axis=0)
    c = (1.0 - alpha) * (np.mean(s_plus) + np.mean(s_minus)) / thr - 1.0
    if c == 0.0:
        raise ValueError("Condition III does not bound the dampening for this recurrent kernel "
                         "(the synchronous mode is alpha whatever gamma).")
    gamma = (1.0 - alpha) / c if c > 0 else (1.0 + alpha) / -c
    return float(gamma), s_plus, s_minus


def squared_pseudo_derivative_mean(spike_function, voltage_range=(-1.0, 1.0), points=20001):
    """mean over x in ``voltage_range`` of psi(x)^2 (trapezoid rule on ``points`` points)."""
    low, high = (float(v) for v in voltage_range)
    if not low < high:
        raise ValueError(f"`voltage_range` must be (low, high) with low < high, received "
                         f"{voltage_range!r}.")
    x = np.linspace(low, high, int(points))
    psi = np.asarray(spike_function.pseudo_derivative(tf.constant(x, tf.float64)), np.float64)
    # np.trapezoid is NumPy >= 2; NumPy 1.x (TensorFlow 2.16) only has np.trapz.
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(trapezoid(psi * psi, x) / (high - low))


def _family(spike_function, gamma, s):
    config = dict(spike_function.get_config())
    config.update(dampening=gamma, sharpness=s)
    return surrogates.get(config)


def sharpness(surrogate, dampening_factor, alpha, thr, n_rec, recurrent_second_moment,
              voltage_range=(-1.0, 1.0)):
    """Condition IV: the sharpness s solving
    -1 + alpha^2 + ((n_rec - 1)(1 - alpha)^2 E[W_rec^2] + thr^2) E_s,2 = 0.

    Args:
        surrogate: a name or ``SpikeFunction`` (its family and tail are kept).
        dampening_factor: gamma (e.g. from condition III).
        alpha, thr, n_rec: the cell's decay, threshold and size.
        recurrent_second_moment: E[W_rec^2] over the off-diagonal entries (kspike units).
        voltage_range: range of the normalised voltage x = (v - thr) / thr for E_s,2.

    Raises:
        ValueError: no sharpness satisfies the condition (the message says which way).
    """
    alpha = _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    gamma = _number("dampening_factor", dampening_factor, positive=True, allow_zero=False)
    n_rec = _n_rec(n_rec)
    m2 = _number("recurrent_second_moment", recurrent_second_moment, positive=True)
    base = surrogates.get(surrogate) if not isinstance(
        surrogate, surrogates.SpikeFunction) else surrogate
    coefficient = (n_rec - 1) * (1.0 - alpha) ** 2 * m2 + thr ** 2

    def residual(log_s):
        f = _family(base, gamma, math.exp(log_s))
        es2 = squared_pseudo_derivative_mean(f, voltage_range) / thr ** 2
        return -1.0 + alpha ** 2 + coefficient * es2

    low, high = math.log(1e-3), math.log(1e3)
    r_low, r_high = residual(low), residual(high)
    if r_low < 0:
        raise ValueError(
            f"Condition IV has no solution: even the widest {base.name!r} pseudo-derivative "
            f"with dampening {gamma:.4g} leaves the gradient norm below 1 (residual "
            f"{r_low:.3g}); increase the dampening or the recurrent weights.")
    if r_high > 0:
        raise ValueError(f"Condition IV has no solution: even the sharpest {base.name!r} "
                         f"pseudo-derivative leaves the gradient norm above 1 (residual "
                         f"{r_high:.3g}); lower the dampening.")
    for _ in range(80):       # bisection on log s; E_s,2 decreases as s grows
        mid = 0.5 * (low + high)
        if residual(mid) > 0:
            low = mid
        else:
            high = mid
    return math.exp(0.5 * (low + high))


@keras.saving.register_keras_serializable(package="kspike")
class StabilizingRecurrent(keras.initializers.Initializer):
    """Recurrent-kernel initialiser: N(mu_rec, var_rec) of conditions I and II, zero diagonal.

    Use it as ``recurrent_initializer`` of a cell with the same tau, thr and dt; n_rec is read
    from the kernel's shape. (``stabilize`` additionally fixes the sample moments exactly and
    sets the surrogate of conditions III-IV.)

    Args:
        tau: membrane time constant in ms. thr: threshold. dt: time step in ms.
        n_in: input features of the cell.
        input_mean, input_var: statistics of each input feature per time step.
        input_weight_var: Var(W_in); default 1 / n_in (kspike's N(0, 1) / sqrt(fan_in)).
        seed: integer seed.

    Example:

    >>> init = kspike.init.StabilizingRecurrent(tau=20.0, thr=0.03, n_in=40, input_mean=0.1,
    ...                                         input_var=0.09)
    >>> cell = kspike.LIF(100, thr=0.03, recurrent_initializer=init)
    """

    def __init__(self, tau=20.0, thr=0.03, dt=1.0, n_in=1, input_mean=0.0, input_var=1.0,
                 input_weight_var=None, seed=None):
        self.tau = _number("tau", tau, positive=True, allow_zero=False)
        self.thr = _number("thr", thr, positive=True, allow_zero=False)
        self.dt = _number("dt", dt, positive=True, allow_zero=False)
        if isinstance(n_in, bool) or not isinstance(n_in, (int, np.integer)) or n_in < 1:
            raise ValueError(f"`n_in` must be an integer >= 1, received {n_in!r}.")
        self.n_in = int(n_in)
        self.input_mean = _number("input_mean", input_mean)
        self.input_var = _number("input_var", input_var, positive=True)
        self.input_weight_var = (1.0 / self.n_in if input_weight_var is None else
                                 _number("input_weight_var", input_weight_var, positive=True))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"`seed` must be an integer or None, received {seed!r}.")
        self.seed = seed

    def moments(self, n_rec):
        """(mean, variance) of conditions I and II for ``n_rec`` neurons."""
        alpha = math.exp(-self.dt / self.tau)
        mu = recurrent_mean(n_rec, alpha, self.thr)
        return mu, recurrent_variance(n_rec, self.n_in, self.input_mean, self.input_var,
                                      self.input_weight_var, mu)

    def __call__(self, shape, dtype=None):
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"StabilizingRecurrent initialises square (n, n) kernels, "
                             f"received shape {tuple(shape)}.")
        mu, var = self.moments(int(shape[0]))
        dtype = dtype or "float32"
        w = keras.random.normal(shape, mean=mu, stddev=math.sqrt(var), dtype=dtype,
                                seed=self.seed)
        return w * tf.cast(1.0 - tf.eye(shape[0]), w.dtype)

    def get_config(self):
        return {"tau": self.tau, "thr": self.thr, "dt": self.dt, "n_in": self.n_in,
                "input_mean": self.input_mean, "input_var": self.input_var,
                "input_weight_var": self.input_weight_var, "seed": self.seed}


class StabilizationReport(NamedTuple):
    """Values chosen by ``stabilize`` (kspike units)."""
    recurrent_mean: float
    recurrent_var: float
    recurrent_second_moment: float
    dampening: float
    sharpness: float
    alpha: float
    thr: float
    n_rec: int
    n_in: int
    input_weight_var: float

    def __str__(self):
        return ("kspike.init.stabilize: condition I mean(W_rec) = {:.5g}, condition II "
                "var(W_rec) = {:.5g}, condition III dampening = {:.4g}, condition IV sharpness "
                "= {:.4g} (alpha = {:.4g}, thr = {:.4g}, n_rec = {}, n_in = {}, Var(W_in) = "
                "{:.4g})").format(self.recurrent_mean, self.recurrent_var, self.dampening,
                                  self.sharpness, self.alpha, self.thr, self.n_rec, self.n_in,
                                  self.input_weight_var)


def stabilize(cell, input_mean, input_var, voltage_range=(-1.0, 1.0), seed=None, verbose=False):
    """Apply conditions I-IV to a built recurrent kspike cell before training.

    Draws the recurrent kernel with mean (I) and variance (II) exactly (the off-diagonal sample
    is standardised, the diagonal is 0), then sets the cell's surrogate (same family, e.g. its
    tail) to the dampening of III and the sharpness of IV. The input kernel is left as is (its
    variance enters II). For ALIF cells the conditions use the baseline threshold thr (b = 0 at
    initialisation).

    Conditions I-II are stationary conditions: they hold the mean voltage at threshold for a
    firing probability of 1/2 but do not ignite a silent network; the input must make some
    neurons fire. In a stack, a layer fed by a stabilised layer sees spikes of probability 1/2
    per step (``stabilize_stack`` passes input_mean=0.5, input_var=0.25 to those layers).

    Args:
        cell: a built ``kspike.LIF``/``kspike.ALIF`` with ``recurrent=True`` and dense kernels
            (build it by calling its layer once or ``layer.build(input_shape)``).
        input_mean: mean of each input feature per time step (spike probability per step for
            spiking inputs).
        input_var: variance of each input feature per time step (>= 0).
        voltage_range: normalised-voltage range of condition IV.
        seed: seed of the recurrent draw.
        verbose: print the report.

    Returns:
        ``StabilizationReport`` of the values chosen.
    """
    from kspike.cells import _SpikingCell
    if not isinstance(cell, _SpikingCell):
        cell = getattr(cell, "cell", cell)
    if not isinstance(cell, _SpikingCell):
        raise TypeError(f"`cell` must be a kspike LIF/ALIF cell (or an RNN layer wrapping one), "
                        f"received {cell!r}.")
    if not cell.built:
        raise ValueError(f"The cell {cell.name!r} is not built; build its layer first, e.g. "
                         "layer.build((None, None, n_in)).")
    if not cell.recurrent:
        raise ValueError("stabilize needs a recurrent cell (conditions I-IV concern W_rec); "
                         f"received {cell.name!r} built with recurrent=False.")
    if cell._rewired:
        raise ValueError("stabilize does not support sparse rewired kernels (connectivity/dale).")
    input_mean = _number("input_mean", input_mean)
    input_var = _number("input_var", input_var, positive=True)
    n_rec, n_in, alpha, thr = cell.units, cell.input_dim, cell.alpha, cell.thr
    w_in = cell.input_kernel.numpy().astype(np.float64)
    input_weight_var = float(np.var(w_in))
    mu = recurrent_mean(n_rec, alpha, thr)
    var = recurrent_variance(n_rec, n_in, input_mean, input_var, input_weight_var, mu)
    rng = np.random.default_rng(seed)
    off = ~np.eye(n_rec, dtype=bool)
    sample = rng.standard_normal(off.sum())
    sample = (sample - sample.mean()) / sample.std()
    w = np.zeros((n_rec, n_rec))
    w[off] = mu + math.sqrt(var) * sample
    cell.recurrent_kernel.assign(w.astype(cell.recurrent_kernel.dtype))
    gamma, _, _ = dampening(w, alpha, thr)
    second = float(np.mean(w[off] ** 2))
    s = sharpness(cell.spike_function, gamma, alpha, thr, n_rec, second, voltage_range)
    cell.spike_function = _family(cell.spike_function, gamma, s)
    cell.dampening_factor = gamma
    report = StabilizationReport(recurrent_mean=mu, recurrent_var=var,
                                 recurrent_second_moment=second, dampening=gamma, sharpness=s,
                                 alpha=alpha, thr=thr, n_rec=n_rec, n_in=n_in,
                                 input_weight_var=input_weight_var)
    if verbose:
        print(report)
    return report


def stabilize_stack(cells, input_mean, input_var, voltage_range=(-1.0, 1.0), seed=None,
                    verbose=False):
    """``stabilize`` every cell of a stack of recurrent layers, first to last.

    The first cell gets the statistics of the network input; each following cell gets those of
    spikes of probability 1/2 per step (mean 0.5, variance 0.25), the rate condition I targets.

    Args:
        cells: built kspike cells or RNN layers wrapping them, input side first.
        input_mean, input_var: statistics of the network input per feature and step.
        seed: seed of the first draw (cell i uses seed + i); None for fresh randomness.

    Returns:
        list of ``StabilizationReport``.
    """
    reports = []
    mean, var = input_mean, input_var
    for i, cell in enumerate(cells):
        reports.append(stabilize(cell, mean, var, voltage_range=voltage_range,
                                 seed=None if seed is None else seed + i, verbose=verbose))
        mean, var = 0.5, 0.25
    return reports
