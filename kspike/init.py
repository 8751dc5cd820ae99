"""Stabilising initialisation of Herranz-Celotti & Rouat, "Stabilizing Spiking Neuron Training"
(arXiv 2202.00282; docs/stabilizing.md), in kspike's convention.

kspike's step is v_t = alpha v_{t-1} + (1 - alpha) (x_t W_in + z_{t-1} W_rec) - thr z_{t-1} with
z_t = H((v_t - thr) / thr) (LIF, and ALIF at initialisation where b = 0), so the spike's
derivative with respect to the voltage is psi(x) / thr. The paper writes the step without the
(1 - alpha) factor, y_t = alpha y_{t-1} + W_in x_t + W_rec z_{t-1} - thr z_{t-1}, and its
pseudo-derivative on v - thr instead of (v - thr) / thr: its weights are (1 - alpha) times
kspike's, its dampening and sharpness are kspike's divided by thr (``StabilizationReport``
gives both). The voltages are the same. S+_j and S-_j below are the sums of the positive and of
the negative entries of column j of W_rec (the recurrent inputs of neuron j, diagonal excluded),
in kspike units; <.> is the average over the columns.

I. Mean recurrent weight: the mean voltage sits at threshold when neurons fire with probability
   1/2 and the input has zero mean: thr = alpha thr + (1 - alpha) (n_rec - 1) mu / 2 - thr / 2,
   i.e. in the paper's units mu = (3 - 2 alpha) thr / (n_rec - 1), and in kspike's units

       mu_rec = (3 - 2 alpha) thr / ((1 - alpha) (n_rec - 1)).

II. Recurrent variance: the recurrent current's second-moment term matches the input's,

       var_rec = (input_var + input_mean^2) Var(W_in) n_in / (n_rec - 1) - mu_rec^2 / 2

   (unchanged by the (1 - alpha) convention since both kernels scale alike; clipped at 0).
   A layer fed by a spiking layer uses input_mean = 1/2, input_var = 1/4.

III. Dampening (as the paper's public code, github.com/LuCeHe/stable_spike, computes it). In
   the paper's units the dampening (peak of dz/dv) is
   gamma = (1 - alpha) |S-| / (S+ (|S-| + thr)), i.e. gamma S+ (|S-| + thr) = (1 - alpha) |S-|:
   gamma times the largest stationary voltage a neuron reaches when all its excitatory inputs
   fire every step, S+ / (1 - alpha), equals |S-| / (|S-| + thr). In kspike's units (weights
   divided by 1 - alpha, dampening multiplied by thr):

       gamma = thr (1 - alpha) |<S->| / (<S+> ((1 - alpha) |<S->| + thr)).

   ``dampening(..., per_neuron=True)`` gives the value of each column instead of the one of the
   averaged sums; the two differ by the spread of the column sums (about 1.5 % for 128 neurons
   with Glorot-uniform weights). The condition needs excitatory and inhibitory recurrent
   weights (no S+: unbounded; no S-: zero dampening).

IV. Sharpness: the expected squared norm of a row of the voltage Jacobian
   dv_t / dv_{t-1} = alpha 1 + ((1 - alpha) W_rec - thr 1) diag(psi / thr) equals 1:

       -1 + alpha^2 + ((n_rec - 1) (1 - alpha)^2 E[W_rec^2] + thr^2) E_s,2 = 0,
       E_s,2 = E[(psi_s(x) / thr)^2],

   solved for the sharpness s at the dampening of condition III. The expectation is over the
   voltage taken uniform, for each neuron j, between the extremes the inputs allow (spiking
   inputs in [0, 1], see ``voltage_bounds``; the range of the paper's public code):

       v_max_j = S+_j + S+in_j + bias_j,   v_min_j = S-_j + S-in_j + bias_j - thr / (1 - alpha)

   (S+in_j, S-in_j: the same sums over column j of W_in), i.e. the paper's
   [(S- + S-in - thr) / (1 - alpha), (S+ + S+in) / (1 - alpha)] in its units, and averaged
   over the neurons. For typical kernels the dampening of III is too small for any sharpness
   to bring the gradient norm up to 1 (E_s,2 <= gamma^2 / thr^2); ``stabilize`` then keeps the
   sharpness closest to the condition within ``sharpness_bounds`` (the widest pseudo-derivative)
   and warns, as a bounded search does.

Values: with the settings of the paper's public code for sequential MNIST (128 recurrent
neurons, Glorot-uniform W_rec, thr = 0.01, tau = 0.1 ms at dt = 1 ms so alpha ~ 0) condition III
gives a dampening of 0.205 on average over draws in the paper's units (0.00205 in kspike's;
0.204 when the unused diagonal entries are summed too, as that code does), the 0.204 the paper
predicts; with 256 neurons (the SHD setting of that code) the same formula gives 0.144. With
these Glorot weights (n_rec - 1) E[W_rec^2] = 1 - 1/n_rec, so condition IV has no solution for
alpha ~ 0 even at dampening 1.

Example:

>>> import warnings, keras, kspike
>>> cell = kspike.LIF(100, seed=0)
>>> layer = keras.layers.RNN(cell, return_sequences=True); layer.build((None, None, 40))
>>> with warnings.catch_warnings():       # condition IV cannot be met here (see above)
...     warnings.simplefilter("ignore")
...     report = kspike.init.stabilize(cell, input_mean=0.1, input_var=0.09)
>>> print(report)  # doctest: +ELLIPSIS
kspike.init.stabilize: condition I mean(W_rec) = 0.0068194, condition II var(W_rec) = 0.000975...,
condition III dampening = 0.011... [condition IV unmet, residual -0.095] (alpha = 0.9512, ...)
>>> round(report.recurrent_mean, 7) == round(kspike.init.recurrent_mean(100, cell.alpha, 0.03), 7)
True
"""
import math
import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from kspike import graph, surrogates

