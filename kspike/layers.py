"""Sequence layers: the leaky readout of LSNN and the weight-free IF/LIF neuron layers of deep
(feed-forward, convolutional) SNNs (docs/neuron_layers.md)."""
import math

import keras
import numpy as np
import tensorflow as tf
from keras import constraints, initializers, regularizers

from kspike import dynamics, surrogates

__all__ = ["LeakyReadout", "leaky_filter", "IFNeurons", "LIFNeurons", "FoldTime", "node_sequence",
           "native_node_ops"]

# The filter is exact linear algebra on blocks of _FILTER_BLOCK steps: inside a block one
# (L, L) lower-triangular Toeplitz product, across blocks a carry. Cost per element: L
# multiply-adds (a whole-sequence (T, T) product would cost T), memory linear in T.
_FILTER_BLOCK = 64


def _toeplitz(steps, kappa, dtype):
    """(steps, steps) lower-triangular (1 - kappa) kappa^(t - s), computed in float64."""
    t = np.arange(steps)
    lag = t[:, None] - t[None, :]
    weights = np.where(lag >= 0, (1.0 - kappa) * np.power(kappa, np.maximum(lag, 0)), 0.0)
    return tf.constant(weights, dtype)


def _decay_scan(u, decay):
    """c_k = decay c_{k-1} + u_k along axis 1 of u (static length K), c_{-1} = 0, in
    ceil(log2 K) shift-and-add rounds (each adds decay^(2^j) times the sequence shifted by 2^j)."""
    blocks = u.shape[1]
    shift, power = 1, decay
    while shift < blocks:
        shifted = tf.pad(u[:, :blocks - shift], [[0, 0], [shift, 0], [0, 0]])
        u = u + tf.constant(power, u.dtype) * shifted
        shift, power = 2 * shift, power * power
    return u


def _native_filter_allowed(dtype):
    """True where ``leaky_filter`` may run kspike's native filter op: the op loads for
    ``dtype`` (float32/float64, CPU, outside XLA) and the graph is one that is never exported
    (a gradient tape may record, as in a training step, or ``compat.native_inference_allowed``:
    eagerly and in Keras' fit / evaluate / predict functions) - the rule of SpikingRNN's native
    loops, so that every SavedModel holds TensorFlow ops only."""
    from kspike import compat, engine
    if engine.native_rule_ops(dtype) is None:
        return False
    return compat.tape_may_record() or compat.native_inference_allowed()


