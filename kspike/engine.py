"""``kspike.SpikingRNN``: a drop-in for ``keras.layers.RNN`` specialised for kspike cells.

``keras.layers.RNN(cell)`` calls the cell once per time step and lets TensorFlow differentiate
the whole loop: T small input products, the surrogate expressions in every step and every
intermediate kept for the backward pass. ``SpikingRNN`` computes the same outputs and the same
gradients (up to float rounding; spikes are identical) inside one ``tf.custom_gradient`` around
the whole sequence, with a hand-written backward recurrence (``kspike.dynamics.neuron_step_vjp``,
equations in docs/neurons.md) that stores per step only v_t, A_t (ALIF) and the refractory mask.

The loops of one call are run by a backend, an object with two methods:

- ``forward(inputs) -> (buffers, outputs, final_states)``: the forward loop over the whole
  sequence; ``buffers`` is whatever its backward pass reads;
- ``backward(buffers, out_grads, g_final, inputs) -> gradients``: the backward recurrence from
  the upstream gradients of the outputs and final states to dL/dI_t, dL/dx, dL/dW_in,
  dL/dW_rec and dL/d(initial v, b, z).

There are three backends, and one custom gradient (``_sequence_loop``) shared by all of them
(bias and refractory-counter gradients, argument order). ``_select_backend`` is the one place
that decides which backend runs a call:

- native (``kspike.native``): the forward and backward time loops are two C++ TensorFlow ops,
  compiled against the installed TensorFlow on first use. Per step they do a few fused passes
  over (B, n) arrays instead of ~30 TensorFlow ops, and use the sparsity of spikes: z_{t-1}
  W_rec and dW_rec = sum_t z_{t-1}^T dI_t add the rows of the neurons that spiked (B * spikes
  * n work instead of B * n * n), and so do x_t W_in and dW_in when at most a quarter of the
  inputs are nonzero (spike inputs); the backward product dI_t W_rec^T adds the rows of the
  neurons whose pseudo-derivative term is nonzero (compact surrogates: most neurons are far
  from threshold; docs/engine.md), else it is a register-blocked dense kernel; the batch is
  split into one shard per intra-op thread. The
  element-wise updates are written in TensorFlow's order and round as TensorFlow's; the
  products sum in another order (differences of float rounding only). Batch-major.
- TensorFlow: the input projection of all T steps as one matmul before a ``tf.while_loop``
  whose step is the recurrent product and ``kspike.dynamics.neuron_step`` with the plain
  Heaviside (the surrogate term is exactly zero in the forward pass, see docs/surrogates.md);
  dW_in and dW_rec as matmuls over all steps after the backward loop. Time-major.
- XLA (``jit_compile=True``): the TensorFlow loops, the forward and the backward loop each
  compiled as one XLA cluster. XLA rounds differently, so a spike sitting within float
  rounding of its threshold may flip: not the default.

Dispatch: native where it applies (``native="auto"``, the default:
float32 states and matmuls, no mask, no XLA, a catalogue surrogate, no GPU in the process, and
the C++ loops compile; ``native=True`` raises a ValueError naming the condition that failed),
else XLA with ``jit_compile=True``, else TensorFlow. Without a gradient tape (inference) only
the forward loop runs (``_plain_loop``) and keeps no buffers, and the native forward runs
only eagerly and in the functions Keras builds for fit / evaluate / predict and kspike's
Trainer for its evaluation, which are never exported (``compat.native_inference_allowed``);
in every other traced function (``kspike.export``, ``model.export``, ``tf.saved_model.save``,
a user's ``tf.function``) the TensorFlow (or XLA) forward loop runs with the cell's own spike
function. TensorFlow can still differentiate that loop, with the gradients of
``keras.layers.RNN``, should the traced function be differentiated later, and no native op
enters an exported graph: a SavedModel of a ``SpikingRNN`` model loads and runs without
kspike. Speeds are measured by
``bin/bench_engine.py`` (variants ``spiking_rnn``, ``spiking_rnn_tf``, ``spiking_rnn_xla``);
the rules and guarantees are in docs/engine.md.

In the TensorFlow loop spike sparsity is not exploited: gathering the rows of W_rec of the
neurons that spiked (or a ``tf.SparseTensor`` product) was measured slower than the dense
product at every spike rate tried, 1-15% per step (``bin/bench_sparse_recurrent.py``): the
gather costs more ops per step, which is what dominates there, and not in the native loop.

Cells with synaptic delays (``n_delay`` > 1) run a native backend of their own
(``_NativeDelayedBackend``: the future-current buffer as a ring per batch row inside the C++
loops, read from and written back to the ``i_future`` state) where the native loops apply;
elsewhere, like cells that are not kspike cells (or kspike cells whose ``call`` is overridden)
and ``unroll=True``, they run the generic ``keras.layers.RNN`` loop, so the layer is never
silently wrong.

Export: ``tf.custom_gradient`` functions do not survive ``tf.saved_model`` for gradients, which
is why the export path (traced without a tape) is the plain TensorFlow loop: a model with ``SpikingRNN``
exported by ``kspike.export.saved_model`` serves whole sequences, streams with ``step`` (the
cell's own ``call``) and gives gradients through the reloaded ``serve`` like the Keras model
(autodiff of the plain loop, i.e. without the speed-up of the hand-written backward pass).

Example: the native loops do not run masked sequences, so a masked call runs TensorFlow's.

>>> import kspike
>>> cell = kspike.ALIF(8, n_refractory=2)
>>> kspike.engine.native_applies(cell, "float32", "float32", masked=True)
False
>>> kspike.engine.why_not_native(cell, "float64", "float64", masked=False)
'the state dtype is float64 (they run float32 only)'
"""
import collections
import math

import keras
import tensorflow as tf

from kspike import dynamics, surrogates
from kspike import native as native_module
from kspike import compat, graph

__all__ = ["SpikingRNN"]


class _Heaviside:
    """The forward value of every kspike spike function (their surrogate term is exactly 0)."""

    def __call__(self, x):
        return surrogates.heaviside(x)


def _is_specialised(cell):
    return graph.is_specialised_cell(cell)


def _is_adaptive(cell):
    """True for cells with an adaptation state b (ALIF), whose threshold is A_t."""
    return "b" in cell.state_names


# The tensors a backend runs on. x: (T, B, n_in) for time-major backends, (B, T, n_in) for the
# native one, in the compute dtype; w_in (n_in, n) and w_rec (n, n) or None in the compute
# dtype; bias (n,) or None and the list of (B, n) initial states (Keras order) in the state
# dtype; mask (T, B, 1) 0/1 in the state dtype, or None.
_LoopInputs = collections.namedtuple("_LoopInputs", "x w_in w_rec bias initial mask")

# What a backend's backward pass returns: dL/dI_t (T, B, n) (time-major for every backend),
# dL/dx (the layout of x), dL/dW_in, dL/dW_rec (None without recurrence) and dL/d of the
# initial v, b (None for LIF) and z.
# buffer0: dL/d(initial i_future) of a delayed cell (None otherwise).
_LoopGradients = collections.namedtuple("_LoopGradients", "current x w_in w_rec v0 b0 z0 buffer0",
                                        defaults=(None,))