__all__ = ["StabilizationReport", "recurrent_mean", "recurrent_variance", "dampening",
           "sharpness", "squared_pseudo_derivative_mean", "voltage_bounds", "stabilize",
           "stabilize_stack", "StabilizingRecurrent"]


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


def _column_sums(kernel, name, square):
    w = np.asarray(kernel, np.float64)
    if square:
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise ValueError(f"`{name}` must be square (n, n), received shape {w.shape}.")
        w = w * (1.0 - np.eye(w.shape[0]))
    elif w.ndim != 2:
        raise ValueError(f"`{name}` must be a matrix (n_in, n), received shape {w.shape}.")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"`{name}` has non-finite entries.")
    return np.where(w > 0, w, 0.0).sum(axis=0), np.where(w < 0, w, 0.0).sum(axis=0)


def dampening(recurrent_kernel, alpha, thr, per_neuron=False):
    """Condition III: the dampening (kspike units, peak of psi over x = (v - thr) / thr)

        gamma = thr (1 - alpha) |<S->| / (<S+> ((1 - alpha) |<S->| + thr)),

    i.e. the paper's gamma S+ (|S-| + thr) = (1 - alpha) |S-| in its units (module docstring).

    Args:
        recurrent_kernel: W_rec (n, n) (rows presynaptic, columns postsynaptic), array or tensor,
            kspike units; the diagonal is ignored (kspike cells keep it at 0).
        alpha: membrane decay in [0, 1). thr: threshold (> 0).
        per_neuron: return the (n,) values of the columns (S+_j, S-_j each) instead of the value
            of the column-averaged sums; a column without positive entries gives inf, one
            without negative entries 0.

    Returns:
        (gamma, S_plus, S_minus): the dampening (a float, or (n,) with ``per_neuron``) and the
        column sums (n,) of the positive and of the negative entries (S_minus <= 0).

    Raises:
        ValueError: no excitatory weights (the condition does not bound gamma) or no inhibitory
            weights (it gives gamma = 0).
    """
    alpha = _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    s_plus, s_minus = _column_sums(recurrent_kernel, "recurrent_kernel", square=True)
    plus, minus = (s_plus, -s_minus) if per_neuron else (np.mean(s_plus), -np.mean(s_minus))
    if np.all(plus == 0.0):
        raise ValueError("Condition III does not bound the dampening: the recurrent kernel has "
                         "no positive (excitatory) entries.")
    if np.all(minus == 0.0):
        raise ValueError("Condition III gives a zero dampening: the recurrent kernel has no "
                         "negative (inhibitory) entries; draw W_rec with a variance (condition "
                         "II) or set the dampening yourself.")
    with np.errstate(divide="ignore"):
        gamma = thr * (1.0 - alpha) * minus / (plus * ((1.0 - alpha) * minus + thr))
    return (gamma if per_neuron else float(gamma)), s_plus, s_minus


