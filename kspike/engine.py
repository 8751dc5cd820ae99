"""``kspike.SpikingRNN``: a drop-in for ``keras.layers.RNN`` specialised for kspike cells.

``keras.layers.RNN(cell)`` calls the cell once per time step and lets TensorFlow differentiate
the whole loop: T small input products, the surrogate expressions in every step and every
intermediate kept for the backward pass. ``SpikingRNN`` computes the same outputs and the same
gradients (up to float rounding; spikes are identical) inside one ``tf.custom_gradient`` around
the whole sequence, with a hand-written backward recurrence (``kspike.dynamics.neuron_step_vjp``)
that stores per step only v_t, A_t (ALIF) and the refractory mask.

Two implementations of these loops exist:

- Native (default where it applies: float32, no mask, no XLA, a catalogue surrogate; see
  ``kspike.native``): the whole forward and backward time loops are two C++ TensorFlow ops,
  compiled against the installed TensorFlow on first use. Per step they do a few fused passes
  over (B, n) arrays instead of ~30 TensorFlow ops, and use the sparsity of spikes: z_{t-1}
  W_rec and dW_rec = sum_t z_{t-1}^T dI_t add the rows of the neurons that spiked (B * spikes
  * n work instead of B * n * n), and so do x_t W_in and dW_in when at most a quarter of the
  inputs are nonzero (spike inputs); the dense per-step product dI_t W_rec^T is a
  register-blocked kernel; the batch is split into one shard per intra-op thread. The
  element-wise updates are written in TensorFlow's order and round as TensorFlow's; the
  products sum in another order (differences of float rounding only).
- TensorFlow (``native=False``, and every case the native loops do not cover: masks, float64,
  mixed precision, user-defined surrogates, ``jit_compile=True``): the input projection of all
  T steps as one matmul before a ``tf.while_loop`` whose step is the recurrent product and
  ``kspike.dynamics.neuron_step`` with the plain Heaviside (the surrogate term is exactly zero
  in the forward pass, see ``kspike.surrogates``); dW_in and dW_rec as matmuls over all steps
  after the backward loop.

The hand-written backward pass is used when a gradient tape may record (training). Otherwise
(inference, ``model.predict``, SavedModel export) the TensorFlow loop runs with the cell's own
spike function and keeps no buffers; TensorFlow can still differentiate it, with the gradients
of ``keras.layers.RNN``, should the traced function be differentiated later. The native ops
therefore never enter an exported graph: a SavedModel of a ``SpikingRNN`` model loads and runs
without kspike.

``SpikingRNN(..., jit_compile=True)`` compiles the TensorFlow forward and backward loops each
as one XLA cluster. It is not the default: XLA rounds differently, so a spike sitting within
float rounding of its threshold may flip. Speeds are measured by ``bin/bench_engine.py``
(variants ``spiking_rnn``, ``spiking_rnn_tf``, ``spiking_rnn_xla``).

In the TensorFlow loop spike sparsity is not exploited: gathering the rows of W_rec of the
neurons that spiked (or a ``tf.SparseTensor`` product) was measured slower than the dense
product at every spike rate tried, 1-15% per step (``bin/bench_sparse_recurrent.py``): the
gather costs more ops per step, which is what dominates there, and not in the native loop.

Cells that are not kspike cells (or kspike cells whose ``call`` is overridden) and
``unroll=True`` run the generic ``keras.layers.RNN`` loop, so the layer is never silently wrong.

Export: ``tf.custom_gradient`` functions do not survive ``tf.saved_model`` for gradients, which
is why the export path (traced without a tape) is the plain loop: a model with ``SpikingRNN``
exported by ``kspike.export.saved_model`` serves whole sequences, streams with ``step`` (the
cell's own ``call``) and gives gradients through the reloaded ``serve`` like the Keras model
(autodiff of the plain loop, i.e. without the speed-up of the hand-written backward pass).
"""
import math

import keras
import tensorflow as tf

from kspike import dynamics, surrogates
from kspike import native as native_module
from kspike import graph

__all__ = ["SpikingRNN"]


class _Heaviside:
    """The forward value of every kspike spike function (their surrogate term is exactly 0)."""

    def __call__(self, x):
        return surrogates.heaviside(x)


def _in_xla_context():
    """True while tracing inside an XLA-compiled function (e.g. ``model.compile(...,
    jit_compile=True)``): XLA cannot compile the native ops, so the TensorFlow loop runs."""
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # a TensorFlow without these internals: assume no XLA
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def _tape_may_record():
    try:
        from tensorflow.python.eager import record
    except ImportError:  # a TensorFlow without this internal: always keep the fast backward
        return True
    return bool(record.could_possibly_record())


def _is_specialised(cell):
    return graph.is_specialised_cell(cell)


