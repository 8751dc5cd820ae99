"""Pure step functions of the LIF and ALIF neuron (docs/neurons.md).

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


def delay_kernel(kernel, delays, n_delay):
    """LSNN's synaptic delays as one wider kernel.

    Args:
        kernel: (n_pre, n) weights W.
        delays: (n_pre, n) integer delay indices d_ji in {0, ..., n_delay - 1}.
        n_delay: number of delay slots D.

    Returns:
        (n_pre, D * n) kernel whose column d * n + j holds W_ij where d_ij == d and 0
        elsewhere, so ``x @ delay_kernel(W, d, D)`` is the contribution of x to every slot of
        the future-current buffer of ``delayed_current``.
    """
    onehot = tf.one_hot(delays, n_delay, axis=1, dtype=kernel.dtype)        # (n_pre, D, n)
    n_pre, n = kernel.shape
    return tf.reshape(kernel[:, None, :] * onehot, (n_pre, n_delay * n))


def delayed_current(buffer, contributions, units):
    """One step of LSNN's future-current buffer (docs/neurons.md, "Synaptic delays").

    Slot d of the buffer holds the current due in d steps. This step's contributions
    (x_t W_in and z_{t-1} W_rec, each synapse into the slot of its delay, from
    ``delay_kernel``) are added, slot 0 is the current I_t used now, and the buffer shifts by
    one slot (a zero slot enters at the end)::

        I_t = sum_d ( x_{t-d} W_in^(d) + z_{t-1-d} W_rec^(d) )

    Args:
        buffer: (B, D * units) buffer of the previous step, slot-major (slot d in columns
            d * units .. (d + 1) * units - 1).
        contributions: (B, D * units), the same layout.
        units: n.

    Returns:
        (I_t, new_buffer): (B, units) and (B, D * units).
    """
    total = buffer + contributions
    current = total[:, :units]
    return current, tf.concat([total[:, units:], tf.zeros_like(current)], axis=1)


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


def refractory_allowed(r, params):
    """Boolean (B, n) mask of the neurons that may spike at this step (refractory counter
    ``r`` of the previous state at 0), as in ``neuron_step``; None when
    ``params.n_refractory`` is 0 (every neuron may spike)."""
    if params.n_refractory == 0:
        return None
    return tf.equal(r, 0.0)


def spike_pseudo_derivative(v, A, params, allowed=None):
    """psi((v_t - A_t) / A_t), zeroed where refractory: the derivative of z_t with respect to
    x_t = (v_t - A_t) / A_t in ``neuron_step``.

    Args:
        v: v_t, (B, n). A: A_t, (B, n) tensor or the float thr (LIF).
        params: ``NeuronParameters``.
        allowed: (B, n) mask from ``refractory_allowed`` (bool or 0/1), or None.

    Returns:
        (B, n) psi_t in the dtype of ``v``.
    """
    psi = params.spike_function.pseudo_derivative((v - A) / A)
    if allowed is not None:
        if allowed.dtype == tf.bool:
            psi = tf.where(allowed, psi, tf.constant(0.0, psi.dtype))
        else:
            psi = psi * tf.cast(allowed, psi.dtype)
    return psi


def neuron_step_vjp(grad_z, grad_v, grad_b, grad_A, v, A, z_previous, params, allowed=None):
    """Backpropagation through one ``neuron_step`` (the vector-Jacobian product of the step).

    Given the gradients of a loss with respect to the new state (z_t, v_t, b_t) and to the
    adaptive threshold A_t (where A_t is an output, e.g. ``output="all"``), returns the
    gradients with respect to the step's input current I_t and to the previous state. The
    recurrent product z_{t-1} W_rec is formed outside ``neuron_step`` (in ``input_current``),
    so its term grad_I W_rec^T is NOT included in the returned ``grad_z_previous``.

    Partial derivatives used (psi_t = ``spike_pseudo_derivative``, x_t = (v_t - A_t) / A_t)::

        dz_t/dv_t = psi_t / A_t            dz_t/dA_t = -psi_t v_t / A_t^2
        dv_t/dv_{t-1} = alpha              dv_t/dI_t = 1 - alpha        dv_t/dA_t = -z_{t-1}
        dv_t/dz_{t-1} = -A_t               db_t/db_{t-1} = rho          db_t/dz_{t-1} = 1 - rho
        dA_t/db_t = beta

    The refractory mask and counter carry no gradient (as in ``neuron_step``).

    Args:
        grad_z, grad_v: dL/dz_t and dL/dv_t, (B, n).
        grad_b: dL/db_t (B, n) or None (LIF layer).
        grad_A: dL/dA_t from outputs (B, n) or None.
        v: v_t, (B, n). A: A_t from ``neuron_step`` ((B, n) tensor, or a float for LIF).
        z_previous: z_{t-1}, (B, n).
        params: ``NeuronParameters``. allowed: ``refractory_allowed(r_{t-1})`` or None.

    Returns:
        (grad_current, grad_v_previous, grad_b_previous, grad_z_previous): each (B, n);
        grad_b_previous is None for a LIF layer (``params.beta`` None or grad_b None).
    """
    # dL/dx_t / A_t appears in both dL/dv_t and dL/dA_t: computed once.
    grad_x_over_A = grad_z * spike_pseudo_derivative(v, A, params, allowed) / A
    grad_v_total = grad_v + grad_x_over_A
    grad_current = (1.0 - params.alpha) * grad_v_total
    grad_v_previous = params.alpha * grad_v_total
    if grad_b is None or params.beta is None:
        return grad_current, grad_v_previous, None, -A * grad_v_total
    # minus dL/dA_t: psi v / A^2 dL/dz_t + z_{t-1} dL/dv_t.
    minus_grad_A = grad_x_over_A * (v / A) + grad_v_total * z_previous
    if grad_A is not None:
        minus_grad_A = minus_grad_A - grad_A
    grad_b_total = grad_b - params.beta * minus_grad_A
    grad_b_previous = params.rho * grad_b_total
    grad_z_previous = (1.0 - params.rho) * grad_b_total - A * grad_v_total
    return grad_current, grad_v_previous, grad_b_previous, grad_z_previous


# ------------------------------------------------------------------ e-prop partial derivatives
# docs/eprop.md, derived for the kspike step above. The hidden state is h = (v, b); the
# spike z_t = z(h_t) is a function of it. As in e-prop, z_{t-1} counts as a constant where it
# enters the recurrent input I_t and the reset factor of v_t, but not where it enters b_t.


class SpikeDerivatives(NamedTuple):
    """Partial derivatives of the spike z_t of ``neuron_step`` with respect to its state at t.

    Attributes:
        dz_dv: dz_t / dv_t = psi_t / A_t, (B, n) (0 while refractory).
        dz_db: dz_t / db_t = -psi_t beta v_t / A_t^2, (B, n); None for a LIF layer.
    """
    dz_dv: tf.Tensor
    dz_db: Optional[tf.Tensor]


class StateJacobian(NamedTuple):
    """Diagonal Jacobian dh_t / dh_{t-1} of e-prop for h = (v, b), each entry (B, n).

    Attributes:
        v_v: dv_t / dv_{t-1} (the float alpha for a LIF layer).
        v_b: dv_t / db_{t-1} (None for LIF).
        b_v: db_t / dv_{t-1} (None for LIF).
        b_b: db_t / db_{t-1} (None for LIF).
    """
    v_v: object
    v_b: Optional[tf.Tensor]
    b_v: Optional[tf.Tensor]
    b_b: Optional[tf.Tensor]


def spike_derivatives(state, A, params, allowed=None):
    """dz_t / dv_t and dz_t / db_t of one ``neuron_step`` (z_t = H((v_t - A_t) / A_t)).

    Args:
        state: the ``NeuronState`` at t returned by ``neuron_step``.
        A: A_t returned by ``neuron_step`` ((B, n) tensor, or the float thr for LIF).
        params: ``NeuronParameters``.
        allowed: ``refractory_allowed(r_{t-1})`` (the mask used at step t) or None.

    Returns:
        ``SpikeDerivatives``; with psi_t = ``spike_pseudo_derivative``::

            dz_t/dv_t = psi_t / A_t        dz_t/db_t = -psi_t beta v_t / A_t^2
    """
    psi = spike_pseudo_derivative(state.v, A, params, allowed)
    dz_dv = psi / A
    if state.b is None or params.beta is None:
        return SpikeDerivatives(dz_dv=dz_dv, dz_db=None)
    return SpikeDerivatives(dz_dv=dz_dv, dz_db=-psi * params.beta * state.v / (A * A))


def eprop_state_jacobian(z_previous, previous_derivatives, params):
    """Hidden-state Jacobian dh_t / dh_{t-1} of e-prop for the kspike step.

    z_{t-1} = z(v_{t-1}, b_{t-1}) is differentiated where it enters b_t and held constant where it
    enters I_t and the reset term -A_t z_{t-1} (the reset still depends on b_t through A_t)::

        db_t/db_{t-1} = rho + (1 - rho) dz_{t-1}/db_{t-1}
        db_t/dv_{t-1} = (1 - rho) dz_{t-1}/dv_{t-1}
        dv_t/dv_{t-1} = alpha - beta z_{t-1} db_t/dv_{t-1}
        dv_t/db_{t-1} = -beta z_{t-1} db_t/db_{t-1}

    For LIF (beta = 0 or no b) this is dv_t/dv_{t-1} = alpha only.

    Args:
        z_previous: z_{t-1}, (B, n).
        previous_derivatives: ``SpikeDerivatives`` of step t-1 (zeros before the first step).
        params: ``NeuronParameters``.

    Returns:
        ``StateJacobian`` with (B, n) entries (v_v the float alpha for LIF).
    """
    if previous_derivatives.dz_db is None or params.beta is None:
        return StateJacobian(v_v=params.alpha, v_b=None, b_v=None, b_b=None)
    b_v = (1.0 - params.rho) * previous_derivatives.dz_dv
    b_b = params.rho + (1.0 - params.rho) * previous_derivatives.dz_db
    beta_z = params.beta * z_previous
    return StateJacobian(v_v=params.alpha - beta_z * b_v, v_b=-beta_z * b_b, b_v=b_v, b_b=b_b)


def eprop_eligibility_step(eps_v, eps_b, presynaptic, jacobian, params):
    """One step of e-prop's eligibility vector eps_t = (eps^v, eps^b) of synapses i -> j.

        eps^v_t = dv_t/dv_{t-1} eps^v_{t-1} + dv_t/db_{t-1} eps^b_{t-1} + (1 - alpha) p_i(t)
        eps^b_t = db_t/dv_{t-1} eps^v_{t-1} + db_t/db_{t-1} eps^b_{t-1}

    where (1 - alpha) p_i(t) = dv_t / dW_ji with p_i(t) = x_i(t) (input weights), z_i(t-1)
    (recurrent weights) or 1 (bias). Shapes broadcast: e.g. eps (B, P, n), presynaptic (B, P, 1)
    and jacobian entries (B, 1, n); eps_b and the adaptive entries are None for LIF.

    Returns:
        (eps_v, eps_b) at t.
    """
    new_v = jacobian.v_v * eps_v + (1.0 - params.alpha) * presynaptic
    if eps_b is None or jacobian.b_b is None:
        return new_v, None
    new_v = new_v + jacobian.v_b * eps_b
    new_b = jacobian.b_v * eps_v + jacobian.b_b * eps_b
    return new_v, new_b


def eligibility_trace(eps_v, eps_b, derivatives):
    """e-prop's eligibility trace e_ji(t) = dz_t/dv_t eps^v_ji(t) + dz_t/db_t eps^b_ji(t).

    ``derivatives`` entries must broadcast against eps (e.g. (B, 1, n) against (B, P, n)).
    """
    e = derivatives.dz_dv * eps_v
    if eps_b is not None and derivatives.dz_db is not None:
        e = e + derivatives.dz_db * eps_b
    return e


# ------------------------------------------------------------ IF / LIF nodes of deep SNNs
# SpikingJelly's IFNode / LIFNode semantics (docs/neuron_layers.md): elementwise on a tensor of
# any shape, one step in the order charge -> fire -> reset, V_{t-1} the state after the reset::
#
#     IF:                       H_t = V_{t-1} + X_t
#     LIF, decay_input=True:    H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau
#     LIF, decay_input=False:   H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t
#     fire:                     S_t = 1[H_t - V_th >= 0]        (>=, unlike the LSNN cells' >)
#     hard reset (V_reset=c):   V_t = H_t (1 - S_t) + c S_t
#     soft reset (V_reset None): V_t = H_t - V_th S_t   (and V_reset counts as 0 in the decay)
#
# tau counts time steps; V_0 = V_reset (0 with the soft reset).


class NodeParameters(NamedTuple):
    """Constants of an IF/LIF node layer (``kspike.IFNeurons`` / ``kspike.LIFNeurons``).

    Attributes:
        tau: membrane time constant in time steps (float >= 1), or None for the IF node.
        thr: firing threshold V_th (float > 0).
        v_reset: reset potential of the hard reset (float), or None for the soft reset
            (subtraction of V_th).
        decay_input: LIF only: the input is divided by tau as well as the leak.
        detach_reset: the spike in the reset carries no gradient.
        spike_function: a ``kspike.surrogates.SpikeFunction`` applied to H_t - V_th.
    """
    tau: Optional[float]
    thr: float
    v_reset: Optional[float]
    decay_input: bool
    detach_reset: bool
    spike_function: object


def node_initial_voltage(params):
    """V_0: V_reset with the hard reset, 0 with the soft reset (a float)."""
    return 0.0 if params.v_reset is None else float(params.v_reset)


def node_charge(v_previous, x, params):
    """H_t from V_{t-1} and the input current X_t (any shape, same dtype)."""
    if params.tau is None:
        return v_previous + x
    if params.decay_input:
        if params.v_reset is None or params.v_reset == 0.0:
            return v_previous + (x - v_previous) / params.tau
        return v_previous + (x - (v_previous - params.v_reset)) / params.tau
    if params.v_reset is None or params.v_reset == 0.0:
        # SpikingJelly's rounding for a zero rest potential.
        return v_previous * (1.0 - 1.0 / params.tau) + x
    return v_previous - (v_previous - params.v_reset) / params.tau + x


def node_charge_partials(params):
    """(dH_t/dV_{t-1}, dH_t/dX_t) of ``node_charge``: floats, constant in time."""
    if params.tau is None:
        return 1.0, 1.0
    leak = 1.0 - 1.0 / params.tau
    return leak, (1.0 / params.tau if params.decay_input else 1.0)


def node_fire(h, params, differentiable=True):
    """S_t = 1[H_t >= V_th], with the surrogate gradient psi(H_t - V_th) if ``differentiable``
    (else a plain 0/1 tensor without gradient)."""
    x = h - params.thr
    if not differentiable:
        return tf.cast(x >= 0.0, h.dtype)
    return params.spike_function(x, inclusive=True)


def node_reset(h, s, params):
    """V_t from H_t and S_t: hard reset to V_reset, or soft reset by subtraction of V_th."""
    s_reset = tf.stop_gradient(s) if params.detach_reset else s
    if params.v_reset is None:
        return h - s_reset * params.thr
    return (1.0 - s_reset) * h + s_reset * params.v_reset


def node_step(v_previous, x, params, differentiable=True):
    """One charge -> fire -> reset step of an IF/LIF node layer.

    Args:
        v_previous: V_{t-1}, any shape. x: X_t, the same shape and dtype.
        params: ``NodeParameters``.
        differentiable: carry the surrogate gradient (False: plain 0/1 spikes).

    Returns:
        (S_t, V_t, H_t): spikes, the voltage after the reset, the voltage before it.
    """
    h = node_charge(v_previous, x, params)
    if not differentiable and params.v_reset is not None:
        # The same values as node_reset for S in {0, 1} ((1 - S) H + c S is exactly H or c),
        # in two passes over the tensor instead of five: this is the forward loop of the
        # hand-written backward pass. (H - V_th >= 0 and H >= V_th agree in IEEE arithmetic.)
        fired = h >= params.thr
        return (tf.cast(fired, h.dtype), tf.where(fired, tf.constant(params.v_reset, h.dtype), h),
                h)
    s = node_fire(h, params, differentiable)
    return s, node_reset(h, s, params), h


def node_step_vjp(grad_s, grad_v, h, s, params):
    """Backpropagation through one ``node_step``.

    With psi_t = psi(H_t - V_th) (dS_t/dH_t) and the charge partials a = dH_t/dV_{t-1},
    b = dH_t/dX_t (``node_charge_partials``)::

        hard reset: dV_t/dH_t = 1 - S_t + (V_reset - H_t) psi_t     (no psi term if detached)
        soft reset: dV_t/dH_t = 1 - V_th psi_t                      (1 if detached)
        dL/dH_t = dL/dS_t psi_t + dL/dV_t dV_t/dH_t
        dL/dX_t = b dL/dH_t,  dL/dV_{t-1} = a dL/dH_t

    Args:
        grad_s, grad_v: dL/dS_t and dL/dV_t. h, s: H_t and S_t of the step.
        params: ``NodeParameters``.

    Returns:
        (dL/dX_t, dL/dV_{t-1}).
    """
    psi = params.spike_function.pseudo_derivative(h - params.thr)
    if params.v_reset is None:
        dv_dh = 1.0 if params.detach_reset else 1.0 - params.thr * psi
    else:
        dv_dh = 1.0 - s
        if not params.detach_reset:
            dv_dh = dv_dh + (params.v_reset - h) * psi
    grad_h = grad_s * psi + grad_v * dv_dh
    leak, gain = node_charge_partials(params)
    # IF (and LIF without decay_input) pass dL/dH on unscaled: no multiplication by 1.
    return (grad_h if gain == 1.0 else gain * grad_h,
            grad_h if leak == 1.0 else leak * grad_h)