def voltage_bounds(recurrent_kernel, input_kernel, alpha, thr, bias=None):
    """Per-neuron voltage range of condition IV, as normalised voltages x = (v - thr) / thr.

    The stationary extremes of v when every input and recurrent spike (values in [0, 1]) with a
    positive weight fires at every step and the neuron itself stays silent, or every one with a
    negative weight fires and the neuron itself too: v_max_j = S+_j + S+in_j + bias_j and v_min_j = S-_j + S-in_j + bias_j
    - thr / (1 - alpha) (kspike units; S+in_j, S-in_j the sums over column j of W_in).

    Args:
        recurrent_kernel: W_rec (n, n), or None for a layer without recurrence.
        input_kernel: W_in (n_in, n).
        alpha: membrane decay in [0, 1). thr: threshold (> 0).
        bias: (n,) or None.

    Returns:
        (n, 2) array of [x_min_j, x_max_j].
    """
    alpha = _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    in_plus, in_minus = _column_sums(input_kernel, "input_kernel", square=False)
    rec_plus = rec_minus = 0.0
    if recurrent_kernel is not None:
        rec_plus, rec_minus = _column_sums(recurrent_kernel, "recurrent_kernel", square=True)
        if np.shape(rec_plus) != np.shape(in_plus):
            raise ValueError(f"`recurrent_kernel` has {np.size(rec_plus)} columns but "
                             f"`input_kernel` has {np.size(in_plus)}.")
    offset = 0.0 if bias is None else np.asarray(bias, np.float64).reshape(-1)
    v_max = rec_plus + in_plus + offset
    v_min = rec_minus + in_minus + offset - thr / (1.0 - alpha)
    return np.stack([(v_min - thr) / thr, (v_max - thr) / thr], axis=-1)


def _ranges(voltage_range):
    ranges = np.asarray(voltage_range, np.float64)
    if ranges.ndim == 1:
        ranges = ranges[None]
    if (ranges.ndim != 2 or ranges.shape[1] != 2 or ranges.shape[0] == 0
            or not np.all(np.isfinite(ranges)) or np.any(ranges[:, 0] >= ranges[:, 1])):
        raise ValueError(f"`voltage_range` must be (low, high) with low < high, or an (n, 2) "
                         f"array of such rows, received {voltage_range!r}.")
    return ranges


def squared_pseudo_derivative_mean(spike_function, voltage_range=(-1.0, 1.0), points=20001):
    """Mean of psi(x)^2 over x uniform in ``voltage_range``: a (low, high) pair, or an (n, 2)
    array of per-neuron ranges whose means are averaged.

    One cumulative trapezoid integral on ``points`` nodes spaced as sinh (dense where psi
    varies, |s x| small; sparse in the tails), read at the ends of each range.
    """
    ranges = _ranges(voltage_range)
    low, high = ranges[:, 0].min(), ranges[:, 1].max()
    s = float(spike_function.sharpness)
    u = np.linspace(np.arcsinh(s * low), np.arcsinh(s * high), int(points))
    x = np.sinh(u) / s
    x[0], x[-1] = low, high
    psi = np.asarray(spike_function.pseudo_derivative(tf.constant(x, tf.float64)), np.float64)
    square = psi * psi
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (square[1:] + square[:-1]) * np.diff(x))])
    means = ((np.interp(ranges[:, 1], x, integral) - np.interp(ranges[:, 0], x, integral))
             / (ranges[:, 1] - ranges[:, 0]))
    return float(np.mean(means))