def leaky_filter(x, kappa, initial=None, native="auto"):
    """zhat_t = kappa zhat_{t-1} + (1 - kappa) x_t over the time axis.

    Args:
        x: (B, T, n) tensor.
        kappa: decay per step, a float in [0, 1).
        initial: optional (B, n) zhat_{-1} (default 0).
        native: "auto" (default) runs the recursion as kspike's native filter op where it
            may (see below); False always uses TensorFlow's ops.

    Returns:
        (B, T, n) filtered sequence.

    Native (``kspike.engine.linear_filter``, float32/float64 on the CPU outside XLA, in
    graphs that are never exported: training steps, eager calls, Keras' fit / evaluate /
    predict): one C++ op runs the recursion over all steps and its gradient runs it backward,
    with TensorFlow's products and sums in their order, so the result is that of the
    ``tf.scan`` of the recursion bit for bit (one training step of B=64, T=784 and 10 units:
    1.8 ms for filter and gradient against 9.3 ms for the blocked form below). Elsewhere, with
    a static T the filter runs on blocks of 64 steps (one small Toeplitz product per block and
    a logarithmic carry across blocks): the same sums as the recursion, in another order (float
    round-off only); an unknown T uses a ``tf.scan`` of the recursion.
    """
    x = tf.convert_to_tensor(x)
    if native not in ("auto", False):
        raise ValueError(f"leaky_filter: native must be 'auto' or False, received {native!r}")
    if native == "auto" and x.shape.rank == 3 and _native_filter_allowed(x.dtype):
        from kspike import engine
        y = engine.linear_filter(tf.transpose(x, (1, 0, 2)), kappa, 1.0 - kappa,
                                 initial=initial)
        return tf.transpose(y, (1, 0, 2))
    steps = x.shape[1]
    if steps is None:
        start = tf.zeros_like(x[:, 0]) if initial is None else tf.cast(initial, x.dtype)
        y = tf.scan(lambda prev, xt: kappa * prev + (1.0 - kappa) * xt,
                    tf.transpose(x, (1, 0, 2)), initializer=start)
        return tf.transpose(y, (1, 0, 2))
    block = min(steps, _FILTER_BLOCK)
    n_blocks = -(-steps // block)
    padded = n_blocks * block
    if padded != steps:
        x = tf.pad(x, [[0, 0], [0, padded - steps], [0, 0]])
    # (B, K, L, n): the filter of every block started from zero.
    local = tf.einsum("ts,bksn->bktn", _toeplitz(block, kappa, x.dtype),
                      tf.reshape(x, tf.concat([tf.shape(x)[:1], [n_blocks, block],
                                               tf.shape(x)[2:]], 0)))
    # zhat at the end of each block, carried across blocks; carry[k] enters block k + 1.
    ends = local[:, :, block - 1]
    carry = _decay_scan(ends, kappa ** block) if n_blocks > 1 else ends
    if initial is not None:
        initial = tf.cast(initial, x.dtype)
        block_powers = tf.constant(np.power(kappa, block * (np.arange(n_blocks) + 1.0)), x.dtype)
        carry = carry + block_powers[None, :, None] * initial[:, None, :]
        previous = tf.concat([initial[:, None], carry[:, :-1]], axis=1)
    else:
        previous = tf.pad(carry[:, :-1], [[0, 0], [1, 0], [0, 0]])
    powers = tf.constant(np.power(kappa, np.arange(block) + 1.0), x.dtype)
    y = local + powers[None, None, :, None] * previous[:, :, None, :]
    y = tf.reshape(y, tf.concat([tf.shape(y)[:1], [padded], tf.shape(y)[3:]], 0))
    return y[:, :steps] if padded != steps else y


@keras.saving.register_keras_serializable(package="kspike")
class LeakyReadout(keras.layers.Layer):
    """Leaky readout of LSNN: a low-pass filter of spikes followed by a dense projection.

    zhat_t = kappa zhat_{t-1} + (1 - kappa) z_t with kappa = exp(-dt / tau), then
    y_t = zhat_t W_out + b_out. (The filter is linear, so it is applied after the projection.)

    Args:
        units: number of outputs (int >= 1).
        tau: readout time constant in ms (> 0).
        dt: time step in ms (> 0).
        use_bias: add b_out.
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        kernel_constraint, bias_constraint: as in ``keras.layers.Dense`` (the default kernel
            initialiser is N(0, 1) / sqrt(fan_in), as in LSNN).

    Call arguments:
        inputs: (B, T, n) spike sequence.

    Returns:
        (B, T, units).

    Example:

    >>> import numpy as np, kspike
    >>> spikes = np.zeros((2, 50, 30), "float32")           # (B, T, n)
    >>> tuple(kspike.LeakyReadout(10, tau=20.0)(spikes).shape)
    (2, 50, 10)
    """

    def __init__(self, units, tau=20.0, dt=1.0, use_bias=True, kernel_initializer=None,
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        from kspike.cells import check_positive
        self.units = check_positive("units", units, integer=True)
        self.tau = check_positive("tau", tau)
        self.dt = check_positive("dt", dt)
        self.kappa = dynamics.decay(self.tau, self.dt)
        self.use_bias = bool(use_bias)
        self.seed = seed
        self.kernel_initializer = (
            initializers.VarianceScaling(1.0, "fan_in", "untruncated_normal", seed=seed)
            if kernel_initializer is None else initializers.get(kernel_initializer))
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError("LeakyReadout expects inputs of shape (batch, time, features) with "
                             f"known features, received {tuple(input_shape)}.")
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        self.built = True

    def call(self, inputs, mask=None):
        x = tf.convert_to_tensor(inputs)
        if x.shape.rank != 3:
            raise ValueError("LeakyReadout expects inputs of shape (batch, time, features), "
                             f"received {tuple(x.shape)}.")
        projected = tf.matmul(x, tf.cast(self.kernel, x.dtype))
        y = leaky_filter(projected, self.kappa)
        if self.bias is not None:
            y = y + tf.cast(self.bias, y.dtype)
        return y

    def step(self, z_t, zhat_previous):
        """One streaming step: (B, n) spikes and (B, units) filtered projection ->
        (y_t, new filtered projection). Used by ``kspike.export``."""
        projected = tf.matmul(z_t, tf.cast(self.kernel, z_t.dtype))
        filtered = self.kappa * zhat_previous + (1.0 - self.kappa) * projected
        y = filtered if self.bias is None else filtered + tf.cast(self.bias, filtered.dtype)
        return y, filtered

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {**super().get_config(), "units": self.units, "tau": self.tau, "dt": self.dt,
                "use_bias": self.use_bias, "seed": self.seed,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint)}


# ------------------------------------------------------------------ IF / LIF neuron layers

_NODE_OUTPUTS = ("spikes", "all")


def _node_loops_may_be_native():
    """True where a neuron layer may hand its sequence to ``node_sequence``'s hand-written
    form, whose loops run as kspike's native ops where ``native_node_ops`` allows: where a
    gradient tape may record (training), or where the graph is one that is never exported
    (``compat.native_inference_allowed``: eagerly and in Keras' fit / evaluate / predict
    functions and the Trainer's steps), the rule of SpikingRNN's native loops. Elsewhere (a
    user's ``tf.function`` without a tape, every export) the plain TensorFlow loop runs, so
    that each SavedModel holds TensorFlow ops only and its graph can be differentiated."""
    from kspike import compat
    return compat.tape_may_record() or compat.native_inference_allowed()


def native_node_ops(dtype, params, masked=False):
    """The native op module when ``node_sequence`` can run its loops in C++ (a float32,
    unmasked sequence, a catalogue surrogate, outside XLA, no GPU, the ops compiled: see
    kspike/native), else None."""
    from kspike import compat, engine, native
    if tf.as_dtype(dtype) != tf.float32 or masked or compat.in_xla_context():
        return None
    if engine.native_surrogate_attrs(params.spike_function) is None:
        return None
    if tf.config.list_logical_devices("GPU"):
        return None
    return native.load()


def _native_node_attrs(params):
    """Attributes of KspikeNodeForward/KspikeNodeBackward: the constants of node_charge and
    node_step_vjp, rounded to float32 as TensorFlow rounds them."""
    if params.tau is None:
        charge, tau = 0, 1.0
    else:
        charge, tau = (1 if params.decay_input else 2), params.tau
    leak, gain = dynamics.node_charge_partials(params)
    zero_rest = params.v_reset is None or params.v_reset == 0.0
    return dict(charge=charge, zero_rest=zero_rest, hard_reset=params.v_reset is not None,
                detach_reset=params.detach_reset, tau=float(tau), leak=float(leak),
                gain=float(gain),
                thr=float(params.thr),
                v_reset=0.0 if params.v_reset is None else float(params.v_reset))


def _native_node_sequence(ops, x, v_initial, params, return_voltages, time_major=True):
    """node_sequence with the C++ loops (KspikeNodeForward / KspikeNodeBackward), on x
    time-major (T, B, *F) or batch-major (B, T, *F) as it comes (no transposes)."""
    from kspike import engine
    attrs = _native_node_attrs(params)
    surrogate_attrs = engine.native_surrogate_attrs(params.spike_function)
    shape = tf.shape(x)
    # The ops' layouts: time-major (T, M), batch-major (B, T, F).
    layout = tf.stack([shape[0], -1]) if time_major else tf.stack([shape[0], shape[1], -1])

    def voltages_of(h, s):
        # V_t of node_reset for S in {0, 1}, from H_t and S_t as the TensorFlow loop forms it.
        if params.v_reset is None:
            return h - s * params.thr
        return tf.where(s > 0.5, tf.constant(params.v_reset, h.dtype), h)

    @tf.custom_gradient
    def run(x, v_initial):
        s, h, v_final = ops.kspike_node_forward(tf.reshape(x, layout),
                                                tf.reshape(v_initial, [-1]), **attrs)
        outputs = [tf.reshape(s, shape)]
        if return_voltages:
            outputs.append(tf.reshape(voltages_of(h, s), shape))
        outputs.append(tf.reshape(v_final, tf.shape(v_initial)))

        def grad_fn(*grads):
            grads = [tf.zeros_like(o) if g is None else tf.convert_to_tensor(g, tf.float32)
                     for g, o in zip(grads, outputs)]
            grad_voltages = (tf.reshape(grads[1], tf.shape(h)) if return_voltages
                             else tf.zeros([0], tf.float32))
            grad_x, grad_v0 = ops.kspike_node_backward(
                h, tf.reshape(grads[0], tf.shape(h)), grad_voltages,
                tf.reshape(grads[-1], [-1]), **attrs, **surrogate_attrs)
            return tf.reshape(grad_x, shape), tf.reshape(grad_v0, tf.shape(v_initial))

        return tuple(outputs), grad_fn

    results = run(x, v_initial)
    voltages = results[1] if return_voltages else None
    return _with_static_shape(results[0], x), _with_static_shape(voltages, x), results[-1]


def node_sequence(x, v_initial, params, mask=None, return_voltages=False,
                  hand_written_backward=True, native="auto", time_major=True):
    """Run an IF/LIF node layer (``kspike.dynamics.node_step``) over a whole sequence.

    The loop is a ``tf.while_loop`` over TensorArrays (per-step reads from a TensorArray are
    several times faster than slicing a captured (T, ...) tensor). With
    ``hand_written_backward`` the forward pass keeps only H_t and S_t per step, and the gradient
    is the backward recurrence of ``kspike.dynamics.node_step_vjp`` over the whole sequence
    inside one ``tf.custom_gradient``; otherwise TensorFlow differentiates the plain loop
    (the same gradients to float rounding; this is the form that survives SavedModel export).

    Args:
        x: (T, B, *features) input currents, time-major, float32 or float64.
        v_initial: (B, *features) V_0, the dtype of ``x``.
        params: ``kspike.dynamics.NodeParameters``.
        mask: optional (T, B) 0/1 (or bool): at a masked step the voltage is held and no
            spike is emitted.
        return_voltages: also return the voltages V_t after each step's reset.
        hand_written_backward: see above.
        native: with ``hand_written_backward``, run the forward loop and the backward
            recurrence as two C++ ops (kspike/native: one pass over each step's elements
            instead of a TensorFlow op per element-wise update; the same spikes, voltages
            within float32 rounding of the TensorFlow loop) where ``native_node_ops`` finds
            them usable: "auto" (default), or False for the TensorFlow loops.
        time_major: x (and the outputs) are (T, B, *features) and the mask (T, B); with
            False they are batch-major, (B, T, *features) and (B, T), Keras' layout: the
            native ops run on that layout as it is, the TensorFlow loops on a transposed copy.

    Returns:
        (spikes, voltages, v_final): spikes (T, B, *features) 0/1 ((B, T, *features) with
        ``time_major=False``), voltages the same shape or None, v_final (B, *features).
    """
    x = tf.convert_to_tensor(x)
    dtype = x.dtype
    v_initial = tf.convert_to_tensor(v_initial, dtype)
    masked = mask is not None
    if not time_major:
        ops = (native_node_ops(dtype, params, masked) if hand_written_backward and native
               else None)
        if ops is not None:
            return _native_node_sequence(ops, x, v_initial, params, return_voltages,
                                         time_major=False)
        swap = [1, 0] + list(range(2, x.shape.rank))
        spikes, voltages, v_final = node_sequence(
            tf.transpose(x, swap), v_initial, params,
            mask=None if mask is None else tf.transpose(mask), return_voltages=return_voltages,
            hand_written_backward=hand_written_backward, native=native)
        return (tf.transpose(spikes, swap),
                None if voltages is None else tf.transpose(voltages, swap), v_final)
    if masked:
        mask = tf.cast(tf.convert_to_tensor(mask), dtype)
        # (T, B) -> (T, B, 1, ..., 1): broadcasts against one step's (B, *features).
        mask = tf.reshape(mask, tf.concat(
            [tf.shape(mask), tf.ones([x.shape.rank - 2], tf.int32)], axis=0))

    if hand_written_backward and native:
        ops = native_node_ops(dtype, params, masked)
        if ops is not None:
            return _native_node_sequence(ops, x, v_initial, params, return_voltages)

    if not hand_written_backward:
        tas, v_final = _node_forward_loop(x, v_initial, mask, params, return_voltages,
                                          differentiable=True, keep_h=False)
        voltages = tas["v"].stack() if return_voltages else None
        return (_with_static_shape(tas["s"].stack(), x), _with_static_shape(voltages, x),
                v_final)

    inputs = [x, v_initial] + ([mask] if masked else [])

    @tf.custom_gradient
    def run(*args):
        x, v_initial = args[0], args[1]
        mask_value = args[2] if masked else None
        tas, v_final = _node_forward_loop(x, v_initial, mask_value, params, return_voltages,
                                          differentiable=False, keep_h=True)
        spikes = tas["s"].stack()
        outputs = [spikes] + ([tas["v"].stack()] if return_voltages else []) + [v_final]

        def grad_fn(*grads):
            grads = [tf.zeros_like(o) if g is None else tf.convert_to_tensor(g, dtype)
                     for g, o in zip(grads, outputs)]
            grad_x, grad_v0 = _node_backward_loop(
                grads[0], grads[1] if return_voltages else None, grads[-1],
                tas["h"], tas["s"], mask_value, params, v_initial)
            return [grad_x, grad_v0] + ([tf.zeros_like(mask_value)] if masked else [])

        return tuple(outputs), grad_fn

    results = run(*inputs)
    voltages = results[1] if return_voltages else None
    return _with_static_shape(results[0], x), _with_static_shape(voltages, x), results[-1]


def _unstack_time(tensor):
    """A TensorArray over the leading (time) axis of ``tensor``."""
    return tf.TensorArray(tensor.dtype, size=tf.shape(tensor)[0],
                          element_shape=tensor.shape[1:]).unstack(tensor)


def _node_forward_loop(x, v_initial, mask, params, return_voltages, differentiable, keep_h):
    """The ``tf.while_loop`` of ``node_sequence``'s forward pass.

    Args:
        x: (T, B, *features) input currents.
        v_initial: (B, *features) V_0.
        mask: None, or (T, B, 1, ..., 1) 0/1 in the dtype of ``x``.
        params: ``kspike.dynamics.NodeParameters``.
        return_voltages: also keep V_t (key "v").
        differentiable: passed to ``kspike.dynamics.node_step``.
        keep_h: also keep H_t (key "h"), for the hand-written backward pass.

    Returns:
        (tas, v_final): a dict of (T, B, *features) TensorArrays ("s" always, "v" and "h"
        as asked) and V_T.
    """
    steps = tf.shape(x)[0]
    x_ta = _unstack_time(x)
    masked = mask is not None
    mask_ta = _unstack_time(mask) if masked else None
    names = ["s"] + (["v"] if return_voltages else []) + (["h"] if keep_h else [])

    def body(t, v, tas):
        s, v_new, h = dynamics.node_step(v, x_ta.read(t), params, differentiable)
        if masked:
            m = mask_ta.read(t)
            s = s * m
            v_new = tf.where(m > 0.5, v_new, v)
        values = {"s": s, "v": v_new, "h": h}
        return t + 1, v_new, {k: ta.write(t, values[k]) for k, ta in tas.items()}

    def new_ta():
        return tf.TensorArray(x.dtype, size=steps, element_shape=v_initial.shape)

    _, v_final, tas = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), v_initial, {k: new_ta() for k in names}))
    return tas, v_final