def _flatten(inputs):
    """The arguments of the custom gradient: x, w_in, [w_rec], [bias], *initial, [mask]."""
    present = [t for t in (inputs.x, inputs.w_in, inputs.w_rec, inputs.bias) if t is not None]
    return present + list(inputs.initial) + ([] if inputs.mask is None else [inputs.mask])


def _unflatten(template, args):
    """``_LoopInputs`` of the tensors ``args`` laid out as ``_flatten(template)``."""
    args = iter(args)
    x, w_in = next(args), next(args)
    w_rec = next(args) if template.w_rec is not None else None
    bias = next(args) if template.bias is not None else None
    initial = [next(args) for _ in template.initial]
    mask = next(args) if template.mask is not None else None
    return _LoopInputs(x, w_in, w_rec, bias, initial, mask)


def _forward_buffers(cell, params, initial, steps, masked, output_all, for_backward):
    """The empty TensorArrays of ``_forward`` (see its Returns)."""
    n = cell.units
    state_dtype = initial[0].dtype

    def new_ta(dtype, size=steps):
        return tf.TensorArray(dtype, size=size, element_shape=tf.TensorShape([None, n]))

    keep_v = for_backward or output_all
    # tas["z"][t] is the z state entering step t (tas["z"][0] = z_0): one buffer serves the
    # output sequence, z_{t-1} of the backward pass and dW_rec.
    tas = {"z": new_ta(state_dtype, steps + 1).write(0, cell.pack_state(initial).z)}
    for name, keep in (("v", keep_v), ("A", keep_v and _is_adaptive(cell)), ("raw_z", masked)):
        if keep:
            tas[name] = new_ta(state_dtype)
    if for_backward and params.n_refractory > 0:
        tas["allowed"] = new_ta(tf.bool)
    return tas


def _forward(cell, params, x, w_in, w_rec, bias, initial, mask, output_all, for_backward):
    """The forward loop: one input matmul, then per step z_{t-1} W_rec and ``neuron_step``.

    Args:
        cell: the kspike cell (its state layout).
        params: ``NeuronParameters`` to step with (their spike function is used as is).
        x, w_in, w_rec, bias, initial, mask: as the fields of ``_LoopInputs`` (time-major).
        output_all: also collect v_t and A_t.
        for_backward: also keep v_t, A_t and the refractory masks for the backward pass.

    Returns:
        (tas, final_states): TensorArrays "z" (size T + 1, the z state entering each step and
        the last one), "v", "A" (ALIF), "allowed" (with refractoriness), "raw_z" (the unmasked
        spikes, with a mask), and the final states in Keras order.
    """
    state_dtype = initial[0].dtype
    compute_dtype = x.dtype
    steps = tf.shape(x)[0]
    # The input projection of every step as one matmul.
    projected = tf.reshape(tf.matmul(tf.reshape(x, (-1, x.shape[-1])), w_in),
                           (steps, tf.shape(x)[1], cell.units))
    projected_ta = tf.TensorArray(compute_dtype, size=steps).unstack(projected)
    mask_ta = None if mask is None else tf.TensorArray(state_dtype, size=steps).unstack(mask)
    tas = _forward_buffers(cell, params, initial, steps, mask is not None, output_all,
                           for_backward)

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
        for name, value in (("v", new_state.v), ("A", A), ("raw_z", new_state.z)):
            if name in tas:
                tas[name] = tas[name].write(t, value)
        if "allowed" in tas:
            tas["allowed"] = tas["allowed"].write(t, dynamics.refractory_allowed(state.r, params))
        if mask_ta is not None:
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


def _output_sequences(params, z, v, A, output_all):
    """[z] or [z, v, A] (``output_all``), each (T, B, n) or (B, T, n); ``A`` None (LIF
    neurons only): the constant threshold."""
    if not output_all:
        return [z]
    if A is None:
        A = tf.fill(tf.shape(v), tf.cast(params.thr, v.dtype))
    return [z, v, A]


def _raw_outputs(params, stacked, masked, output_all, sequences=True):
    """[z] or [z, v, A] sequences (T, B, n) from the stacked forward buffers ([] when
    ``sequences`` is False), and the stacked z states (T + 1, B, n)."""
    z_states = stacked["z"]
    if not sequences:
        return [], z_states
    z_seq = stacked["raw_z"] if masked else z_states[1:]
    return _output_sequences(params, z_seq, stacked.get("v"), stacked.get("A"),
                             output_all), z_states


def _stop_gradient(tensor):
    return None if tensor is None else tf.stop_gradient(tensor)


def _compiled(fn, jit_compile):
    """``fn`` itself, or ``fn`` compiled by XLA as one cluster (``jit_compile=True``)."""
    if not jit_compile:
        return fn
    return tf.function(fn, jit_compile=True, autograph=False)


def _unstack(tensor):
    return tf.TensorArray(tensor.dtype, size=tf.shape(tensor)[0]).unstack(tensor)


_NATIVE_SURROGATES = {cls.name: cls for cls in (
    surrogates.Rectangular, surrogates.Triangular, surrogates.Exponential, surrogates.Gaussian,
    surrogates.Sigmoid, surrogates.FastSigmoid, surrogates.NTail, surrogates.Cauchy,
    surrogates.MultiGaussian)}