def _family(spike_function, gamma, s):
    config = dict(spike_function.get_config())
    config.update(dampening=gamma, sharpness=s)
    return surrogates.get(config)


def _solve_sharpness(surrogate, dampening_factor, alpha, thr, n_rec, recurrent_second_moment,
                     voltage_range, sharpness_bounds):
    """(s, residual, solved): the root of condition IV in ``sharpness_bounds``, or the bound
    with the smallest |residual| when there is none."""
    alpha = _alpha(alpha)
    thr = _number("thr", thr, positive=True, allow_zero=False)
    gamma = _number("dampening_factor", dampening_factor, positive=True, allow_zero=False)
    n_rec = _n_rec(n_rec)
    m2 = _number("recurrent_second_moment", recurrent_second_moment, positive=True)
    ranges = _ranges(voltage_range)
    try:
        s_low, s_high = (float(b) for b in sharpness_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"`sharpness_bounds` must be (low, high), received "
                         f"{sharpness_bounds!r}.") from None
    if not 0.0 < s_low < s_high < math.inf:
        raise ValueError(f"`sharpness_bounds` must be (low, high) with 0 < low < high, received "
                         f"{sharpness_bounds!r}.")
    base = surrogates.get(surrogate) if not isinstance(
        surrogate, surrogates.SpikeFunction) else surrogate
    coefficient = (n_rec - 1) * (1.0 - alpha) ** 2 * m2 + thr ** 2

    def residual(log_s):
        f = _family(base, gamma, math.exp(log_s))
        es2 = squared_pseudo_derivative_mean(f, ranges) / thr ** 2
        return -1.0 + alpha ** 2 + coefficient * es2

    low, high = math.log(s_low), math.log(s_high)
    r_low, r_high = residual(low), residual(high)
    if r_low < 0:       # E_s,2 only decreases as s grows: the widest psi is the closest
        return s_low, r_low, False
    if r_high > 0:
        return s_high, r_high, False
    for _ in range(80):       # bisection on log s
        mid = 0.5 * (low + high)
        if residual(mid) > 0:
            low = mid
        else:
            high = mid
    s = math.exp(0.5 * (low + high))
    return s, residual(math.log(s)), True