def _node_backward_loop(grad_spikes, grad_voltages, grad_v_final, h_ta, s_ta, mask, params,
                        v_initial):
    """The backward recurrence of ``node_sequence`` (``kspike.dynamics.node_step_vjp`` per step).

    Args:
        grad_spikes: (T, B, *features) dL/dS_t.
        grad_voltages: None, or (T, B, *features) dL/dV_t from the returned voltages.
        grad_v_final: (B, *features) dL/dV_T.
        h_ta, s_ta: the forward pass's TensorArrays of H_t and S_t.
        mask: None, or (T, B, 1, ..., 1) 0/1.
        params: ``kspike.dynamics.NodeParameters``.
        v_initial: V_0 (its shape and dtype shape the result).

    Returns:
        (grad_x, grad_v0): (T, B, *features) dL/dx_t and (B, *features) dL/dV_0.
    """
    grad_spikes_ta = _unstack_time(grad_spikes)
    grad_voltages_ta = _unstack_time(grad_voltages) if grad_voltages is not None else None
    steps = tf.shape(grad_spikes)[0]
    masked = mask is not None
    mask_ta = _unstack_time(mask) if masked else None

    def back_body(t, grad_v, grad_x_ta):
        # grad_v: dL/dV_t from the steps after t (and the final state).
        if grad_voltages_ta is not None:
            grad_v = grad_v + grad_voltages_ta.read(t)
        # At a masked step S_t is 0 (its output gradient does not count) and V_t = V_{t-1}.
        grad_x, grad_v_previous = dynamics.node_step_vjp(
            grad_spikes_ta.read(t), grad_v, h_ta.read(t), s_ta.read(t), params)
        if masked:
            m = mask_ta.read(t)
            grad_x = grad_x * m
            grad_v_previous = m * grad_v_previous + (1.0 - m) * grad_v
        return t - 1, grad_v_previous, grad_x_ta.write(t, grad_x)

    grad_x_ta = tf.TensorArray(v_initial.dtype, size=steps, element_shape=v_initial.shape)
    _, grad_v0, grad_x_ta = tf.while_loop(
        lambda t, *_: t >= 0, back_body, (steps - 1, grad_v_final, grad_x_ta))
    return grad_x_ta.stack(), grad_v0