def _forward(cell, params, x, w_in, w_rec, bias, initial, mask, output_all, for_backward):
    """The forward loop: one input matmul, then per step z_{t-1} W_rec and ``neuron_step``.

    Args:
        cell: the kspike cell (its state layout).
        params: ``NeuronParameters`` to step with (their spike function is used as is).
        x: (T, B, n_in) in the compute dtype; w_in (n_in, n), w_rec (n, n) or None in the
            compute dtype; bias (n,) in the state dtype or None.
        initial: list of (B, n) initial states (state dtype, Keras order).
        mask: (T, B, 1) 0/1 in the state dtype, or None.
        output_all: also collect v_t and A_t.
        for_backward: also keep v_t, A_t and the refractory masks for the backward pass.

    Returns:
        (tas, final_states): TensorArrays "z" (size T + 1, the z state entering each step and
        the last one), "v", "A" (ALIF), "allowed" (with refractoriness), "raw_z" (the unmasked
        spikes, with a mask), and the final states in Keras order.
    """
    state_dtype = initial[0].dtype
    compute_dtype = x.dtype
    n = cell.units
    adaptive = cell._adaptive
    refractory = params.n_refractory > 0
    masked = mask is not None
    keep_v = for_backward or output_all
    keep_A = adaptive and (for_backward or output_all)
    keep_allowed = refractory and for_backward
    steps = tf.shape(x)[0]
    batch = tf.shape(x)[1]
    # The input projection of every step as one matmul.
    projected = tf.reshape(tf.matmul(tf.reshape(x, (-1, x.shape[-1])), w_in),
                           (steps, batch, n))
    projected_ta = tf.TensorArray(compute_dtype, size=steps).unstack(projected)
    if masked:
        mask_ta = tf.TensorArray(state_dtype, size=steps).unstack(mask)

    def new_ta(dtype, size=steps):
        return tf.TensorArray(dtype, size=size, element_shape=tf.TensorShape([None, n]))

    # tas["z"][t] is the z state entering step t (tas["z"][0] = z_0): one buffer serves the
    # output sequence, z_{t-1} of the backward pass and dW_rec.
    tas = {"z": new_ta(state_dtype, steps + 1).write(0, cell.pack_state(initial).z)}
    if keep_v:
        tas["v"] = new_ta(state_dtype)
    if keep_A:
        tas["A"] = new_ta(state_dtype)
    if keep_allowed:
        tas["allowed"] = new_ta(tf.bool)
    if masked:
        tas["raw_z"] = new_ta(state_dtype)

    def body(t, state_list, tas):
        state = cell.pack_state(list(state_list))
        current = projected_ta.read(t)
        if w_rec is not None:
            current = current + tf.matmul(tf.cast(state.z, compute_dtype), w_rec)
        current = tf.cast(current, state_dtype)
        if bias is not None:
            current = current + bias
        new_state, A = dynamics.neuron_step(current, state, params)
        tas = dict(tas)
        if keep_v:
            tas["v"] = tas["v"].write(t, new_state.v)
        if keep_A:
            tas["A"] = tas["A"].write(t, A)
        if keep_allowed:
            tas["allowed"] = tas["allowed"].write(
                t, dynamics.refractory_allowed(state.r, params))
        if masked:
            tas["raw_z"] = tas["raw_z"].write(t, new_state.z)
            m = mask_ta.read(t) > 0.5
            new_state = dynamics.NeuronState(*[
                None if new is None else tf.where(m, new, old)
                for new, old in zip(new_state, state)])
        tas["z"] = tas["z"].write(t + 1, new_state.z)
        return t + 1, tuple(cell.unpack_state(new_state)), tas

    _, final, tas = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), tuple(initial), tas))
    return tas, list(final)


def _stacked(tas, names):
    """The TensorArrays ``names`` (those present) of ``_forward`` stacked to (T(+1), B, n)."""
    return {name: tas[name].stack() for name in names if name in tas}


def _raw_outputs(cell, params, stacked, masked, output_all, sequences=True):
    """[z] or [z, v, A] sequences (T, B, n) from the stacked forward buffers ([] when
    ``sequences`` is False), and the stacked z states (T + 1, B, n)."""
    z_states = stacked["z"]
    if not sequences:
        return [], z_states
    z_seq = stacked["raw_z"] if masked else z_states[1:]
    outputs = [z_seq]
    if output_all:
        v_seq = stacked["v"]
        if cell._adaptive:
            A_seq = stacked["A"]
        else:
            A_seq = tf.fill(tf.shape(v_seq), tf.cast(params.thr, v_seq.dtype))
        outputs += [v_seq, A_seq]
    return outputs, z_states


def _stop_gradient(tensor):
    return None if tensor is None else tf.stop_gradient(tensor)


def _compiled(fn, jit_compile):
    """``fn`` itself, or ``fn`` compiled by XLA as one cluster (``jit_compile=True``)."""
    if not jit_compile:
        return fn
    return tf.function(fn, jit_compile=True, autograph=False)


_NATIVE_SURROGATES = {cls.name: cls for cls in (
    surrogates.Rectangular, surrogates.Triangular, surrogates.Exponential, surrogates.Gaussian,
    surrogates.Sigmoid, surrogates.FastSigmoid, surrogates.NTail, surrogates.Cauchy,
    surrogates.MultiGaussian)}