def native_surrogate_attrs(spike_function):
    """Attributes of the native backward ops for a catalogue spike function, or None when the
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
        peak = f.unnormalised(0.0, math.exp)
        attrs["multi_gaussian"] = [f.dampening / peak, sigma, wide,
                                   sigma * math.sqrt(2.0 * math.pi),
                                   wide * math.sqrt(2.0 * math.pi), 1.0 + f.height, f.height]
    return attrs


_native_surrogate_attrs = native_surrogate_attrs


def why_not_native(cell, state_dtype, compute_dtype, masked, jit_compile=False,
                   xla_context=False):
    """Why the native C++ loops cannot run this layer, or None when they can.

    They run a float32 kspike cell (states and matmuls) with a catalogue surrogate, without a
    mask, outside XLA (``jit_compile`` here or an enclosing XLA-compiled function,
    ``xla_context``), in a process without GPUs (the ops have CPU kernels only; on a GPU
    machine the TensorFlow loop stays on the GPU). The answer names the first condition that
    fails, with its value; it does not say whether the loops compile (see
    ``kspike.native.unavailable_reason``). See docs/engine.md.
    """
    for role, dtype in (("state dtype", state_dtype), ("compute dtype of the matmuls",
                                                       compute_dtype)):
        if tf.as_dtype(dtype) != tf.float32:
            return f"the {role} is {tf.as_dtype(dtype).name} (they run float32 only)"
    if masked:
        return "a mask was given (they run unmasked sequences only)"
    if jit_compile:
        return "jit_compile=True (XLA cannot compile the native ops)"
    if xla_context:
        return ("the call is traced inside an XLA-compiled function, e.g. "
                "compile(jit_compile=True) (XLA cannot compile the native ops)")
    spike_function = cell.spike_function
    if _native_surrogate_attrs(spike_function) is None:
        return (f"the surrogate {spike_function!r} of type {type(spike_function).__name__} is "
                f"not a catalogue class of kspike.surrogates (they know no other "
                f"pseudo-derivative)")
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return (f"the process has {len(gpus)} GPU(s) ({', '.join(d.name for d in gpus)}) and "
                f"the native ops have CPU kernels only")
    return None


def native_applies(cell, state_dtype, compute_dtype, masked, jit_compile=False):
    """True when the native C++ loops can run this layer (``why_not_native`` finds nothing);
    ``jit_compile``: XLA compiles the call. The answer does not say whether the loops are
    compiled (see ``kspike.native.available``)."""
    return why_not_native(cell, state_dtype, compute_dtype, masked, jit_compile) is None


def _load_native(cell, native, state_dtype, compute_dtype, masked, jit_compile):
    """The native op module when this call runs the C++ loops, else None.

    ``native``: "auto" (where they apply and load), True (raise a ValueError naming the
    condition that failed when they cannot run) or False (never).
    """
    if native is False:
        return None
    reason = why_not_native(cell, state_dtype, compute_dtype, masked, jit_compile,
                            compat.in_xla_context())
    ops = native_module.load() if reason is None else None
    if native is True and ops is None:
        reason = reason or native_module.unavailable_reason()
        raise ValueError(f"SpikingRNN(native=True) cannot run the native loops for this "
                         f"call: {reason}. Use native='auto' to fall back to the "
                         f"TensorFlow loop.")
    return ops


def forward_sequences(cell, x, w_in, w_rec, bias, initial, native="auto", spikes_only=False):
    """One forward pass of a LIF/ALIF layer for the local rules, returning time-major
    sequences: ``z`` (T, B, n), ``z0`` (B, n), ``v`` (T, B, n), ``A`` (T, B, n) or None for
    LIF cells, ``allowed`` (T, B, n) refractory mask or None, and ``final``, the cell's state
    list after the last step (the start of a following chunk of the same sequence).

    ``x`` is (B, T, n_in); ``initial`` the cell's state list to start from (its initial
    state, or where an earlier chunk ended). The native C++ forward loop runs where it
    applies (``native`` as in ``SpikingRNN``), else the TensorFlow loop. ``spikes_only``:
    only ``z``, ``z0`` and ``final`` are returned (the native op then writes no other
    sequence; ``v``, ``A`` and ``allowed`` are None).
    """
    dtype = x.dtype
    params = cell.parameters(dtype)
    ops = _load_native(cell, "auto" if native is True else native, dtype, dtype, False, False)
    if ops is not None and spikes_only:
        buffers, _, final = _NativeBackend(ops, cell, params, False, True,
                                           for_backward=False).forward(
            _LoopInputs(x, w_in, w_rec, bias, initial, None))
        return {"z": tf.transpose(buffers["z"], (1, 0, 2)), "z0": buffers["z0"], "v": None,
                "A": None, "allowed": None, "final": list(final)}
    if ops is not None:
        # The sequences the rules read, without the packed spikes of the native backward op.
        buffers, _, final = _NativeBackend(ops, cell, params, False, True,
                                           packed_spikes=False).forward(
            _LoopInputs(x, w_in, w_rec, bias, initial, None))
        z = tf.transpose(buffers["z"], (1, 0, 2))
        return {"z": z, "z0": buffers["z0"], "v": buffers["v"], "A": buffers.get("A"),
                "allowed": buffers.get("allowed"), "final": list(final)}
    buffers, _, final = _TensorFlowBackend(cell, params, False, True).forward(
        _LoopInputs(tf.transpose(x, (1, 0, 2)), w_in, w_rec, bias, initial, None))
    reads, z_states = buffers["reads"], buffers["z"]
    return {"z": z_states[1:], "z0": z_states[0], "v": reads["v"].stack(),
            "A": reads["A"].stack() if "A" in reads else None,
            "allowed": reads["allowed"].stack() if "allowed" in reads else None,
            "final": list(final)}


def native_rule_ops(dtype):
    """The op module for the local rules' native helper ops (``KspikeLinearFilter``,
    ``KspikeSparseTransposeProduct``, ``KspikeStllrModulation``) in ``dtype``, or None
    (use TensorFlow's ops): None outside CPU-only processes, inside XLA, for dtypes other
    than float32/float64, and where the native library does not load."""
    if tf.as_dtype(dtype) not in (tf.float32, tf.float64) or compat.in_xla_context():
        return None
    if tf.config.list_logical_devices("GPU"):
        return None
    return native_module.load()


def _scan_filter(seq, decay, gain, initial, reverse):
    if gain == 1.0:
        step = lambda carry, s: decay * carry + s
    else:
        step = lambda carry, s: decay * carry + gain * s
    return tf.scan(step, seq, initializer=initial, reverse=reverse)


def linear_filter(seq, decay, gain=1.0, initial=None, reverse=False, native="auto"):
    """y_t = decay y_{t-1} + gain s_t over the first (time) axis of ``seq`` (S, ...), from
    y_{-1} = ``initial`` (default zeros); ``reverse=True`` runs backward in time, y_t =
    decay y_{t+1} + gain s_t from y_S = ``initial``. Returns y, shaped like ``seq``.

    The exponential filters of the local rules (traces, the readout filter moved onto the
    learning signal). ``decay`` and ``gain`` are Python numbers. Where the native library
    loads (CPU, float32/float64, outside XLA; ``native="auto"``) one C++ op
    (``KspikeLinearFilter``) runs all steps, with the products and the sum of TensorFlow's
    expression ``decay * carry + gain * s`` in its order, so the result is that of the
    ``tf.scan`` it replaces bit for bit; else (or with ``native=False``) that ``tf.scan``.
    Differentiable in ``seq`` and ``initial`` (the gradient is the same filter run the other
    way). Not for functions that are exported: the op is kspike's own.
    """
    seq = tf.convert_to_tensor(seq)
    decay, gain = float(decay), float(gain)
    if initial is None:
        initial = tf.zeros_like(seq[0])
    initial = tf.cast(initial, seq.dtype)
    if (seq.shape.rank is not None and initial.shape.rank is not None
            and not initial.shape.is_compatible_with(seq.shape[1:])):
        raise ValueError(f"linear_filter: initial must have the shape of seq without its time "
                         f"axis, {tuple(seq.shape[1:])}, got {tuple(initial.shape)}")
    ops = native_rule_ops(seq.dtype) if native is not False else None
    if ops is None:
        return _scan_filter(seq, decay, gain, initial, reverse)
    return _native_filter(ops, seq, initial, decay, gain, reverse)


def _native_filter(ops, seq, initial, decay, gain, reverse):
    dtype = seq.dtype
    d, g = tf.constant(decay, dtype), tf.constant(gain, dtype)

    @tf.custom_gradient
    def run(s, y0):
        y = ops.kspike_linear_filter(s, y0, d, g, reverse=reverse)

        def grad(upstream):
            # dL/ds_t = gain G_t, G the upstream filtered the other way with gain 1;
            # dL/dy0 = decay G at the step that read y0.
            back = ops.kspike_linear_filter(upstream, tf.zeros_like(y0), d,
                                            tf.constant(1.0, dtype), reverse=not reverse)
            first = back[-1] if reverse else back[0]
            return (back if gain == 1.0 else g * back), d * first

        return y, grad

    return run(seq, initial)


def sparse_transpose_matmul(a, b, native="auto"):
    """a^T b for a (R, p) with mostly zero entries (spikes, spike inputs) and b (R, q): the
    weight gradients sum_t p_t^T m_t the local rules form from stored (T * B, .) sequences.

    Where the native library loads (float32, CPU, outside XLA; ``native="auto"``) one C++ op
    (``KspikeSparseTransposeProduct``) adds, for every nonzero a[r, i], a[r, i] b[r] to row i
    of the result: nnz(a) * q multiply-adds instead of R * p * q (it runs a dense product
    when more than an eighth of ``a`` is nonzero). The sums run in another order than
    ``tf.matmul``'s (float round-off only). Else, and for narrow ``b`` (q < 64, whose rows
    are too short to repay the sparse bookkeeping), ``tf.matmul(a, b, transpose_a=True)``. Not
    differentiable and not for exported functions: for gradients formed by a rule.
    """
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    ops = None
    wide = b.shape.rank == 2 and b.shape[1] is not None and b.shape[1] >= 64
    if native is not False and a.dtype == tf.float32 and b.dtype == tf.float32 and wide:
        ops = native_rule_ops(a.dtype)
    if ops is None:
        return tf.matmul(a, b, transpose_a=True)
    return ops.kspike_sparse_transpose_product(tf.stop_gradient(a), tf.stop_gradient(b))


def native_neuron_attrs(cell, params):
    """The neuron attributes (keyword arguments) of kspike's native ops for ``cell`` with
    ``params``, for rules that call the native forward op themselves."""
    return _neuron_attrs(cell, params)


def _neuron_attrs(cell, params):
    refractory = int(params.n_refractory)
    return dict(alpha=float(params.alpha), one_minus_alpha=1.0 - float(params.alpha),
                rho=float(params.rho), one_minus_rho=1.0 - float(params.rho),
                thr=float(params.thr), n_refractory=refractory, adaptive=_is_adaptive(cell))


class _Backend:
    """The loops of one ``SpikingRNN`` call (see the module docstring and docs/engine.md).

    Args:
        cell: the kspike cell (state layout, units, beta).
        params: ``NeuronParameters`` of the cell in the state dtype (the backward pass uses
            their spike function's pseudo-derivative).
        output_all: the outputs are [z, v, A] (``output="all"``), else [z].
        sequences: the call returns per-step outputs (else only the final states, and the
            backward pass has no per-step output gradients).

    Attributes:
        time_axis: 0 when ``inputs.x`` and the outputs are time-major (T, B, ...), 1 when
            they are batch-major (B, T, ...).
        for_backward: the forward pass keeps buffers for ``backward`` (False: a forward loop
            alone, differentiated by TensorFlow if at all).
    """

    time_axis = 0
    for_backward = True

    def __init__(self, cell, params, output_all, sequences):
        self.cell = cell
        self.params = params
        self.output_all = output_all
        self.sequences = sequences
        self.adaptive = _is_adaptive(cell)

    @property
    def n_outputs(self):
        return (3 if self.output_all else 1) if self.sequences else 0

    def forward(self, inputs):
        """``_LoopInputs`` -> (buffers, outputs, final_states): ``outputs`` [z] or [z, v, A],
        each (T, B, n) or (B, T, n) after ``time_axis``, the values of every step before
        masking ([] without ``sequences``); final states in Keras order."""
        raise NotImplementedError

    def backward(self, buffers, out_grads, g_final, inputs):
        """Upstream gradients -> ``_LoopGradients``.

        ``out_grads``: [dL/dz_t, dL/dv_t, dL/dA_t] in the layout of the outputs, None where
        there are none; ``g_final``: ``NeuronState`` of dL/d(final states).
        """
        raise NotImplementedError


class _TensorFlowBackend(_Backend):
    """The ``tf.while_loop`` forward and backward loops (time-major).

    ``for_backward=False`` runs the forward loop alone with the cell's own spike function
    (inference, export: ``_plain_loop``).
    """

    def __init__(self, cell, params, output_all, sequences, for_backward=True):
        super().__init__(cell, params, output_all, sequences)
        self.for_backward = for_backward
        # The surrogate term of every kspike spike function is exactly 0 in the forward pass,
        # so the loop runs the plain Heaviside and the backward pass applies psi itself.
        self.forward_params = (params._replace(spike_function=_Heaviside()) if for_backward
                               else params)
        # Buffers the backward pass reads per step, and those that form the outputs.
        self.step_names = (["v", "z"] + (["A"] if self.adaptive else [])
                           + (["allowed"] if params.n_refractory > 0 else []))
        self.output_names = ((["z", "raw_z"] + (["v", "A"] if output_all else []))
                             if sequences else ["z"])

    def _loop(self, x, w_in, w_rec, bias, initial, mask):
        return _forward(self.cell, self.forward_params, x, w_in, w_rec, bias, initial, mask,
                        self.output_all, self.for_backward)

    def _outputs(self, stacked, inputs):
        return _raw_outputs(self.params, stacked, inputs.mask is not None, self.output_all,
                            self.sequences)

    def forward(self, inputs):
        tas, final_states = self._loop(*inputs)
        outputs, z_states = self._outputs(_stacked(tas, self.output_names), inputs)
        return {"reads": tas, "z": z_states}, outputs, final_states

    def backward(self, buffers, out_grads, g_final, inputs):
        # W_rec^T once: a transposed operand makes every per-step product slower.
        w_rec_t = None if inputs.w_rec is None else tf.transpose(inputs.w_rec)
        gb_final = g_final.b if self.adaptive else tf.zeros((), g_final.v.dtype)
        g_current, gv0, gb0, gz0 = self._backward_loops(
            buffers, out_grads, inputs.mask, g_final.v, gb_final, g_final.z, w_rec_t,
            tf.shape(inputs.x)[0])
        g_x, g_w_in, g_w_rec = self._weight_gradients(g_current, buffers["z"], inputs)
        return _LoopGradients(g_current, g_x, g_w_in, g_w_rec, gv0, gb0, gz0)

    def _backward_loops(self, buffers, out_grads, mask, g_final_v, gb_final, g_final_z,
                        w_rec_t, steps):
        return self._backward_loop(buffers["reads"], out_grads, mask, g_final_v, gb_final,
                                   g_final_z, w_rec_t, steps)

    def _weight_gradients(self, g_current, z_states, inputs):
        """dL/dx, dL/dW_in and dL/dW_rec as matmuls over all T steps at once."""
        x, n = inputs.x, self.cell.units
        compute_dtype = x.dtype
        g_matmul = tf.reshape(tf.cast(g_current, compute_dtype), (-1, n))
        x_flat = tf.reshape(x, (-1, x.shape[-1]))
        g_w_in = tf.matmul(x_flat, g_matmul, transpose_a=True)
        g_x = tf.reshape(tf.matmul(g_matmul, inputs.w_in, transpose_b=True), tf.shape(x))
        g_w_rec = None
        if inputs.w_rec is not None:
            z_previous_flat = tf.reshape(tf.cast(z_states[:-1], compute_dtype), (-1, n))
            g_w_rec = tf.matmul(z_previous_flat, g_matmul, transpose_a=True)
        return g_x, g_w_in, g_w_rec

    def _backward_loop(self, reads, out_grads, mask, g_final_v, gb_final, g_final_z, w_rec_t,
                       steps):
        """The backward recurrence from the last step to the first.

        ``reads``: TensorArrays of the forward buffers ``step_names``; ``out_grads``:
        (T, B, n) dL/dz_t, dL/dv_t, dL/dA_t or Nones; ``mask`` (T, B, 1) or None.

        Returns (dL/dI_t stacked (T, B, n), dL/dv_0, dL/db_0, dL/dz_0).
        """
        params, adaptive = self.params, self.adaptive
        refractory = params.n_refractory > 0
        gz_out_ta, gv_out_ta, gA_out_ta = [None if g is None else _unstack(g)
                                           for g in out_grads]
        mask_ta = None if mask is None else _unstack(mask)

        def back_body(t, gv, gb, gz, g_current_ta):
            # gv, gb, gz: gradients with respect to the state after step t.
            v = reads["v"].read(t)
            A = reads["A"].read(t) if adaptive else params.thr
            z_previous = reads["z"].read(t)
            allowed = reads["allowed"].read(t) if refractory else None
            gv_new, gz_new, gb_new = gv, gz, (gb if adaptive else None)
            if mask_ta is not None:
                m = mask_ta.read(t)
                keep = 1.0 - m
                gv_new, gz_new = m * gv, m * gz
                gb_new = m * gb if adaptive else None
            if gz_out_ta is not None:
                gz_new = gz_new + gz_out_ta.read(t)
            if gv_out_ta is not None:
                gv_new = gv_new + gv_out_ta.read(t)
            gA_out = None if gA_out_ta is None else gA_out_ta.read(t)
            g_current, gv_prev, gb_prev, gz_prev = dynamics.neuron_step_vjp(
                gz_new, gv_new, gb_new, gA_out, v, A, z_previous, params, allowed)
            if w_rec_t is not None:
                g_rec = tf.matmul(tf.cast(g_current, w_rec_t.dtype), w_rec_t)
                gz_prev = gz_prev + tf.cast(g_rec, gz.dtype)
            if mask_ta is not None:
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
             tf.TensorArray(g_final_v.dtype, size=steps)))
        return g_current_ta.stack(), gv0, gb0, gz0


class _XlaBackend(_TensorFlowBackend):
    """The TensorFlow loops, the forward and the backward loop each one XLA cluster."""

    def forward(self, inputs):
        names = (set(self.step_names + self.output_names) if self.for_backward
                 else self.output_names)

        def loop(*args):
            tas, final_states = self._loop(*args)
            return _stacked(tas, names), final_states

        args = tuple(inputs)
        if self.for_backward:
            # The gradient is the custom gradient's: stop_gradient keeps an eager tape from
            # recording the compiled call (it would ask XLA for a differentiable while loop,
            # which fails).
            args = tf.nest.map_structure(_stop_gradient, args)
        stacked, final_states = _compiled(loop, True)(*args)
        outputs, _ = self._outputs(stacked, inputs)
        return stacked, outputs, list(final_states)

    def _backward_loops(self, buffers, out_grads, mask, g_final_v, gb_final, g_final_z,
                        w_rec_t, steps):
        def loops(stacked, out_grads, mask, g_final_v, gb_final, g_final_z, w_rec_t):
            # Inside the XLA cluster the TensorArrays are slices of the stacked buffers.
            reads = {name: _unstack(stacked[name]) for name in self.step_names}
            return self._backward_loop(reads, out_grads, mask, g_final_v, gb_final, g_final_z,
                                       w_rec_t, tf.shape(stacked["v"])[0])

        step_buffers = {name: buffers[name] for name in self.step_names}
        return _compiled(loops, True)(*tf.nest.map_structure(_stop_gradient, (
            step_buffers, out_grads, mask, g_final_v, gb_final, g_final_z, w_rec_t)))


# The batch rows the native forward ops (undelayed and delayed) run over all T steps at a time
# (0: their own choice, as many as keep their states in cache); tests set a small value to run
# several blocks.
_FORWARD_ROWS_PER_BLOCK = 0


# The native backward op forms dL/dz_{t-1} += dI_t W_rec^T from the rows of W_rec^T of the
# neurons whose pseudo-derivative term dL/dz_t psi_t / A_t is nonzero, in a step where at most
# this fraction of them is (compact surrogates, see spiking_ops.cc), else by the dense product.
_SPARSE_BACKWARD_FRACTION = 0.3
# Steps per block over which the native backward op sums dW_rec and dW_in before adding them
# (0: as many as keep the block's dL/dI rows within 512 KB; tests set small blocks).
_WEIGHT_BLOCK_STEPS = 0


class _NativeBackend(_Backend):
    """The two C++ ops of ``kspike/native/spiking_ops.cc`` (batch-major, float32, no mask).

    Buffers: "z" (B, T, n), the spikes z_1 .. z_T (the layer's output); time-major "v", "A"
    (ALIF), "allowed" (uint8, with refractoriness), each (T, B, n), and "spike_bits"
    (T, B, n / 64) (the spikes packed for the backward pass); "z0" (B, n), "x" and
    "sparse_inputs" (a boolean scalar: at most a quarter of the inputs are nonzero, so x_t
    W_in and dW_in add the rows of the active inputs instead of dense products).
    """

    time_axis = 1

    def __init__(self, ops, cell, params, output_all, sequences, for_backward=True,
                 packed_spikes=True):
        super().__init__(cell, params, output_all, sequences)
        self.ops = ops
        # for_backward=False (inference): the forward op writes only the outputs and final
        # states, none of the buffers of the backward op. packed_spikes=False: the buffers
        # without "spike_bits" and "sparse_inputs", which only the backward op reads (for
        # callers that read z, v, A and the refractory masks themselves).
        self.for_backward = for_backward
        self.packed_spikes = packed_spikes
        self.attrs = _neuron_attrs(cell, params)
        self.surrogate_attrs = _native_surrogate_attrs(params.spike_function)

    def _beta(self):
        return (tf.constant(self.cell.beta_vector, tf.float32) if self.adaptive
                else tf.zeros((0,)))

    def forward(self, inputs):
        x, w_rec, bias, n = inputs.x, inputs.w_rec, inputs.bias, self.cell.units
        state = self.cell.pack_state(inputs.initial)
        # The op counts the nonzero inputs itself (one pass over x in C++ instead of
        # TensorFlow ops over the whole sequence) and returns its decision, which the
        # backward op reads.
        for_backward_op = self.for_backward and self.packed_spikes
        (z, v, A, allowed, spike_bits, v_final, b_final, z_final, r_final,
         sparse_inputs) = self.ops.kspike_spiking_forward(
                x=x, sparse_inputs=tf.constant(False), w_in=inputs.w_in,
                w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)),
                bias=bias if bias is not None else tf.zeros((0,)), beta=self._beta(),
                v0=state.v, b0=state.b if self.adaptive else tf.zeros((0, n)), z0=state.z,
                r0=state.r, recurrent=w_rec is not None, has_bias=bias is not None,
                store_z=self.for_backward or self.sequences,
                store_v=self.for_backward or (self.sequences and self.output_all),
                store_backward=self.for_backward, store_bits=for_backward_op,
                count_inputs=True, rows_per_block=_FORWARD_ROWS_PER_BLOCK,
                **self.attrs)
        buffers = {"z": z, "z0": state.z, "x": x, "sparse_inputs": sparse_inputs, "v": v,
                   "spike_bits": spike_bits}
        final = self._kept(buffers, A, allowed, v_final, b_final, z_final, r_final)
        return buffers, self._outputs(buffers), self.cell.unpack_state(final)

    def _kept(self, buffers, A, allowed, v_final, b_final, z_final, r_final):
        """Adds A (ALIF) and the refractory masks to ``buffers``; the final NeuronState."""
        if self.adaptive:
            buffers["A"] = A
        if self.params.n_refractory > 0:
            buffers["allowed"] = allowed
        return dynamics.NeuronState(v=v_final, b=b_final if self.adaptive else None,
                                    z=z_final, r=r_final)

    def _outputs(self, buffers):
        if not self.sequences:
            return []
        v = A = None
        if self.output_all:
            v = tf.transpose(buffers["v"], (1, 0, 2))
            A = tf.transpose(buffers["A"], (1, 0, 2)) if self.adaptive else None
        return _output_sequences(self.params, buffers["z"], v, A, self.output_all)

    def backward(self, buffers, out_grads, g_final, inputs):
        x, w_rec, n = buffers["x"], inputs.w_rec, self.cell.units
        batch = tf.shape(x)[0]
        gz_out, gv_out, gA_out = [tf.zeros((batch, 0, n)) if g is None else g
                                  for g in out_grads]
        g_current, gv0, gb0, gz0, g_w_rec, g_w_in = self.ops.kspike_spiking_backward(
            spike_bits=buffers["spike_bits"], z0=buffers["z0"], x=x,
            sparse_inputs=buffers["sparse_inputs"], v=buffers["v"],
            threshold=buffers.get("A", tf.zeros((0, batch, n))),
            allowed=buffers.get("allowed", tf.zeros((0, batch, n), tf.uint8)),
            w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)), beta=self._beta(),
            grad_z_out=gz_out, grad_v_out=gv_out, grad_a_out=gA_out, grad_v_final=g_final.v,
            grad_b_final=g_final.b if self.adaptive else tf.zeros((0, n)),
            grad_z_final=g_final.z, recurrent=w_rec is not None, has_bias=False,
            sparse_fraction=_SPARSE_BACKWARD_FRACTION, weight_block_steps=_WEIGHT_BLOCK_STEPS,
            **self.attrs, **self.surrogate_attrs)
        # dW_in and dW_rec are summed in the loop (over the active inputs for sparse ones);
        # dL/dI_t is written only where an op reads it (here: the input gradient, which a
        # training step that needs no gradient of its inputs prunes).
        g_flat = tf.reshape(g_current, (-1, n))                   # rows in (t, b) order
        steps = tf.shape(g_current)[0]
        g_x = tf.transpose(tf.reshape(tf.matmul(g_flat, inputs.w_in, transpose_b=True),
                                      (steps, batch, tf.shape(x)[2])), (1, 0, 2))
        return _LoopGradients(g_current, g_x, g_w_in, g_w_rec if w_rec is not None else None,
                              gv0, gb0 if self.adaptive else None, gz0)


class _NativeDelayedBackend(_NativeBackend):
    """The delayed C++ ops of ``kspike/native/spiking_ops.cc`` for a cell with synaptic delays
    (``n_delay`` > 1): the future-current buffer ``i_future`` is a ring of ``n_delay`` slots
    per batch row inside the loop, read from the initial state and written back to the final
    one in the layout of ``cell.call`` (slot d = the current due in d steps). ``inputs.w_in``
    and ``inputs.w_rec`` are the undelayed kernels; the delay indices are the cell's.

    Buffers: as ``_NativeBackend`` (without "sparse_inputs": every nonzero input adds its
    weight row into the ring at its own delay).
    """

    def _delays(self):
        cell = self.cell
        d_in = tf.convert_to_tensor(cell._input_delays)
        d_rec = (tf.convert_to_tensor(cell._recurrent_delays) if cell.recurrent
                 else tf.zeros((0, 0), tf.int32))
        return d_in, d_rec

    def forward(self, inputs):
        x, w_rec, bias, n = inputs.x, inputs.w_rec, inputs.bias, self.cell.units
        state = self.cell.pack_state(inputs.initial)
        d_in, d_rec = self._delays()
        z, v, A, allowed, spike_bits, v_final, b_final, z_final, r_final, buffer_final = \
            self.ops.kspike_delayed_forward(
                x=x, w_in=inputs.w_in, input_delays=d_in,
                w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)),
                recurrent_delays=d_rec,
                bias=bias if bias is not None else tf.zeros((0,)), beta=self._beta(),
                v0=state.v, b0=state.b if self.adaptive else tf.zeros((0, n)), z0=state.z,
                r0=state.r, buffer0=inputs.initial[-1], recurrent=w_rec is not None,
                has_bias=bias is not None, n_delay=self.cell.n_delay,
                store_z=self.for_backward or self.sequences,
                store_v=self.for_backward or (self.sequences and self.output_all),
                store_backward=self.for_backward, rows_per_block=_FORWARD_ROWS_PER_BLOCK,
                **self.attrs)
        buffers = {"z": z, "z0": state.z, "x": x, "v": v, "spike_bits": spike_bits}
        final = self._kept(buffers, A, allowed, v_final, b_final, z_final, r_final)
        return buffers, self._outputs(buffers), self.cell.unpack_state(final) + [buffer_final]

    def backward(self, buffers, out_grads, g_final, inputs, g_buffer=None):
        x, w_rec, n = buffers["x"], inputs.w_rec, self.cell.units
        batch = tf.shape(x)[0]
        gz_out, gv_out, gA_out = [tf.zeros((batch, 0, n)) if g is None else g
                                  for g in out_grads]
        d_in, d_rec = self._delays()
        g_current, g_w_in, g_w_rec, gv0, gb0, gz0, g_buffer0 = \
            self.ops.kspike_delayed_backward(
                spike_bits=buffers["spike_bits"], z0=buffers["z0"], x=x, v=buffers["v"],
                threshold=buffers.get("A", tf.zeros((0, batch, n))),
                allowed=buffers.get("allowed", tf.zeros((0, batch, n), tf.uint8)),
                w_in=inputs.w_in, input_delays=d_in,
                w_rec=w_rec if w_rec is not None else tf.zeros((0, 0)),
                recurrent_delays=d_rec, beta=self._beta(), grad_z_out=gz_out,
                grad_v_out=gv_out, grad_a_out=gA_out, grad_v_final=g_final.v,
                grad_b_final=g_final.b if self.adaptive else tf.zeros((0, n)),
                grad_z_final=g_final.z, grad_buffer_final=g_buffer,
                recurrent=w_rec is not None, has_bias=False, n_delay=self.cell.n_delay,
                **self.attrs, **self.surrogate_attrs)
        # A separate op, pruned from graphs that need no input gradient.
        g_x = self.ops.kspike_delayed_input_grad(
            grad_current=g_current, grad_buffer_final=g_buffer, w_in=inputs.w_in,
            input_delays=d_in, n_delay=self.cell.n_delay)
        return _LoopGradients(g_current, g_x, g_w_in, g_w_rec if w_rec is not None else None,
                              gv0, gb0 if self.adaptive else None, gz0, g_buffer0)


def _select_backend(cell, native, jit_compile, state_dtype, compute_dtype, masked,
                    sequences):
    """The backend that runs one ``SpikingRNN`` call: the one dispatch rule (docs/engine.md).

    The native loops where ``native`` ("auto", True, False) lets them run (``_load_native``),
    else the XLA loops with ``jit_compile``, else the TensorFlow loops. Without a gradient
    tape that may record, only the forward loop runs and keeps no buffers; there the native
    forward runs only where its graph is never exported (``compat.native_inference_allowed``:
    eagerly and in the functions Keras and kspike's Trainer build for fit / evaluate /
    predict), and anywhere else (exports, user tf.functions) the TensorFlow (or XLA) forward
    loop, whose graph holds TensorFlow ops only.
    """
    params = cell.parameters(state_dtype)
    output_all = cell.output_mode == "all"
    tensorflow_loops = _XlaBackend if jit_compile else _TensorFlowBackend
    for_backward = compat.tape_may_record()
    if not for_backward and not compat.native_inference_allowed():
        return tensorflow_loops(cell, params, output_all, sequences, for_backward=False)
    ops = _load_native(cell, native, state_dtype, compute_dtype, masked, jit_compile)
    if ops is not None:
        native_loops = _NativeDelayedBackend if cell.delayed else _NativeBackend
        return native_loops(ops, cell, params, output_all, sequences, for_backward)
    return tensorflow_loops(cell, params, output_all, sequences, for_backward)


def _plain_loop(backend, inputs):
    """The forward loop of a ``for_backward=False`` backend, differentiated by TensorFlow.

    Used when no gradient tape is recording (inference, export): no buffers are kept for a
    backward pass, and if the traced function is differentiated later anyway, autodiff of
    these very steps gives the gradients of ``keras.layers.RNN``. Returns (raw_outputs,
    final_states) as ``_sequence_loop``.
    """
    _, outputs, final_states = backend.forward(inputs)
    return outputs, list(final_states)


def _sequence_loop(backend, inputs):
    """The loops of ``backend`` over a whole sequence, under one hand-written gradient.

    Args:
        backend: a ``_Backend`` with ``for_backward``.
        inputs: ``_LoopInputs``; gradients reach whatever the weights are computed from
            (e.g. DEEP R magnitudes) since they arrive as tensors.

    Returns:
        (raw_outputs, final_states): raw_outputs is [z] or [z, v, A] in the state dtype and
        the layout of ``backend.time_axis``, the values of every step before masking ([]
        without ``sequences``); final_states in Keras order.
    """
    cell = backend.cell

    @tf.custom_gradient
    def run(*args):
        loop_inputs = _unflatten(inputs, args)
        buffers, outputs, final_states = backend.forward(loop_inputs)

        def grad_fn(*grads):
            n_out = len(outputs)
            out_grads = [tf.zeros_like(o) if g is None else g
                         for g, o in zip(grads[:n_out], outputs)]
            g_states = [tf.zeros_like(s) if g is None else g
                        for g, s in zip(grads[n_out:], final_states)]
            g_final = cell.pack_state(g_states)
            # dL/dz_t, dL/dv_t, dL/dA_t of the per-step outputs (None where there are none).
            out_grads = (out_grads + [None, None, None])[:3]
            if not backend.adaptive:
                out_grads[2] = None
            if cell.delayed:
                # The gradient of the final future-current buffer, the last state.
                gradients = backend.backward(buffers, out_grads, g_final, loop_inputs,
                                             g_buffer=g_states[-1])
            else:
                gradients = backend.backward(buffers, out_grads, g_final, loop_inputs)
            return _input_gradients(backend, loop_inputs, gradients, g_final)

        return tuple(outputs) + tuple(final_states), grad_fn

    results = run(*_flatten(inputs))
    n_out = backend.n_outputs
    return list(results[:n_out]), list(results[n_out:])


def _input_gradients(backend, inputs, gradients, g_final):
    """The gradients of the custom gradient's arguments (``_flatten`` order)."""
    state_dtype = inputs.initial[0].dtype
    result = [gradients.x, gradients.w_in]
    if inputs.w_rec is not None:
        result.append(gradients.w_rec)
    if inputs.bias is not None:
        result.append(tf.reduce_sum(gradients.current, axis=(0, 1)))
    # The refractory counter carries a gradient only to itself: r_t = r_{t-1} - 1 until it
    # reaches 0 or the neuron spikes, so with a refractory period the chain over the T'
    # unmasked steps is unbroken exactly when r_0 >= T' (the neuron is then refractory
    # throughout and cannot spike); without one, r is constant.
    g_r = g_final.r
    if backend.params.n_refractory > 0:
        if inputs.mask is not None:
            active_steps = tf.reduce_sum(inputs.mask, axis=0)
        else:
            active_steps = tf.cast(tf.shape(inputs.x)[backend.time_axis], state_dtype)
        initial_r = backend.cell.pack_state(inputs.initial).r
        g_r = g_r * tf.cast(initial_r >= active_steps, state_dtype)
    result += backend.cell.unpack_state(dynamics.NeuronState(
        v=gradients.v0, b=gradients.b0 if backend.adaptive else None, z=gradients.z0, r=g_r))
    if backend.cell.delayed:
        result.append(gradients.buffer0)
    if inputs.mask is not None:
        result.append(tf.zeros_like(inputs.mask))
    return result


def _loop_layout(sequences, mask, compute_dtype, state_dtype, time_axis, go_backwards):
    """x (and mask) in the layout of a backend: x (T, B, n_in) for ``time_axis`` 0, else the
    batch-major (B, T, n_in) of Keras; mask (T, B, 1) 0/1 in the state dtype, or None (only
    time-major backends run masks). Reversed in time for ``go_backwards``."""
    x = tf.cast(sequences, compute_dtype)
    if time_axis == 0:
        x = tf.transpose(x, (1, 0, 2))
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank == 3:
            mask = mask[..., 0]
        mask = tf.transpose(tf.cast(mask, state_dtype), (1, 0))[..., None]
    if go_backwards:
        x = tf.reverse(x, [time_axis])
        if mask is not None:
            mask = tf.reverse(mask, [0])
    return x, mask


@keras.saving.register_keras_serializable(package="kspike")
class SpikingRNN(keras.layers.RNN):
    """Recurrent layer for kspike cells: ``keras.layers.RNN`` outputs and gradients, faster.

    Same constructor, call signature, outputs and behaviour as ``keras.layers.RNN`` (see its
    documentation for ``return_sequences``, ``return_state``, ``go_backwards``, ``stateful``,
    ``zero_output_for_mask``, ``initial_state`` and ``mask``). For a ``kspike.LIF`` or
    ``kspike.ALIF`` cell (every option: refractoriness, LIF/ALIF mixes, any surrogate, no
    recurrence, bias, ``output="all"``, DEEP R kernels) it runs a specialised loop with a
    hand-written backward pass (see ``kspike.engine`` and docs/engine.md): the outputs equal
    those of ``keras.layers.RNN(cell)`` (spikes identical) and the gradients with respect to
    inputs, weights and initial states agree to float rounding. Any other cell, or
    ``unroll=True``, runs the generic ``keras.layers.RNN`` loop. Cells with synaptic delays
    (``n_delay`` > 1) run native delayed loops where the native loops apply, else the generic
    loop with their delay kernels computed once per sequence (docs/engine.md, "Cells with
    synaptic delays").

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
        native: run the loops in C++ (``kspike.native``, compiled on first use):
            "auto" (default) where they apply (float32 states and matmuls, no mask, no XLA,
            a catalogue surrogate, a CPU-only process) and compile, else the TensorFlow
            loop; True to require them (a ValueError naming the condition that failed,
            with its value, where they cannot run); False for the TensorFlow loop only.
            Both give the same spikes and gradients to float32 rounding (the native loop
            sums the recurrent products over the neurons that spiked, in another order).
            The dispatch rules are in docs/engine.md.

    Call arguments:
        sequences: (B, T, n_in) inputs; one time step is ``cell.dt`` ms.
        initial_state: optional list of (B, units) tensors in ``cell.state_names`` order.
        mask: optional (B, T) boolean mask; masked steps keep the states unchanged.
        training: passed for API compatibility (spiking cells behave the same).

    Under a gradient tape the backward pass is a hand-written ``tf.custom_gradient`` around
    the whole sequence; without one the forward loop runs alone: native eagerly and in
    ``model.predict`` / ``evaluate`` / the Trainer's validation, TensorFlow's in exports and
    other traced functions, so a SavedModel written by ``kspike.export`` (or ``model.export``,
    ``tf.saved_model.save``) holds TensorFlow ops only, serves and streams, and TensorFlow
    differentiates its ``serve`` function by autodiff (correct gradients, generic speed).

    Example:

    >>> import keras, kspike, numpy as np
    >>> cell = kspike.ALIF(256, n_adaptive=128, n_refractory=5)
    >>> model = keras.Sequential([keras.Input((784, 80)),
    ...                           kspike.SpikingRNN(cell, return_sequences=True),
    ...                           kspike.LeakyReadout(10)])
    >>> model.output_shape
    (None, 784, 10)
    >>> layer = kspike.SpikingRNN(kspike.LIF(16), return_sequences=True, return_state=True)
    >>> spikes, v, z, r = layer(np.zeros((2, 50, 3), "float32"))
    >>> tuple(spikes.shape), tuple(v.shape)
    ((2, 50, 16), (2, 16))
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
        return _load_native(self.cell, self.native, state_dtype, compute_dtype, masked,
                            self.jit_compile)

    @property
    def specialised(self):
        """True when the fast kspike loop runs (a kspike cell and ``unroll=False``)."""
        return _is_specialised(self.cell) and not self.unroll

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not self.specialised and self._runs_native_delayed(sequences, mask):
            return self._specialised_loop(sequences, initial_state, mask)
        if not self.specialised:
            if getattr(self.cell, "delayed", False) and graph.is_spiking_cell(self.cell):
                # Keras' loop over cell.call, with the widened delay kernels computed once
                # per sequence rather than at every step (docs/engine.md).
                with self.cell.fixed_kernels():
                    return super().inner_loop(sequences, initial_state, mask,
                                              training=training)
            return super().inner_loop(sequences, initial_state, mask, training=training)
        return self._specialised_loop(sequences, initial_state, mask)

    def _runs_native_delayed(self, sequences, mask):
        """True when this call of a cell with synaptic delays runs the native delayed loops
        (kspike's own cell step, no ``unroll``, and the native loops apply and load, both for
        training and for inference; elsewhere Keras' generic loop over ``cell.call`` runs,
        with a ValueError for ``native=True``)."""
        cell = self.cell
        if not (getattr(cell, "delayed", False) and graph.is_spiking_cell(cell)):
            return False
        step_is_kspike = (type(cell).call is graph.SpikingCell.call
                          and type(cell).pack_state is graph.SpikingCell.pack_state
                          and type(cell).unpack_state is graph.SpikingCell.unpack_state)
        if self.unroll or not step_is_kspike:
            if self.native is True:
                raise ValueError("SpikingRNN(native=True) cannot run the native loops for "
                                 "this call: "
                                 + ("unroll=True" if self.unroll else
                                    f"the cell class {type(cell).__name__} overrides its step")
                                 + ". Use native='auto' to fall back to the generic loop.")
            return False
        if not compat.tape_may_record() and not compat.native_inference_allowed():
            return False
        state_dtype = cell.state_dtype
        compute_dtype = keras.backend.standardize_dtype(cell.dtype_policy.compute_dtype)
        return self._native_ops(state_dtype, compute_dtype, mask is not None) is not None

    def _specialised_loop(self, sequences, initial_state, mask):
        cell = self.cell
        sequences, states = self._checked_inputs(sequences, initial_state)
        state_dtype = cell.state_dtype
        compute_dtype = keras.backend.standardize_dtype(cell.dtype_policy.compute_dtype)
        states = [tf.cast(s, state_dtype) for s in states]
        w_in, w_rec, bias = cell.effective_kernels(compute_dtype)
        w_in = tf.convert_to_tensor(w_in)
        if w_rec is not None:
            w_rec = tf.convert_to_tensor(w_rec)
        if bias is not None:
            bias = tf.cast(bias, state_dtype)
        # Without return_sequences (and mask) the last output is read from the final states,
        # so no per-step output (nor its gradient) is materialised.
        per_step = self.return_sequences or mask is not None
        backend = _select_backend(cell, self.native, self.jit_compile, state_dtype,
                                  compute_dtype, mask is not None, per_step)
        x, mask = _loop_layout(sequences, mask, compute_dtype, state_dtype, backend.time_axis,
                               self.go_backwards)
        loop = _sequence_loop if backend.for_backward else _plain_loop
        raw, final_states = loop(backend, _LoopInputs(x, w_in, w_rec, bias, states, mask))
        if not per_step:
            last_output = self._last_output(final_states, state_dtype, compute_dtype)
            return last_output, last_output[:, None], final_states
        outputs = raw[0] if len(raw) == 1 else tf.concat(raw, axis=-1)
        if mask is not None:
            outputs = _mask_outputs(outputs, mask, self.zero_output_for_mask)
        outputs = tf.cast(outputs, compute_dtype)
        last_output = outputs[-1] if backend.time_axis == 0 else outputs[:, -1]
        if not self.return_sequences:
            outputs = last_output[:, None]
        elif backend.time_axis == 0:
            outputs = tf.transpose(outputs, (1, 0, 2))                      # (B, T, out)
        return last_output, outputs, final_states

    def _checked_inputs(self, sequences, initial_state):
        """(B, T, n_in) inputs as a tensor and the initial states as a list, checked."""
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
        cell.check_states(states)
        return sequences, states

    def _last_output(self, final_states, state_dtype, compute_dtype):
        """The output of the last step (B, output_size), from the final states."""
        cell = self.cell
        final = cell.pack_state(final_states)
        last_output = final.z
        if cell.output_mode == "all":
            A = dynamics.threshold(final.b, cell.parameters(state_dtype))
            A = tf.broadcast_to(tf.cast(A, state_dtype), tf.shape(final.v))
            last_output = tf.concat([final.z, final.v, A], axis=-1)
        return tf.cast(last_output, compute_dtype)


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