def sharpness(surrogate, dampening_factor, alpha, thr, n_rec, recurrent_second_moment,
              voltage_range=(-1.0, 1.0), sharpness_bounds=(1e-3, 1e3)):
    """Condition IV: the sharpness s solving
    -1 + alpha^2 + ((n_rec - 1)(1 - alpha)^2 E[W_rec^2] + thr^2) E_s,2 = 0.

    Args:
        surrogate: a name or ``SpikeFunction`` (its family and tail are kept).
        dampening_factor: gamma (kspike units, e.g. from condition III).
        alpha, thr, n_rec: the cell's decay, threshold and size.
        recurrent_second_moment: E[W_rec^2] over the off-diagonal entries (kspike units).
        voltage_range: normalised voltages x = (v - thr) / thr over which E_s,2 averages: a
            (low, high) pair or the (n, 2) per-neuron ranges of ``voltage_bounds`` (the
            paper's range).
        sharpness_bounds: (low, high) interval searched for s.

    Raises:
        ValueError: no sharpness in ``sharpness_bounds`` satisfies the condition (the message
            says which way).
    """
    s, r, solved = _solve_sharpness(surrogate, dampening_factor, alpha, thr, n_rec,
                                    recurrent_second_moment, voltage_range, sharpness_bounds)
    if solved:
        return s
    name = surrogate if isinstance(surrogate, str) else getattr(surrogate, "name", surrogate)
    if r < 0:
        raise ValueError(
            f"Condition IV has no solution: even the widest {name!r} pseudo-derivative "
            f"(sharpness {s:.3g}) with dampening {float(dampening_factor):.4g} leaves the "
            f"gradient norm below 1 (residual {r:.3g}); increase the dampening or the recurrent "
            "weights.")
    raise ValueError(f"Condition IV has no solution: even the sharpest {name!r} "
                     f"pseudo-derivative (sharpness {s:.3g}) leaves the gradient norm above 1 "
                     f"(residual {r:.3g}); lower the dampening.")


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

    >>> import keras, kspike
    >>> init = kspike.init.StabilizingRecurrent(tau=20.0, thr=0.03, n_in=40, input_mean=0.1,
    ...                                         input_var=0.09, seed=0)
    >>> cell = kspike.LIF(100, thr=0.03, recurrent_initializer=init)
    >>> keras.layers.RNN(cell).build((None, None, 40))
    >>> print(f"{float(keras.ops.mean(cell.recurrent_kernel)):.4f}")   # condition I: 0.0068
    0.00...
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
    """Values chosen by ``stabilize`` (kspike units).

    ``condition_iv_residual`` is -1 + alpha^2 + (...) E_s,2 at the chosen sharpness: 0 when
    condition IV holds, negative when even the widest pseudo-derivative leaves the gradient
    norm below 1. ``paper_dampening`` and ``paper_sharpness`` give the surrogate in the paper's
    units (written on v - thr instead of (v - thr) / thr: kspike's values divided by thr).
    """
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
    condition_iv_residual: float = 0.0

    @property
    def paper_dampening(self):
        """Peak of dz/dv (1 / voltage unit): ``dampening / thr``."""
        return self.dampening / self.thr

    @property
    def paper_sharpness(self):
        """Sharpness on v - thr: ``sharpness / thr``."""
        return self.sharpness / self.thr

    def __str__(self):
        met = ("" if self.condition_iv_residual == 0.0 else
               f" [condition IV unmet, residual {self.condition_iv_residual:.3g}]")
        return ("kspike.init.stabilize: condition I mean(W_rec) = {:.5g}, condition II "
                "var(W_rec) = {:.5g}, condition III dampening = {:.4g} ({:.4g} on v - thr), "
                "condition IV sharpness = {:.4g} ({:.4g} on v - thr){} (alpha = {:.4g}, thr = "
                "{:.4g}, n_rec = {}, n_in = {}, Var(W_in) = {:.4g})").format(
                    self.recurrent_mean, self.recurrent_var, self.dampening,
                    self.paper_dampening, self.sharpness, self.paper_sharpness, met, self.alpha,
                    self.thr, self.n_rec, self.n_in, self.input_weight_var)


def _stabilizable_cell(cell):
    """The kspike cell of ``cell`` (a cell or an RNN layer wrapping one), checked for
    ``stabilize``: built, recurrent, with dense kernels."""
    found = graph.spiking_cell_of(cell)
    if found is None:
        raise TypeError(f"`cell` must be a kspike LIF/ALIF cell (or an RNN layer wrapping one), "
                        f"received {cell!r}.")
    cell = found
    if not cell.built:
        raise ValueError(f"The cell {cell.name!r} is not built; build its layer first, e.g. "
                         "layer.build((None, None, n_in)).")
    if not cell.recurrent:
        raise ValueError("stabilize needs a recurrent cell (conditions I-IV concern W_rec); "
                         f"received {cell.name!r} built with recurrent=False.")
    if cell.rewired:
        raise ValueError("stabilize does not support sparse rewired kernels (connectivity/dale).")
    return cell


def _recurrent_draw(n_rec, mean, variance, seed):
    """(n_rec, n_rec) float64 recurrent kernel with a zero diagonal whose off-diagonal entries
    have exactly ``mean`` and ``variance`` (a standardised normal sample); also returns the
    off-diagonal bool mask."""
    rng = np.random.default_rng(seed)
    off = ~np.eye(n_rec, dtype=bool)
    sample = rng.standard_normal(off.sum())
    sample = (sample - sample.mean()) / sample.std()
    w = np.zeros((n_rec, n_rec))
    w[off] = mean + math.sqrt(variance) * sample
    return w, off