def _native_surrogate_attrs(spike_function):
    """Attributes of the native backward op for a catalogue spike function, or None when the
    function is not one the C++ loop knows (a user subclass keeps the TensorFlow loop)."""
    cls = _NATIVE_SURROGATES.get(getattr(spike_function, "name", None))
    if cls is None or type(spike_function) is not cls:
        return None
    attrs = dict(surrogate=cls.name, dampening=spike_function.dampening,
                 sharpness=spike_function.sharpness,
                 tail=getattr(spike_function, "tail", 2.0), multi_gaussian=[])
    if cls is surrogates.MultiGaussian:
        # The constants of MultiGaussian.pseudo_derivative, formed in double precision as there.
        f = spike_function
        sigma = 0.5 / f.sharpness
        wide = f.scale * sigma
        peak = f._bracket(0.0, math.exp)
        attrs["multi_gaussian"] = [f.dampening / peak, sigma, wide,
                                   sigma * math.sqrt(2.0 * math.pi),
                                   wide * math.sqrt(2.0 * math.pi), 1.0 + f.height, f.height]
    return attrs


def native_applies(cell, state_dtype, compute_dtype, masked, jit_compile=False):
    """True when the native C++ loops can run this layer: a float32 kspike cell (states and
    matmuls) with a catalogue surrogate, no mask, no XLA, and no GPU in the process (the ops
    have CPU kernels only; on a GPU machine the TensorFlow loop stays on the GPU). The answer
    does not say whether the loops are compiled (see ``kspike.native.available``)."""
    return (tf.as_dtype(state_dtype) == tf.float32 and tf.as_dtype(compute_dtype) == tf.float32
            and not masked and not jit_compile
            and _native_surrogate_attrs(cell.spike_function) is not None
            and not tf.config.list_logical_devices("GPU"))


def _neuron_attrs(cell, params):
    refractory = int(params.n_refractory)
    return dict(alpha=float(params.alpha), one_minus_alpha=1.0 - float(params.alpha),
                rho=float(params.rho), one_minus_rho=1.0 - float(params.rho),
                thr=float(params.thr), n_refractory=refractory, adaptive=bool(cell._adaptive))


def _plain_loop(cell, x, w_in, w_rec, bias, states, mask, output_all, sequences=True,
                jit_compile=False):
    """The forward loop with the cell's own spike function, differentiated by TensorFlow.

    Used when no gradient tape is recording (inference, export): no buffers are kept for a
    backward pass, and if the traced function is differentiated later anyway, autodiff of
    these very steps gives the gradients of ``keras.layers.RNN``.
    """
    params = cell.parameters(states[0].dtype)
    masked = mask is not None
    names = ("z", "raw_z", "v", "A") if sequences else ("z",)

    def forward(x, w_in, w_rec, bias, states, mask):
        tas, final_states = _forward(cell, params, x, w_in, w_rec, bias, states, mask,
                                     output_all, for_backward=False)
        return _stacked(tas, names), final_states

    stacked, final_states = _compiled(forward, jit_compile)(x, w_in, w_rec, bias, states, mask)
    outputs, _ = _raw_outputs(cell, params, stacked, masked, output_all, sequences)
    return outputs, list(final_states)


def _native_forward(ops, cell, params, x, w_in, w_rec, bias, initial):
    """The forward loop as one native op (``kspike/native/spiking_ops.cc``).

    Args as ``_forward`` except ``x``: (B, T, n_in), batch-major (float32, no mask). Returns
    the buffers of the backward pass and the final states in Keras order. Buffers: "z"
    (B, T, n), the spikes z_1 .. z_T (the layer's output); time-major "v", "A" (ALIF),
    "allowed" (uint8, with refractoriness), each (T, B, n), and "spike_bits" (T, B, n / 64)
    (the spikes packed for the backward pass); "z0" (B, n), "x" and "sparse_inputs" (a
    boolean scalar: at most a quarter of the inputs are nonzero, so x_t W_in and dW_in add
    the rows of the active inputs instead of dense products).
    """
    n = cell.units
    state = cell.pack_state(initial)
    empty = tf.zeros((0,), tf.float32)
    adaptive = cell._adaptive
    beta = tf.constant(cell.beta_vector, tf.float32) if adaptive else empty
    sparse_inputs = tf.reduce_mean(tf.cast(tf.not_equal(x, 0.0), tf.float32)) <= 0.25
    z, v, A, allowed, spike_bits, v_final, b_final, z_final, r_final = \
        ops.kspike_spiking_forward(
            x=x, sparse_inputs=sparse_inputs, w_in=w_in,
            w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)),
            bias=bias if bias is not None else empty, beta=beta, v0=state.v,
            b0=state.b if adaptive else tf.zeros((0, n)), z0=state.z, r0=state.r,
            recurrent=w_rec is not None, has_bias=bias is not None,
            **_neuron_attrs(cell, params))
    buffers = {"z": z, "z0": state.z, "x": x, "sparse_inputs": sparse_inputs, "v": v,
               "spike_bits": spike_bits}
    if adaptive:
        buffers["A"] = A
    if params.n_refractory > 0:
        buffers["allowed"] = allowed
    final = dynamics.NeuronState(v=v_final, b=b_final if adaptive else None, z=z_final,
                                 r=r_final)
    return buffers, cell.unpack_state(final)