def _with_static_shape(sequence, like):
    # TensorArray.stack loses the static T; Keras' TimeDistributed needs it (with an unknown
    # T it maps over the wrong axis).
    if sequence is not None:
        sequence.set_shape(like.shape)
    return sequence


def _real_number(name, value, minimum=None, strict=False, allow_none=False):
    if value is None and allow_none:
        return None
    expected = "a real number" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be {expected}, received {value!r} of type "
                        f"{type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, received {value!r}.")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"`{name}` must be {bound}, received {value!r}.")
    return value


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, received {value!r} of type "
                        f"{type(value).__name__}.")
    return bool(value)


class _NeuronLayer(keras.layers.Layer):
    """Shared shell of ``IFNeurons`` and ``LIFNeurons`` (arguments, state, call)."""

    def __init__(self, thr=1.0, v_reset=0.0, surrogate="sigmoid", detach_reset=False,
                 return_sequences=True, return_state=False, stateful=False, output="spikes",
                 dampening_factor=1.0, sharpness=1.0, **kwargs):
        kwargs.pop("autocast", None)
        # The voltage stays in float32 under mixed precision: the layer casts itself.
        super().__init__(autocast=False, **kwargs)
        self.thr = _real_number("thr", thr, minimum=0.0, strict=True)
        self.v_reset = _real_number("v_reset", v_reset, allow_none=True)
        self.dampening_factor = _real_number("dampening_factor", dampening_factor, 0.0, True)
        self.sharpness = _real_number("sharpness", sharpness, 0.0, True)
        if isinstance(surrogate, surrogates.SpikeFunction):
            self.spike_function = surrogate
        elif isinstance(surrogate, dict):
            self.spike_function = surrogates.get(dict(surrogate))
        else:
            self.spike_function = surrogates.get(surrogate, dampening=self.dampening_factor,
                                                 sharpness=self.sharpness)
        self.detach_reset = _flag("detach_reset", detach_reset)
        self.return_sequences = _flag("return_sequences", return_sequences)
        self.return_state = _flag("return_state", return_state)
        self.stateful = _flag("stateful", stateful)
        if output not in _NODE_OUTPUTS:
            raise ValueError(f"`output` must be one of {_NODE_OUTPUTS}, received {output!r}.")
        self.output_mode = output
        self.supports_masking = True
        self.voltage = None

    tau = None
    decay_input = False

    @property
    def parameters(self):
        """The layer's ``kspike.dynamics.NodeParameters``."""
        return dynamics.NodeParameters(tau=self.tau, thr=self.thr, v_reset=self.v_reset,
                                       decay_input=self.decay_input,
                                       detach_reset=self.detach_reset,
                                       spike_function=self.spike_function)

    @property
    def state_dtype(self):
        """float64 for a float64 layer, else float32 (also under mixed precision)."""
        compute = keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        return "float64" if compute == "float64" else "float32"

    def _check_shape(self, shape):
        shape = tuple(shape)
        if len(shape) < 3:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (batch, time, "
                             f"*features) (rank >= 3), received shape {shape}.")
        return shape

    def build(self, input_shape):
        shape = self._check_shape(input_shape)
        if self.stateful:
            if shape[0] is None or any(d is None for d in shape[2:]):
                raise ValueError(
                    f"{type(self).__name__}(stateful=True) needs a fixed batch size and "
                    f"feature shape, received input shape {shape}: pass e.g. "
                    "keras.Input(shape, batch_size=B).")
            self.voltage = self.add_weight(
                name="voltage", shape=(shape[0],) + shape[2:], dtype=self.state_dtype,
                initializer=initializers.Constant(dynamics.node_initial_voltage(
                    self.parameters)), trainable=False)
        self.built = True

    def reset_state(self):
        """Set the voltage of a stateful layer back to V_0."""
        if self.voltage is not None:
            self.voltage.assign(tf.fill(self.voltage.shape, tf.constant(
                dynamics.node_initial_voltage(self.parameters), self.voltage.dtype)))

    reset_states = reset_state

    def call(self, inputs, initial_state=None, mask=None, training=None):
        x = tf.convert_to_tensor(inputs)
        self._check_shape(x.shape)
        if not x.dtype.is_floating:
            raise TypeError(f"{type(self).__name__} expects floating-point input currents, "
                            f"received dtype {x.dtype.name}.")
        state_dtype = self.state_dtype
        compute_dtype = keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        params = self.parameters
        x = tf.cast(x, state_dtype)                                         # (B, T, *F)
        rank = x.shape.rank
        if initial_state is not None:
            if isinstance(initial_state, (list, tuple)):
                if len(initial_state) != 1:
                    raise ValueError(f"`initial_state` must be one (batch, *features) tensor "
                                     f"V_0, received {len(initial_state)} tensors.")
                initial_state = initial_state[0]
            v0 = tf.cast(tf.convert_to_tensor(initial_state), state_dtype)
            if v0.shape.rank != rank - 1:
                raise ValueError(f"`initial_state` must have shape (batch, *features) = "
                                 f"{(None,) + tuple(x.shape[2:])}, received {tuple(v0.shape)}.")
        elif self.stateful:
            if x.shape[0] is not None and x.shape[0] != self.voltage.shape[0]:
                raise ValueError(f"{type(self).__name__}(stateful=True) was built for batch "
                                 f"size {self.voltage.shape[0]}, received {x.shape[0]}.")
            v0 = tf.convert_to_tensor(self.voltage)
        else:
            shape = tf.shape(x)
            v0 = tf.fill(tf.concat([shape[:1], shape[2:]], 0), tf.constant(
                dynamics.node_initial_voltage(params), state_dtype))
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if mask.shape.rank > 2:
                # e.g. keras.layers.Masking on (B, T, H, W, C) gives (B, T, H, W): a step is
                # skipped when all its elements are masked, as Masking does for (B, T, n).
                mask = tf.reduce_any(tf.cast(mask, tf.bool), axis=list(range(2, mask.shape.rank)))
        return_voltages = self.output_mode == "all"
        spikes, voltages, v_final = node_sequence(
            x, v0, params, mask=mask, return_voltages=return_voltages,
            hand_written_backward=_node_loops_may_be_native(), time_major=False)
        if self.stateful:
            self.voltage.assign(v_final)

        def emitted(sequence):
            if not self.return_sequences:
                sequence = sequence[:, -1]
            return tf.cast(sequence, compute_dtype)

        outputs = [emitted(spikes)]
        if return_voltages:
            outputs.append(emitted(voltages))
        if self.return_state:
            outputs.append(tf.cast(v_final, compute_dtype))
        return outputs[0] if len(outputs) == 1 else outputs

    def compute_output_shape(self, input_shape):
        shape = self._check_shape(input_shape)
        sequence = shape if self.return_sequences else (shape[0],) + shape[2:]
        shapes = [sequence] * (2 if self.output_mode == "all" else 1)
        if self.return_state:
            shapes.append((shape[0],) + shape[2:])
        return shapes[0] if len(shapes) == 1 else shapes

    def compute_mask(self, inputs, mask=None):
        sequence_mask = mask if self.return_sequences else None
        masks = [sequence_mask] * (2 if self.output_mode == "all" else 1)
        if self.return_state:
            masks.append(None)
        return masks[0] if len(masks) == 1 else masks

    def get_config(self):
        return {**super().get_config(), "thr": self.thr, "v_reset": self.v_reset,
                "surrogate": self.spike_function.get_config(),
                "dampening_factor": self.dampening_factor, "sharpness": self.sharpness,
                "detach_reset": self.detach_reset, "return_sequences": self.return_sequences,
                "return_state": self.return_state, "stateful": self.stateful,
                "output": self.output_mode}


