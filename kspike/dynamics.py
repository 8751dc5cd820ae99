"""Pure step functions of the LIF and ALIF neuron (REFERENCE.md section 1).

These functions are the one definition of kspike's neuron dynamics: the Keras cells, the fast
sequence engine, the learning rules and the tests call them. They hold no state of their own and
work on plain tensors; shapes below use B for the batch and n for the number of neurons.

One step of an ALIF layer, in this order::

    I_t = x_t W_in + z_{t-1} W_rec + bias
    b_t = rho * b_{t-1} + (1 - rho) * z_{t-1}
    A_t = thr + beta * b_t
    v_t = alpha * v_{t-1} + (1 - alpha) * I_t - A_t * z_{t-1}      (reset by subtraction)
    z_t = H((v_t - A_t) / A_t), forced to 0 while refractory

with alpha = exp(-dt / tau) and rho = exp(-dt / tau_adaptation). A neuron that spiked at step t'
cannot spike at steps t'+1 .. t'+n_refractory. LIF is the same step with beta = 0 and no b.
"""
import math
from typing import NamedTuple, Optional

import tensorflow as tf


class NeuronParameters(NamedTuple):
    """Constants of one layer's step.

    Attributes:
        alpha: membrane decay exp(-dt / tau), a float.
        rho: threshold-adaptation decay exp(-dt / tau_adaptation), a float (unused by LIF).
        thr: baseline threshold, a float > 0.
        beta: adaptation strength, a float or a (n,) tensor (0 for LIF neurons); None for LIF.
        n_refractory: refractory period in steps (int >= 0).
        spike_function: a ``kspike.surrogates.SpikeFunction``.
    """
    alpha: float
    rho: float
    thr: float
    beta: Optional[object]
    n_refractory: int
    spike_function: object


class NeuronState(NamedTuple):
    """State of one layer, each (B, n). ``b`` is None for LIF layers.

    Attributes:
        v: membrane potential.
        b: threshold-adaptation variable (ALIF only).
        z: spikes of the previous step (0/1).
        r: remaining refractory steps (a float counter, 0 when the neuron may spike).
    """
    v: tf.Tensor
    b: Optional[tf.Tensor]
    z: tf.Tensor
    r: tf.Tensor


def decay(tau, dt):
    """exp(-dt / tau), the per-step decay of a time constant tau (ms) at step dt (ms)."""
    return math.exp(-float(dt) / float(tau))


def input_current(x, z_previous, input_kernel, recurrent_kernel=None, bias=None):
    """I_t = x_t W_in + z_{t-1} W_rec + bias, shapes (B, n_in), (B, n) -> (B, n)."""
    current = tf.matmul(x, input_kernel)
    if recurrent_kernel is not None:
        current = current + tf.matmul(z_previous, recurrent_kernel)
    if bias is not None:
        current = current + bias
    return current


def threshold(b, params):
    """Adaptive threshold A_t = thr + beta * b_t (the constant thr for LIF, b None)."""
    if b is None or params.beta is None:
        return params.thr
    return params.thr + params.beta * b


def neuron_step(current, state, params):
    """Advance one layer by one time step.

    Args:
        current: I_t, (B, n), from ``input_current``.
        state: ``NeuronState`` at t-1.
        params: ``NeuronParameters``.

    Returns:
        (new_state, A_t): the ``NeuronState`` at t (its ``z`` is the output spike z_t) and the
        adaptive threshold A_t (a float for LIF).
    """
    z_previous = state.z
    if state.b is None:
        b = None
    else:
        b = params.rho * state.b + (1.0 - params.rho) * z_previous
    A = threshold(b, params)
    v = params.alpha * state.v + (1.0 - params.alpha) * current - A * z_previous
    z = params.spike_function((v - A) / A)
    r = state.r
    if params.n_refractory > 0:
        # The refractory mask is a constant for the gradient (LSNN convention): a refractory
        # neuron neither spikes nor passes a pseudo-derivative.
        allowed = tf.cast(tf.equal(r, 0.0), z.dtype)
        z = z * tf.stop_gradient(allowed)
        spiked = tf.stop_gradient(z) > 0.5
        r = tf.where(spiked, tf.cast(params.n_refractory, r.dtype), tf.maximum(r - 1.0, 0.0))
    return NeuronState(v=v, b=b, z=z, r=r), A