def _native_outputs(cell, params, buffers, output_all, sequences):
    """[z] or [z, v, A] sequences (B, T, n) from ``_native_forward``'s buffers."""
    if not sequences:
        return []
    outputs = [buffers["z"]]
    if output_all:
        v = tf.transpose(buffers["v"], (1, 0, 2))
        A = tf.transpose(buffers["A"], (1, 0, 2)) if cell._adaptive else \
            tf.fill(tf.shape(v), tf.cast(params.thr, v.dtype))
        outputs += [v, A]
    return outputs


def _native_backward(ops, cell, params, buffers, out_grads, g_final, w_rec, w_in):
    """The backward recurrence as one native op.

    Returns (dL/dI_t (T, B, n), dL/dx (B, T, n_in), dL/dW_in, dL/dv_0, dL/db_0 (None for
    LIF), dL/dz_0, dL/dW_rec (None without recurrence)). ``out_grads``: dL/dz_t, dL/dv_t,
    dL/dA_t of the (B, T, n) outputs, or Nones.
    """
    n = cell.units
    adaptive = cell._adaptive
    x = buffers["x"]
    batch = tf.shape(x)[0]
    none_seq = tf.zeros((batch, 0, n))
    gz_out, gv_out, gA_out = [none_seq if g is None else g for g in out_grads]
    beta = tf.constant(cell.beta_vector, tf.float32) if adaptive else tf.zeros((0,))
    none_tm = tf.zeros((0, batch, n))
    g_current, gv0, gb0, gz0, g_w_rec, g_w_in_sparse = ops.kspike_spiking_backward(
        spike_bits=buffers["spike_bits"], z0=buffers["z0"], x=x,
        sparse_inputs=buffers["sparse_inputs"], v=buffers["v"],
        threshold=buffers.get("A", none_tm),
        allowed=buffers.get("allowed", tf.zeros((0, batch, n), tf.uint8)),
        w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)), beta=beta,
        grad_z_out=gz_out, grad_v_out=gv_out, grad_a_out=gA_out, grad_v_final=g_final.v,
        grad_b_final=g_final.b if adaptive else tf.zeros((0, n)), grad_z_final=g_final.z,
        recurrent=w_rec is not None, has_bias=False, **_neuron_attrs(cell, params),
        **_native_surrogate_attrs(params.spike_function))
    g_flat = tf.reshape(g_current, (-1, n))                   # rows in (t, b) order
    x_time_major = tf.transpose(x, (1, 0, 2))
    # Sparse inputs: dW_in was summed in the loop; dense ones: one product over all steps.
    g_w_in = tf.cond(
        buffers["sparse_inputs"], lambda: g_w_in_sparse,
        lambda: tf.matmul(tf.reshape(x_time_major, (-1, x.shape[-1])), g_flat,
                          transpose_a=True))
    g_x = tf.transpose(tf.reshape(tf.matmul(g_flat, w_in, transpose_b=True),
                                  tf.shape(x_time_major)), (1, 0, 2))
    return (g_current, g_x, g_w_in, gv0, gb0 if adaptive else None, gz0,
            g_w_rec if w_rec is not None else None)