_NODE_ARGS_DOC = """
        thr: firing threshold V_th (> 0).
        v_reset: reset potential of the hard reset (a number), or None for the soft reset
            V_t = H_t - V_th S_t. V_0 is v_reset (0 for the soft reset).
        surrogate: a kspike surrogate name (``kspike.surrogates.available()``), a
            ``kspike.surrogates.SpikeFunction`` or its config dict; applied to H_t - V_th. The
            default "sigmoid" with dampening_factor 1 and sharpness 1 is SpikingJelly's
            ``Sigmoid(alpha=4)``: dS/dH = 4 sig(4 x) (1 - sig(4 x)), x = H_t - V_th.
        detach_reset: the spike in the reset carries no gradient.
        return_sequences: emit every step (B, T, *features), else the last (B, *features).
        return_state: also return the final voltage V_T (B, *features).
        stateful: keep the final voltage as the next call's V_0 (streaming); needs a fixed
            batch size (``keras.Input(..., batch_size=B)``); ``reset_state()`` restores V_0.
        output: "spikes", or "all" for [spikes, voltages V_t after the reset].
        dampening_factor, sharpness: the surrogate's peak and sharpness when ``surrogate`` is
            a name (see docs/surrogates.md).

    Call arguments:
        inputs: (B, T, *features) input currents (any float dtype; the voltage is float32,
            float64 for a float64 layer).
        initial_state: optional V_0, (B, *features).
        mask: optional (B, T) boolean: masked steps hold the voltage and emit no spike.

    Returns:
        (B, T, *features) spikes (0/1 in the compute dtype), plus the voltages with
        ``output="all"`` and the final voltage with ``return_state=True`` (a list then).
"""