def stabilize(cell, input_mean, input_var, voltage_range=None, seed=None, verbose=False,
              sharpness_bounds=(1e-3, 1e3)):
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

    When no sharpness in ``sharpness_bounds`` satisfies condition IV (typical at the dampening
    of III, see the module docstring), the bound closest to it is kept, a ``UserWarning`` says
    so and the report's ``condition_iv_residual`` is nonzero.

    Args:
        cell: a built ``kspike.LIF``/``kspike.ALIF`` with ``recurrent=True`` and dense kernels
            (build it by calling its layer once or ``layer.build(input_shape)``).
        input_mean: mean of each input feature per time step (spike probability per step for
            spiking inputs).
        input_var: variance of each input feature per time step (>= 0).
        voltage_range: normalised voltages x = (v - thr) / thr over which condition IV
            averages; None (default) for the paper's per-neuron range (``voltage_bounds`` of
            the new kernels, inputs in [0, 1]), or a (low, high) pair.
        seed: seed of the recurrent draw.
        verbose: print the report.
        sharpness_bounds: (low, high) interval searched for the sharpness (kspike units).

    Returns:
        ``StabilizationReport`` of the values chosen.
    """
    cell = _stabilizable_cell(cell)
    input_mean = _number("input_mean", input_mean)
    input_var = _number("input_var", input_var, positive=True)
    if voltage_range is not None:
        voltage_range = _ranges(voltage_range)
    n_rec, n_in, alpha, thr = cell.units, cell.input_dim, cell.alpha, cell.thr
    w_in = cell.input_kernel.numpy().astype(np.float64)
    input_weight_var = float(np.var(w_in))
    mu = recurrent_mean(n_rec, alpha, thr)
    var = recurrent_variance(n_rec, n_in, input_mean, input_var, input_weight_var, mu)
    w, off = _recurrent_draw(n_rec, mu, var, seed)
    gamma, _, _ = dampening(w, alpha, thr)      # before any assignment: may raise
    if voltage_range is None:
        bias = None if cell.bias is None else cell.bias.numpy()
        voltage_range = voltage_bounds(w, w_in, alpha, thr, bias)
    second = float(np.mean(w[off] ** 2))
    s, residual, solved = _solve_sharpness(cell.spike_function, gamma, alpha, thr, n_rec, second,
                                           voltage_range, sharpness_bounds)
    if not solved:
        warnings.warn(
            f"kspike.init.stabilize: condition IV cannot be met for {cell.name!r} at the "
            f"condition III dampening {gamma:.4g}: the gradient norm stays "
            f"{'below' if residual < 0 else 'above'} 1 for every sharpness in "
            f"{tuple(sharpness_bounds)}; kept the closest, {s:.4g} (residual {residual:.3g}).",
            UserWarning, stacklevel=2)
    cell.recurrent_kernel.assign(w.astype(cell.recurrent_kernel.dtype))
    cell.spike_function = _family(cell.spike_function, gamma, s)
    cell.dampening_factor = gamma
    report = StabilizationReport(recurrent_mean=mu, recurrent_var=var,
                                 recurrent_second_moment=second, dampening=gamma, sharpness=s,
                                 alpha=alpha, thr=thr, n_rec=n_rec, n_in=n_in,
                                 input_weight_var=input_weight_var,
                                 condition_iv_residual=0.0 if solved else residual)
    if verbose:
        print(report)
    return report


def stabilize_stack(cells, input_mean, input_var, voltage_range=None, seed=None, verbose=False,
                    sharpness_bounds=(1e-3, 1e3)):
    """``stabilize`` every cell of a stack of recurrent layers, first to last.

    The first cell gets the statistics of the network input; each following cell gets those of
    spikes of probability 1/2 per step (mean 0.5, variance 0.25), the rate condition I targets.

    Args:
        cells: built kspike cells or RNN layers wrapping them, input side first.
        input_mean, input_var: statistics of the network input per feature and step.
        voltage_range, verbose, sharpness_bounds: as in ``stabilize``.
        seed: seed of the first draw (cell i uses seed + i); None for fresh randomness.

    Returns:
        list of ``StabilizationReport``.
    """
    reports = []
    mean, var = input_mean, input_var
    for i, cell in enumerate(cells):
        reports.append(stabilize(cell, mean, var, voltage_range=voltage_range,
                                 seed=None if seed is None else seed + i, verbose=verbose,
                                 sharpness_bounds=sharpness_bounds))
        mean, var = 0.5, 0.25
    return reports