def _sequence_loop(cell, x, w_in, w_rec, bias, states, mask, output_all, sequences=True,
                   jit_compile=False, native=None):
    """Forward loop over a whole sequence, with a hand-written gradient.

    Args:
        cell: the kspike cell (its parameters; the weights arrive as tensors so that gradients
            reach whatever they are computed from, e.g. DEEP R magnitudes).
        x: (T, B, n_in) time-major inputs in the matmul (compute) dtype.
        w_in: (n_in, n), w_rec: (n, n) or None, both in the compute dtype; bias: (n,) in the
            state dtype, or None.
        states: list of (B, n) initial states in the state dtype, Keras order.
        mask: (T, B, 1) 0/1 in the state dtype, or None.
        output_all: also return the v_t and A_t sequences.
        sequences: return the per-step outputs (else only the final states, and the backward
            pass skips the per-step output gradients).
        jit_compile: compile the forward loop and the backward loop each with XLA.
        native: the ``kspike.native`` op module to run both loops in C++ (float32, no mask,
            no XLA, a catalogue surrogate: see ``native_applies``), or None. The native
            loops are batch-major: ``x`` is then (B, T, n_in) and the outputs (B, T, n).

    Returns:
        (raw_outputs, final_states): raw_outputs is [z] or [z, v, A], each (T, B, n) in the
        state dtype, the values of every step before masking ([] without ``sequences``);
        final_states in Keras order.
    """
    state_dtype = states[0].dtype
    compute_dtype = x.dtype
    params = cell.parameters(state_dtype)
    # The surrogate term of every kspike spike function is exactly 0 in the forward pass, so
    # the loop runs the plain Heaviside and the backward pass applies psi itself.
    forward_params = params._replace(spike_function=_Heaviside())
    adaptive = cell._adaptive
    refractory = params.n_refractory > 0
    n = cell.units
    has_rec = w_rec is not None
    has_bias = bias is not None
    masked = mask is not None
    # Buffers the backward pass reads per step, and those that form the outputs.
    step_names = ["v", "z"] + (["A"] if adaptive else []) + (["allowed"] if refractory else [])
    output_names = ((["z", "raw_z"] + (["v", "A"] if output_all else [])) if sequences
                    else ["z"])

    inputs = [x, w_in]
    if has_rec:
        inputs.append(w_rec)
    if has_bias:
        inputs.append(bias)
    n_weights = len(inputs)
    inputs.extend(states)
    if masked:
        inputs.append(mask)

    def backward_loop(reads, out_grad_tas, mask_read, g_final_v, gb_final, g_final_z, w_rec_t,
                      steps):
        """The backward recurrence from the last step to the first.

        ``reads``: TensorArrays of the forward buffers ``step_names``; ``out_grad_tas``:
        TensorArrays of dL/dz_t (and dL/dv_t, dL/dA_t with ``output="all"``) or Nones.

        Returns (dL/dI_t stacked (T, B, n), dL/dv_0, dL/db_0, dL/dz_0).
        """
        gz_out_ta, gv_out_ta, gA_out_ta = out_grad_tas

        def back_body(t, gv, gb, gz, g_current_ta):
            # gv, gb, gz: gradients with respect to the state after step t.
            v = reads["v"].read(t)
            A = reads["A"].read(t) if adaptive else params.thr
            z_previous = reads["z"].read(t)
            allowed = reads["allowed"].read(t) if refractory else None
            if masked:
                m = mask_read.read(t)
                keep = 1.0 - m
                gv_new, gz_new = m * gv, m * gz
                gb_new = m * gb if adaptive else None
            else:
                gv_new, gz_new, gb_new = gv, gz, (gb if adaptive else None)
            gA_out = None
            if gz_out_ta is not None:
                gz_new = gz_new + gz_out_ta.read(t)
            if gv_out_ta is not None:
                gv_new = gv_new + gv_out_ta.read(t)
            if gA_out_ta is not None:
                gA_out = gA_out_ta.read(t)
            g_current, gv_prev, gb_prev, gz_prev = dynamics.neuron_step_vjp(
                gz_new, gv_new, gb_new, gA_out, v, A, z_previous, params, allowed)
            if has_rec:
                g_rec = tf.matmul(tf.cast(g_current, compute_dtype), w_rec_t)
                gz_prev = gz_prev + tf.cast(g_rec, state_dtype)
            if masked:
                gv_prev = gv_prev + keep * gv
                gz_prev = gz_prev + keep * gz
                if adaptive:
                    gb_prev = gb_prev + keep * gb
            if not adaptive:
                gb_prev = gb
            return t - 1, gv_prev, gb_prev, gz_prev, g_current_ta.write(t, g_current)

        _, gv0, gb0, gz0, g_current_ta = tf.while_loop(
            lambda t, *_: t >= 0, back_body,
            (steps - 1, g_final_v, gb_final, g_final_z,
             tf.TensorArray(state_dtype, size=steps)))
        return g_current_ta.stack(), gv0, gb0, gz0

    def unstack(tensor, dtype=state_dtype):
        return tf.TensorArray(dtype, size=tf.shape(tensor)[0]).unstack(tensor)

    def compiled_backward(stacked, out_grads, mask, g_final_v, gb_final, g_final_z, w_rec_t):
        # Inside the XLA cluster the TensorArrays are slices of the stacked buffers.
        reads = {name: unstack(stacked[name], stacked[name].dtype) for name in step_names}
        out_grad_tas = [None if g is None else unstack(g) for g in out_grads]
        mask_read = unstack(mask) if mask is not None else None
        steps = tf.shape(stacked["v"])[0]
        return backward_loop(reads, out_grad_tas, mask_read, g_final_v, gb_final, g_final_z,
                             w_rec_t, steps)

    @tf.custom_gradient
    def run(*args):
        x, w_in = args[0], args[1]
        w_rec = args[2] if has_rec else None
        bias = args[2 + int(has_rec)] if has_bias else None
        initial = list(args[n_weights:n_weights + len(states)])
        mask = args[-1] if masked else None
        initial_state = cell.pack_state(initial)
        steps = tf.shape(x)[1] if native is not None else tf.shape(x)[0]
        tas = None
        if native is not None:
            stacked, final_states = _native_forward(native, cell, params, x, w_in, w_rec, bias,
                                                    initial)
        elif jit_compile:
            def forward(x, w_in, w_rec, bias, initial, mask):
                tas, final_states = _forward(cell, forward_params, x, w_in, w_rec, bias,
                                             initial, mask, output_all, for_backward=True)
                return _stacked(tas, set(step_names + output_names)), final_states

            # The gradient is grad_fn's: stop_gradient keeps an eager tape from recording the
            # compiled call (it would ask XLA for a differentiable while loop, which fails).
            stacked, final_states = _compiled(forward, True)(*tf.nest.map_structure(
                _stop_gradient, (x, w_in, w_rec, bias, initial, mask)))
            final_states = list(final_states)
        else:
            tas, final_states = _forward(cell, forward_params, x, w_in, w_rec, bias, initial,
                                         mask, output_all, for_backward=True)
            stacked = _stacked(tas, output_names)
        if native is not None:
            outputs, z_states = _native_outputs(cell, params, stacked, output_all,
                                                sequences), None
        else:
            outputs, z_states = _raw_outputs(cell, params, stacked, masked, output_all,
                                             sequences)

        def grad_fn(*grads):
            n_out = len(outputs)
            out_grads = [tf.zeros_like(o) if g is None else g
                         for g, o in zip(grads[:n_out], outputs)]
            g_final = cell.pack_state([tf.zeros_like(s) if g is None else g
                                       for g, s in zip(grads[n_out:], final_states)])
            # dL/dz_t, dL/dv_t, dL/dA_t of the per-step outputs (None where there are none).
            out_grads = (out_grads + [None, None, None])[:3]
            if not adaptive:
                out_grads[2] = None
            # W_rec^T once: a transposed operand makes every per-step product slower.
            w_rec_t = tf.transpose(w_rec) if has_rec and native is None else None
            gb_final = g_final.b if adaptive else tf.zeros((), state_dtype)
            g_w_rec = g_w_in = g_x = None
            if native is not None:
                g_current, g_x, g_w_in, gv0, gb0, gz0, g_w_rec = _native_backward(
                    native, cell, params, stacked, out_grads, g_final, w_rec, w_in)
            elif jit_compile:
                g_current, gv0, gb0, gz0 = _compiled(compiled_backward, True)(
                    *tf.nest.map_structure(_stop_gradient, (
                        {name: stacked[name] for name in step_names}, out_grads, mask,
                        g_final.v, gb_final, g_final.z, w_rec_t)))
            else:
                out_grad_tas = [None if g is None else unstack(g) for g in out_grads]
                mask_read = unstack(mask) if masked else None
                g_current, gv0, gb0, gz0 = backward_loop(
                    tas, out_grad_tas, mask_read, g_final.v, gb_final, g_final.z, w_rec_t,
                    steps)
            if native is None:
                g_matmul = tf.reshape(tf.cast(g_current, compute_dtype), (-1, n))
                x_flat = tf.reshape(x, (-1, x.shape[-1]))
                # Weight gradients as matmuls over all T steps at once.
                g_w_in = tf.matmul(x_flat, g_matmul, transpose_a=True)
                g_x = tf.reshape(tf.matmul(g_matmul, w_in, transpose_b=True), tf.shape(x))
            result = [g_x, g_w_in]
            if has_rec:
                if g_w_rec is None:
                    z_previous_flat = tf.reshape(tf.cast(z_states[:-1], compute_dtype), (-1, n))
                    g_w_rec = tf.matmul(z_previous_flat, g_matmul, transpose_a=True)
                result.append(g_w_rec)
            if has_bias:
                result.append(tf.reduce_sum(g_current, axis=(0, 1)))
            # The refractory counter carries a gradient only to itself: r_t = r_{t-1} - 1
            # until it reaches 0 or the neuron spikes, so with a refractory period the chain
            # over the T' unmasked steps is unbroken exactly when r_0 >= T' (the neuron is then
            # refractory throughout and cannot spike); without one, r is constant.
            g_r = g_final.r
            if refractory:
                if masked:
                    active_steps = tf.reduce_sum(mask, axis=0)
                else:
                    active_steps = tf.cast(steps, state_dtype)
                g_r = g_r * tf.cast(initial_state.r >= active_steps, state_dtype)
            result += cell.unpack_state(dynamics.NeuronState(
                v=gv0, b=gb0 if adaptive else None, z=gz0, r=g_r))
            if masked:
                result.append(tf.zeros_like(mask))
            return result

        return tuple(outputs) + tuple(final_states), grad_fn

    results = run(*inputs)
    n_out = (3 if output_all else 1) if sequences else 0
    return list(results[:n_out]), list(results[n_out:])