@keras.saving.register_keras_serializable(package="kspike")
class IFNeurons(_NeuronLayer):
    """Integrate-and-fire neurons without weights, for inputs of any feature shape.

    SpikingJelly's ``IFNode`` (multi-step): per element and step, charge H_t = V_{t-1} + X_t,
    fire S_t = 1[H_t >= V_th], reset (docs/neuron_layers.md).

    Args:""" + _NODE_ARGS_DOC + """
    Example:

    >>> spikes = kspike.IFNeurons(thr=1.0)(currents)   # (B, T, 28, 28, 8) -> same shape
    """

    def __init__(self, thr=1.0, v_reset=0.0, surrogate="sigmoid", detach_reset=False,
                 return_sequences=True, return_state=False, stateful=False, output="spikes",
                 dampening_factor=1.0, sharpness=1.0, **kwargs):
        super().__init__(thr=thr, v_reset=v_reset, surrogate=surrogate,
                         detach_reset=detach_reset, return_sequences=return_sequences,
                         return_state=return_state, stateful=stateful, output=output,
                         dampening_factor=dampening_factor, sharpness=sharpness, **kwargs)


@keras.saving.register_keras_serializable(package="kspike")
class LIFNeurons(_NeuronLayer):
    """Leaky integrate-and-fire neurons without weights, for inputs of any feature shape.

    SpikingJelly's ``LIFNode`` (multi-step): per element and step, charge
    H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau (``decay_input=True``) or
    H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t, fire S_t = 1[H_t >= V_th], reset
    (docs/neuron_layers.md). tau counts time steps (no dt).

    Args:
        tau: membrane time constant in time steps (>= 1).
        decay_input: divide the input by tau as well.""" + _NODE_ARGS_DOC + """
    Example:

    >>> spikes = kspike.LIFNeurons(tau=2.0)(currents)  # (B, T, 28, 28, 8) -> same shape
    """

    def __init__(self, tau=2.0, thr=1.0, v_reset=0.0, decay_input=True, surrogate="sigmoid",
                 detach_reset=False, return_sequences=True, return_state=False, stateful=False,
                 output="spikes", dampening_factor=1.0, sharpness=1.0, **kwargs):
        self.tau = _real_number("tau", tau, minimum=1.0)
        self.decay_input = _flag("decay_input", decay_input)
        super().__init__(thr=thr, v_reset=v_reset, surrogate=surrogate,
                         detach_reset=detach_reset, return_sequences=return_sequences,
                         return_state=return_state, stateful=stateful, output=output,
                         dampening_factor=dampening_factor, sharpness=sharpness, **kwargs)

    def get_config(self):
        return {**super().get_config(), "tau": self.tau, "decay_input": self.decay_input}