@keras.saving.register_keras_serializable(package="kspike")
class SpikingRNN(keras.layers.RNN):
    """Recurrent layer for kspike cells: ``keras.layers.RNN`` outputs and gradients, faster.

    Same constructor, call signature, outputs and behaviour as ``keras.layers.RNN`` (see its
    documentation for ``return_sequences``, ``return_state``, ``go_backwards``, ``stateful``,
    ``zero_output_for_mask``, ``initial_state`` and ``mask``). For a ``kspike.LIF`` or
    ``kspike.ALIF`` cell (every option: refractoriness, LIF/ALIF mixes, any surrogate, no
    recurrence, bias, ``output="all"``, DEEP R kernels) it runs a specialised loop with a
    hand-written backward pass (see ``kspike.engine``): the outputs equal those of
    ``keras.layers.RNN(cell)`` (spikes identical) and the gradients with respect to inputs,
    weights and initial states agree to float rounding. Any other cell, or ``unroll=True``,
    runs the generic ``keras.layers.RNN`` loop.

    Args:
        cell: a ``kspike.LIF`` / ``kspike.ALIF`` (or any Keras RNN cell, run generically).
        return_sequences: return the whole output sequence (B, T, output_size) instead of
            the last output (B, output_size).
        return_state: also return the final states (a list of (B, units) tensors).
        go_backwards: process the sequence in reverse order (outputs in processing order).
        stateful: keep the final states of a batch as initial states of the next one.
        unroll: use the generic, unrolled ``keras.layers.RNN`` loop.
        zero_output_for_mask: output zeros (rather than the previous output) at masked steps.
        jit_compile: compile the TensorFlow forward loop and hand-written backward loop with
            XLA (each as one cluster; the rest of the model is untouched), instead of the
            native loops. On the 2-core CPU of ``bin/bench_engine.py`` this is ~1.1-1.3x
            faster than the TensorFlow loop but slower than the native loops; it is the
            fast option where those do not apply (e.g. masks). XLA rounds differently, so a
            few spikes near threshold can differ from the default loop (and from
            ``keras.layers.RNN``): off by default. Unlike ``jit_compile`` on a whole
            ``keras.layers.RNN`` training step (which XLA differentiates itself and which
            was ~15x slower on CPU), only kspike's own loops are compiled here.
        native: run the training loops in C++ (``kspike.native``, compiled on first use):
            "auto" (default) where they apply (float32 states and matmuls, no mask, no XLA,
            a catalogue surrogate, a CPU-only process) and compile, else the TensorFlow
            loop; True to require
            them (a clear error where they cannot run); False for the TensorFlow loop only.
            Both give the same spikes and gradients to float32 rounding (the native loop
            sums the recurrent products over the neurons that spiked, in another order).

    Call arguments:
        sequences: (B, T, n_in) inputs; one time step is ``cell.dt`` ms.
        initial_state: optional list of (B, units) tensors in ``cell.state_names`` order.
        mask: optional (B, T) boolean mask; masked steps keep the states unchanged.
        training: passed for API compatibility (spiking cells behave the same).

    Under a gradient tape the backward pass is a hand-written ``tf.custom_gradient`` around
    the whole sequence; without one (inference, export) the plain loop runs, so a SavedModel
    written by ``kspike.export`` serves and streams, and TensorFlow differentiates its
    ``serve`` function by autodiff (correct gradients, generic speed).

    Example:

    >>> import keras, kspike
    >>> cell = kspike.ALIF(256, n_adaptive=128, n_refractory=5)
    >>> model = keras.Sequential([keras.Input((784, 80)),
    ...                           kspike.SpikingRNN(cell, return_sequences=True),
    ...                           kspike.LeakyReadout(10)])
    """

    def __init__(self, cell, return_sequences=False, return_state=False, go_backwards=False,
                 stateful=False, unroll=False, zero_output_for_mask=False, jit_compile=False,
                 native="auto", **kwargs):
        for name, value in (("return_sequences", return_sequences),
                            ("jit_compile", jit_compile),
                            ("return_state", return_state), ("go_backwards", go_backwards),
                            ("stateful", stateful), ("unroll", unroll),
                            ("zero_output_for_mask", zero_output_for_mask)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, received {value!r} of type "
                                f"{type(value).__name__}.")
        if not isinstance(native, bool) and not (isinstance(native, str) and native == "auto"):
            raise ValueError(f"`native` must be 'auto', True or False, received {native!r}.")
        if isinstance(cell, (list, tuple)):
            raise TypeError("kspike.SpikingRNN takes one cell, received a list of "
                            f"{len(cell)} cells; stack SpikingRNN layers instead.")
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=unroll,
                         zero_output_for_mask=zero_output_for_mask, **kwargs)
        self.jit_compile = jit_compile
        self.native = native

    def get_config(self):
        config = super().get_config()
        config["jit_compile"] = self.jit_compile
        config["native"] = self.native
        return config

    def _native_ops(self, state_dtype, compute_dtype, masked):
        """The native op module when this call runs the C++ loops, else None."""
        if self.native is False:
            return None
        applies = native_applies(self.cell, state_dtype, compute_dtype, masked,
                                 self.jit_compile or _in_xla_context())
        ops = native_module.load() if applies else None
        if self.native is True and ops is None:
            reason = ("the native loops did not load (see the warning above, or KSPIKE_NATIVE)"
                      if applies else "they run float32 layers without a mask or XLA (also "
                      "not inside an XLA-compiled function such as compile(jit_compile=True)), "
                      "with a catalogue surrogate, in a process without GPUs")
            raise ValueError(f"SpikingRNN(native=True) cannot run the native loops for this "
                             f"call: {reason}. Use native='auto' to fall back to the "
                             f"TensorFlow loop.")
        return ops

    @property
    def specialised(self):
        """True when the fast kspike loop runs (a kspike cell and ``unroll=False``)."""
        return _is_specialised(self.cell) and not self.unroll

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not self.specialised:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        cell = self.cell
        sequences = tf.convert_to_tensor(sequences)
        if sequences.shape.rank != 3:
            raise ValueError(f"SpikingRNN expects inputs of shape (batch, time, features), "
                             f"received shape {tuple(sequences.shape)}.")
        if sequences.shape[-1] is not None and sequences.shape[-1] != cell.input_dim:
            raise ValueError(f"SpikingRNN: the cell was built for {cell.input_dim} input "
                             f"features, received inputs of shape {tuple(sequences.shape)}.")
        states = list(initial_state) if isinstance(initial_state, (list, tuple)) \
            else [initial_state]
        cell._check_states(states)
        state_dtype = cell.state_dtype
        compute_dtype = keras.backend.standardize_dtype(cell.dtype_policy.compute_dtype)
        states = [tf.cast(s, state_dtype) for s in states]
        w_in, w_rec, bias = cell.effective_kernels(compute_dtype)
        w_in = tf.convert_to_tensor(w_in)
        if w_rec is not None:
            w_rec = tf.convert_to_tensor(w_rec)
        if bias is not None:
            bias = tf.cast(bias, state_dtype)
        output_all = cell.output_mode == "all"
        sequences_in = sequences
        # Without return_sequences (and mask) the last output is read from the final states,
        # so no per-step output (nor its gradient) is materialised.
        sequences = self.return_sequences or mask is not None
        # The hand-written backward pass pays off only under a gradient tape; otherwise
        # (inference, SavedModel export) the plain loop keeps no buffers, exports, and stays
        # differentiable by TensorFlow if its traced graph is differentiated later.
        native = self._native_ops(state_dtype, compute_dtype, mask is not None) \
            if _tape_may_record() else None
        if native is not None:
            # The native loops are batch-major, like Keras' inputs and outputs.
            x = tf.cast(sequences_in, compute_dtype)
            if self.go_backwards:
                x = tf.reverse(x, [1])
            raw, final_states = _sequence_loop(cell, x, w_in, w_rec, bias, states, None,
                                               output_all, sequences, native=native)
            time_axis = 1
        else:
            x = tf.transpose(tf.cast(sequences_in, compute_dtype), (1, 0, 2))   # (T, B, n_in)
            if mask is not None:
                mask = tf.convert_to_tensor(mask)
                if mask.shape.rank == 3:
                    mask = mask[..., 0]
                mask = tf.transpose(tf.cast(mask, state_dtype), (1, 0))[..., None]   # (T, B, 1)
            if self.go_backwards:
                x = tf.reverse(x, [0])
                if mask is not None:
                    mask = tf.reverse(mask, [0])
            loop = _sequence_loop if _tape_may_record() else _plain_loop
            raw, final_states = loop(cell, x, w_in, w_rec, bias, states, mask, output_all,
                                     sequences, jit_compile=self.jit_compile)
            time_axis = 0
        if not sequences:
            final = cell.pack_state(final_states)
            last_output = final.z
            if output_all:
                A = dynamics.threshold(final.b, cell.parameters(state_dtype))
                A = tf.broadcast_to(tf.cast(A, state_dtype), tf.shape(final.v))
                last_output = tf.concat([final.z, final.v, A], axis=-1)
            last_output = tf.cast(last_output, compute_dtype)
            return last_output, last_output[:, None], final_states
        outputs = raw[0] if len(raw) == 1 else tf.concat(raw, axis=-1)      # (T, B, out)
        if time_axis == 1:                                                  # (B, T, out)
            outputs = tf.cast(outputs, compute_dtype)
            last_output = outputs[:, -1]
            if not self.return_sequences:
                outputs = last_output[:, None]
            return last_output, outputs, final_states
        if mask is not None:
            outputs = _mask_outputs(outputs, mask, self.zero_output_for_mask)
        outputs = tf.cast(outputs, compute_dtype)
        last_output = outputs[-1]
        if self.return_sequences:
            outputs = tf.transpose(outputs, (1, 0, 2))
        else:
            outputs = last_output[:, None]
        return last_output, outputs, final_states


def _mask_outputs(outputs, mask, zero_output_for_mask):
    """Outputs at masked steps as ``keras.layers.RNN``: zeros, or the last unmasked output
    (zeros before the first one). outputs (T, B, F), mask (T, B, 1) 0/1."""
    if zero_output_for_mask:
        return outputs * tf.cast(mask, outputs.dtype)
    steps = tf.shape(mask)[0]
    index = tf.range(steps)[:, None]
    unmasked = mask[..., 0] > 0.5
    last = tf.scan(tf.maximum, tf.where(unmasked, index, -1))               # (T, B)
    gathered = tf.gather(tf.transpose(outputs, (1, 0, 2)), tf.transpose(tf.maximum(last, 0)),
                         batch_dims=1)                                      # (B, T, F)
    gathered = tf.transpose(gathered, (1, 0, 2))
    return gathered * tf.cast(last >= 0, outputs.dtype)[..., None]