@keras.saving.register_keras_serializable(package="kspike")
class FoldTime(keras.layers.Wrapper):
    """Apply a layer to all T steps at once, with the time axis folded into the batch.

    (B, T, *features) -> the layer on (B * T, *features) -> (B, T, *out_features): SpikingJelly's
    ``SeqToANNContainer``. Unlike ``keras.layers.TimeDistributed``, which calls the layer once
    per step, one call covers every step, so ``BatchNormalization`` normalises with statistics
    over all B * T samples (as SpikingJelly's networks do) and updates its moving averages once
    per batch; for layers without batch statistics (Conv2D, Dense, pooling) the outputs are the
    same as with ``TimeDistributed``.

    Args:
        layer: a Keras layer for (batch, *features) inputs.

    Example:

    >>> import keras, numpy as np, kspike
    >>> h = np.random.default_rng(0).normal(size=(2, 4, 28, 28, 3)).astype("float32")
    >>> conv = kspike.FoldTime(keras.layers.Conv2D(8, 3, padding="same"))   # (B, T, H, W, C)
    >>> tuple(conv(h).shape)          # Conv2D saw one batch of B*T = 8 frames
    (2, 4, 28, 28, 8)
    """

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 3:
            raise ValueError("FoldTime expects inputs of shape (batch, time, *features), "
                             f"received shape {input_shape}.")
        if not self.layer.built:
            self.layer.build((None,) + input_shape[2:])
        self.built = True

    def _folded_batch(self, input_shape):
        if input_shape[0] is None or input_shape[1] is None:
            return None
        return input_shape[0] * input_shape[1]

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        inner = self.layer.compute_output_shape((self._folded_batch(input_shape),)
                                                + input_shape[2:])
        return (input_shape[0], input_shape[1]) + tuple(inner[1:])

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        shape = tf.shape(x)
        folded = tf.reshape(x, tf.concat([[-1], shape[2:]], axis=0))
        folded.set_shape((self._folded_batch(tuple(x.shape)),) + tuple(x.shape[2:]))
        y = self.layer(folded, training=training)
        out = tf.reshape(y, tf.concat([shape[:2], tf.shape(y)[1:]], axis=0))
        out.set_shape(tuple(x.shape[:2]) + tuple(y.shape[1:]))
        return out
