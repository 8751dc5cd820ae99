"""Machinery shared by the rules that run forward in time (e-prop, S-TLLR).

Both rules accept the same model shape: a chain ``Input -> spiking RNN layer(s) -> LeakyReadout``
(Sequential or functional), where every spiking layer is a ``keras.layers.RNN`` or
``kspike.SpikingRNN`` over a kspike cell with ``return_sequences=True``. This module checks such
a model (on the stages of ``kspike.graph.parse``), runs its inference pass in a
``tf.while_loop`` that keeps only the readout output (memory independent of T apart from the
(B, T, n_out) outputs), turns the user's loss into per-step output errors dE/dy_t, and maps
gradients of the effective kernels back onto ``model.trainable_variables``.
"""
from typing import List, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from kspike import compat, dynamics, engine, graph


class LayerPlan(NamedTuple):
    """One spiking layer of a supported chain."""
    layer: object
    cell: object
    n_in: int
    units: int
    n_plain: int          # neurons with beta = 0, always the first ones (kspike convention)
    adaptive: bool        # the cell carries a threshold-adaptation state b


class ChainPlan(NamedTuple):
    """A checked model: spiking layers in order, then the leaky readout."""
    layers: List[LayerPlan]
    readout: object
    dtype: str


class LayerWeights(NamedTuple):
    """Effective weights of one spiking layer as tensors (W_rec and bias may be None)."""
    input_kernel: tf.Tensor
    recurrent_kernel: Optional[tf.Tensor]
    bias: Optional[tf.Tensor]
    params: object


SUPPORTED = ("Input -> one or more keras.layers.RNN / kspike.SpikingRNN layers over kspike LIF/ALIF "
             "cells (return_sequences=True, output='spikes', not stateful, not go_backwards) -> "
             "kspike.LeakyReadout")


def check_chain(model, rule_name):
    """Return the ``ChainPlan`` of ``model`` or raise ValueError naming what is unsupported."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"{rule_name} needs a keras.Model, received {model!r} of type "
                        f"{type(model).__name__}.")
    prefix = (f"{rule_name} supports models of the form {SUPPORTED}; it never falls back to "
              f"BPTT silently.")
    try:
        stages = graph.parse(model, rule_name)
    except ValueError as error:
        raise ValueError(f"{prefix} {error}") from None
    if len(stages) < 2:
        raise ValueError(f"{prefix} Model {model.name!r} has layers "
                         f"{[s.name for s in stages]}.")
    *spiking, readout = stages
    if not isinstance(readout, graph.Readout):
        raise ValueError(f"{prefix} The last layer of model {model.name!r} is "
                         f"{graph.describe(readout.layer)}, not a kspike.LeakyReadout.")
    plans = []
    dtype = None
    for stage in spiking:
        layer = stage.layer
        if not isinstance(stage, graph.SpikingLayer):
            raise ValueError(f"{prefix} Layer {layer.name!r} ({type(layer).__name__}) is not a "
                             "recurrent layer over a kspike cell.")
        problems = []
        if not getattr(layer, "return_sequences", False):
            problems.append("return_sequences=False")
        for flag in ("return_state", "stateful", "go_backwards"):
            if getattr(layer, flag, False):
                problems.append(f"{flag}=True")
        cell = stage.cell
        graph.check_undelayed(cell, rule_name, layer)
        if cell.output_mode != "spikes":
            problems.append(f"cell output={cell.output_mode!r}")
        if problems:
            raise ValueError(f"{prefix} Layer {layer.name!r} has {', '.join(problems)}.")
        beta = cell.beta_vector
        n_plain = int(np.sum(beta == 0.0))
        if np.any(beta[:n_plain] != 0.0):
            raise ValueError(f"{prefix} Layer {layer.name!r} must have its non-adaptive neurons "
                             "first (kspike's n_adaptive convention).")
        plans.append(LayerPlan(layer=layer, cell=cell, n_in=cell.input_dim, units=cell.units,
                               n_plain=n_plain, adaptive=cell.adaptive))
        dtype = dtype or cell.state_dtype
    for before, after in zip(plans[:-1], plans[1:]):
        if after.n_in != before.units:
            raise ValueError(f"{prefix} Layer {after.layer.name!r} expects {after.n_in} inputs "
                             f"but follows {before.layer.name!r} with {before.units} units.")
    return ChainPlan(layers=plans, readout=readout.layer, dtype=dtype)


def layer_weights(plan, dtype):
    """Effective weights (tensors) of every spiking layer; call under the tape that maps
    gradients back (``variable_gradients``)."""
    weights = []
    for layer in plan.layers:
        w_in, w_rec, bias = layer.cell.effective_kernels(dtype)
        weights.append(LayerWeights(w_in, w_rec, bias, layer.cell.parameters(dtype)))
    return weights


def readout_weights(plan, dtype):
    readout = plan.readout
    kernel = tf.cast(readout.kernel, dtype)
    bias = None if readout.bias is None else tf.cast(readout.bias, dtype)
    return kernel, bias


def presynaptic(inputs, z_previous, weights):
    """p_t = [input_t, z_{t-1} (if recurrent), 1 (if bias)], (B, P): the presynaptic factor of
    dv_t/dW for the stacked kernel [W_in; W_rec; bias] (P, n)."""
    parts = [inputs]
    if weights.recurrent_kernel is not None:
        parts.append(z_previous)
    if weights.bias is not None:
        parts.append(tf.ones_like(inputs[:, :1]))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def presynaptic_size(layer, weights):
    return (layer.n_in + (layer.units if weights.recurrent_kernel is not None else 0)
            + (1 if weights.bias is not None else 0))


def layer_step(inputs, state, weights):
    """One kspike step of a layer (kspike.dynamics), returns (new_state, A, allowed)."""
    allowed = dynamics.refractory_allowed(state.r, weights.params)
    current = dynamics.input_current(inputs, state.z, weights.input_kernel,
                                     weights.recurrent_kernel, weights.bias)
    new_state, A = dynamics.neuron_step(current, state, weights.params)
    return new_state, A, allowed


def initial_states(plan, batch_size):
    return [layer.cell.pack_state(layer.cell.get_initial_state(batch_size))
            for layer in plan.layers]


def flat_state(plan, states):
    out = []
    for layer, state in zip(plan.layers, states):
        out.extend(layer.cell.unpack_state(state))
    return out


def nested_state(plan, flat):
    states, i = [], 0
    for layer in plan.layers:
        k = len(layer.cell.state_names)
        states.append(layer.cell.pack_state(list(flat[i:i + k])))
        i += k
    return states


def time_major(x, dtype):
    """(B, T, n) -> (TensorArray of T (B, n) slices, T). Read per step (faster than indexing);
    readable many times, so both passes of a rule share one copy of the inputs."""
    x = tf.cast(x, dtype)
    steps = tf.shape(x)[1]
    array = tf.TensorArray(dtype, size=steps, clear_after_read=False)
    return array.unstack(tf.transpose(x, (1, 0, 2))), steps


def inference_pass(plan, weights, readout, x, sequence=None):
    """Runs the chain forward, keeping only the readout output and spike counts.

    Returns:
        (y, counts): y (B, T, n_out) readout sequence; counts, per layer, the number of spikes of
        each neuron summed over batch and time, (n,).
    """
    dtype = plan.dtype
    kernel, bias = readout
    kappa = plan.readout.kappa
    xs, steps = sequence or time_major(x, dtype)
    batch = tf.shape(x)[0]
    states = initial_states(plan, batch)
    zhat = tf.zeros((batch, plan.layers[-1].units), dtype)
    counts = [tf.zeros((layer.units,), dtype) for layer in plan.layers]
    ys = tf.TensorArray(dtype, size=steps)

    def body(t, flat, zhat, counts, ys):
        states = nested_state(plan, flat)
        inputs = xs.read(t)
        new_states, new_counts = [], []
        for state, w, count in zip(states, weights, counts):
            state, _, _ = layer_step(inputs, state, w)
            inputs = state.z
            new_states.append(state)
            new_counts.append(count + tf.reduce_sum(inputs, axis=0))
        zhat = kappa * zhat + (1.0 - kappa) * inputs
        y = tf.matmul(zhat, kernel)
        if bias is not None:
            y = y + bias
        return t + 1, flat_state(plan, new_states), zhat, new_counts, ys.write(t, y)

    _, _, _, counts, ys = tf.while_loop(
        lambda t, *_: t < steps, body, (0, flat_state(plan, states), zhat, counts, ys))
    y = tf.transpose(ys.stack(), (1, 0, 2))
    return y, counts


def readout_chunk(z, kernel, bias, kappa, filtered=None):
    """``kspike.LeakyReadout`` over time-major spikes ``z`` (K, B, n), a chunk or the whole
    sequence, from the filter state ``filtered`` (B, n_out) where the previous chunk ended
    (None: zeros, the start of the sequence): the outputs (K, B, n_out) and the filter state
    at the end. The filter runs on z W_out (it is linear, so this is zhat_t W_out)."""
    projected = tf.reshape(tf.matmul(tf.reshape(z, (-1, z.shape[-1])), kernel),
                           tf.concat([tf.shape(z)[:2], tf.shape(kernel)[1:]], 0))
    filtered = engine.linear_filter(projected, kappa, 1.0 - kappa, initial=filtered)
    return (filtered if bias is None else filtered + bias), filtered[-1]


def output_errors(loss, y_true, y, sample_weight):
    """(loss value, dE/dy (B, T, n_out)) of ``loss(y_true, y, sample_weight)``."""
    with tf.GradientTape() as tape:
        tape.watch(y)
        if sample_weight is None:
            value = loss(y_true, y)
        else:
            value = loss(y_true, y, sample_weight=sample_weight)
        value = tf.cast(value, y.dtype)
    error = tape.gradient(value, y)
    if error is None:
        raise ValueError(f"The loss {loss!r} does not depend on the model output: no learning "
                         "signal can be formed.")
    return value, error


def backward_filter(error, kappa):
    """Etilde_t = sum_{t' >= t} (1 - kappa) kappa^(t' - t) error_{t'}, (B, T, n) -> (B, T, n).

    The readout filter moved onto the learning signal: sum_t L_t ebar_t = sum_t Ltilde_t e_t."""
    seq = tf.transpose(error, (1, 0, 2))
    out = engine.linear_filter(seq, kappa, 1.0 - kappa, reverse=True)
    return tf.transpose(out, (1, 0, 2))


def regularizer_signals(regularizers, plan, counts, batch, steps, dtype):
    """Loss terms of firing-rate regularisers and their local learning signals.

    A kspike firing-rate regulariser depends on the spikes only through each neuron's mean over
    batch and time, so dR/dz_j(t) = (1 / (B T)) dR/d(mean_j), the same for every sample and step.

    Returns:
        (total regulariser value, list per layer of (n,) signals or None).
    """
    total = tf.constant(0.0, dtype)
    signals = [None] * len(plan.layers)
    if not regularizers:
        return total, signals
    scale = tf.cast(batch * steps, dtype)
    means = [c / scale for c in counts]
    for regularizer in regularizers:
        value, grads = regularizer_value_and_gradient(regularizer, plan, means)
        total = total + tf.cast(value, dtype)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = tf.cast(g, dtype) / scale
            signals[i] = g if signals[i] is None else signals[i] + g
    return total, signals


def check_regularizers(regularizers, rule_name):
    """Only regularisers that see spikes through per-neuron means over batch and time have a
    local gradient these rules can form; anything else gets a clear error."""
    from kspike.regularizers import FiringRateRegularizer
    regularizers = tuple(regularizers or ())
    for regularizer in regularizers:
        if not isinstance(regularizer, FiringRateRegularizer):
            raise ValueError(f"{rule_name} supports kspike.FiringRateRegularizer (a function of "
                             "each neuron's mean rate, whose local gradient it computes); "
                             f"received {regularizer!r}. Use BPTT for other regularisers.")
    return regularizers


def regularizer_value_and_gradient(regularizer, plan, means):
    """Value of a firing-rate regulariser on every layer's mean spikes per step and its gradient
    with respect to those means, each (n,).

    The regulariser (contract of ``kspike.regularizers``: a callable on ``LayerActivity``
    records) is called on sequences of one sample and one step holding each neuron's mean spike
    count per step; since it averages spikes over batch and time this is its exact value.
    """
    from kspike.regularizers import LayerActivity
    spikes = [tf.reshape(tf.cast(m, tf.float32), (1, 1, -1)) for m in means]
    with tf.GradientTape() as tape:
        tape.watch(spikes)
        activities = [LayerActivity(layer.layer.name, s, None, None, float(layer.cell.dt),
                                    layer.layer) for layer, s in zip(plan.layers, spikes)]
        value = regularizer(activities)
    grads = tape.gradient(value, spikes)
    return value, [None if g is None else tf.reshape(g, (-1,)) for g in grads]


def variable_gradients(tape, model, targets, grads):
    """Maps gradients of effective tensors (kernels built from variables under ``tape``) onto
    ``model.trainable_variables`` (handles casts, masks and rewired kernels)."""
    pairs = [(t, g) for t, g in zip(targets, grads) if t is not None and g is not None]
    variables = model.trainable_variables
    out = tape.gradient([t for t, _ in pairs], variables,
                        output_gradients=[tf.cast(g, t.dtype) for t, g in pairs])
    return [None if g is None else tf.cast(g, v.dtype) for g, v in zip(out, variables)]


def watched_weights(plan, model):
    """Effective layer and readout weights and the model's weight penalty, built under a
    persistent tape so ``model_gradients`` can map gradients back onto the variables.

    Returns:
        (tape, weights, readout, weight_loss); the caller deletes the tape when done.
    """
    with tf.GradientTape(persistent=True) as tape:
        weights = layer_weights(plan, plan.dtype)
        readout = readout_weights(plan, plan.dtype)
        weight_loss = model_weight_losses(model)
    return tape, weights, readout, weight_loss


def model_gradients(tape, model, weights, layer_grads, readout, readout_grad, error, loss,
                    weight_loss, dtype, readout_bias_grad=None):
    """Gradients of a local rule aligned with ``model.trainable_variables``, and the total loss.

    Args:
        tape: the tape under which the effective kernels were built.
        weights: per-layer effective weights (``layer_weights``); layer_grads: per layer, the
            gradients of (W_in, W_rec, bias).
        readout: (kernel, bias) of the readout; readout_grad: gradient of its kernel; error:
            (B, T, n_out) output error whose sum over batch and time is the bias gradient
            (or None when ``readout_bias_grad``, that sum (n_out,), is given).
        loss: task plus regulariser loss (scalar); weight_loss: the model's weight penalties
            (Keras kernel regularisers) or None, differentiated by the tape.
    """
    targets, values = [], []
    for w, g in zip(weights, layer_grads):
        targets.extend([w.input_kernel, w.recurrent_kernel, w.bias])
        values.extend(g)
    targets.extend(readout)
    if readout_bias_grad is None:
        readout_bias_grad = tf.reduce_sum(error, axis=(0, 1))
    values.extend([readout_grad, readout_bias_grad])
    gradients = variable_gradients(tape, model, targets, values)
    if weight_loss is not None:
        extra = tape.gradient(weight_loss, model.trainable_variables)
        gradients = [g if e is None else (tf.cast(e, v.dtype) if g is None else g + e)
                     for g, e, v in zip(gradients, extra, model.trainable_variables)]
        loss = loss + tf.cast(weight_loss, dtype)
    return gradients, loss


def split_stacked(grad, layer, weights):
    """(P, n) gradient of [W_in; W_rec; bias] -> (grad W_in, grad W_rec or None, grad bias or None)."""
    n_in = layer.n_in
    g_in = grad[:n_in]
    offset = n_in
    g_rec = g_bias = None
    if weights.recurrent_kernel is not None:
        g_rec = grad[offset:offset + layer.units]
        offset += layer.units
    if weights.bias is not None:
        g_bias = grad[offset]
    return g_in, g_rec, g_bias


def random_feedback(seed, shapes, dtype):
    """Fixed random feedback matrices (n_out, n_l), entries N(0, 1 / n_l) like the readout's
    N(0, 1) / sqrt(fan_in) initialisation, drawn with NumPy from ``seed``."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype) for shape in shapes]


def model_weight_losses(model):
    """Sum of the Keras weight-regularisation losses of the model (computed from variables)."""
    losses = model.losses
    if not losses:
        return None
    return tf.add_n([tf.cast(l, tf.float32) for l in losses])


# ---------------------------------------------------------------------- per-step losses
def _per_step_functions():
    return {keras.losses.mean_squared_error: "mean squared error",
            keras.losses.categorical_crossentropy: "categorical cross-entropy",
            keras.losses.sparse_categorical_crossentropy: "sparse categorical cross-entropy",
            keras.losses.binary_crossentropy: "binary cross-entropy"}


PER_STEP_LOSSES = ("keras.losses.MeanSquaredError", "keras.losses.CategoricalCrossentropy",
                   "keras.losses.SparseCategoricalCrossentropy (ignore_class=None)",
                   "keras.losses.BinaryCrossentropy", "or their names (e.g. 'mse')")


def resolve_loss(loss):
    """A loss name -> the Keras loss object it names (a function name is wrapped with Keras'
    default reduction, as ``kspike.Trainer`` does); anything else is returned unchanged."""
    if not isinstance(loss, str):
        return loss
    try:
        resolved = keras.losses.get(loss)
    except ValueError as error:
        raise ValueError(f"`loss` {loss!r} is not a Keras loss name ({error}).") from None
    if not isinstance(resolved, keras.losses.Loss):
        resolved = compat.wrap_loss_function(resolved, name=loss)
    return resolved


def _unwrap_loss(loss):
    """The Keras loss inside kspike.Trainer's wrappers, its elementwise function and kwargs."""
    from kspike.losses import FunctionLoss, UnscaledLoss
    if isinstance(loss, UnscaledLoss):
        loss = loss.loss
    if type(loss) is FunctionLoss:
        return loss, loss.fn, {}
    wrapped = compat.wrapped_loss_function(loss)
    if wrapped is not None:
        return (loss,) + wrapped
    return loss, None, None


def per_step_reason(loss, y_true, sample_weight, steps):
    """Why ``loss(y_true, y, sample_weight)`` is not a sum over steps of terms that depend only on
    y_t and the target at t (None if it is).

    Such a loss is one of ``PER_STEP_LOSSES`` with a scalar reduction, an elementwise reduction
    over the last axis only, targets with the time axis of the outputs (B, T, n_out), or (B, T)
    or (B, T, 1) class indices for the sparse cross-entropy, and no sample weight or one of shape
    (B, T) or (B, T, 1). (Keras does not broadcast a (B,) weight over the steps of (B, T)
    losses, and a (B, T) target against (B, T, n_out) outputs is reshaped by Keras in ways that
    depend on n_out and T: neither is taken.)
    """
    inner, fn, kwargs = _unwrap_loss(loss)
    functions = _per_step_functions()
    if fn not in functions:
        return (f"the loss {loss!r} is not a per-step loss kspike recognises (one of "
                f"{', '.join(PER_STEP_LOSSES)}): a custom or window-averaged loss couples the "
                "steps")
    if kwargs.get("axis", -1) not in (-1, 2):
        return f"its {functions[fn]} reduces over axis={kwargs['axis']}, not the last axis"
    if kwargs.get("ignore_class") is not None:
        return ("ignore_class re-weights the mean by the number of valid entries of the whole "
                "sequence")
    reduction = getattr(inner, "reduction", "sum_over_batch_size")
    if reduction not in ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight"):
        return f"its reduction {reduction!r} does not give a scalar"
    shape = getattr(y_true, "shape", None)
    sparse = fn is keras.losses.sparse_categorical_crossentropy
    if shape is None or len(shape) < 2:
        return (f"the targets of shape {None if shape is None else tuple(shape)} carry no time "
                "axis (per-step targets are (batch, time, ...))")
    if not (len(shape) == 3 and (not sparse or shape[-1] in (1, None))
            or sparse and len(shape) == 2):
        expected = ("(batch, time) or (batch, time, 1) class indices" if sparse
                    else "(batch, time, n_out) like the outputs")
        return f"the targets of shape {tuple(shape)} are not {expected}"
    if shape[1] is not None and steps is not None and shape[1] != steps:
        return (f"the targets of shape {tuple(shape)} do not have the {steps} time steps of the "
                "inputs on axis 1")
    if sample_weight is not None:
        w_shape = getattr(sample_weight, "shape", None)
        rank = None if w_shape is None else len(w_shape)
        if rank not in (2, 3) or rank == 3 and w_shape[-1] != 1:
            return (f"its sample_weight of shape {None if w_shape is None else tuple(w_shape)} is "
                    "not (batch, time) or (batch, time, 1)")
        if w_shape[1] is not None and steps is not None and w_shape[1] != steps:
            return (f"its sample_weight of shape {tuple(w_shape)} does not have the {steps} time "
                    "steps of the inputs on axis 1")
    return None


class PerStepLoss:
    """A per-step loss (``per_step_reason`` is None) evaluated one step at a time.

    ``step(t, y_t)`` returns the term of step t and its gradient dE/dy_t (B, n_out), where the
    terms sum over t to ``loss(y_true, y, sample_weight)``: the user's loss is called on the
    one-step slices (B, 1, ...) of the targets, outputs and weights, and its value rescaled from
    the slice's reduction to the whole sequence's. Keras' reductions: "sum" adds the weighted
    terms; "sum_over_batch_size" (and "mean") divides their sum by the number of loss entries,
    B*T for the sequence against B for a slice (with or without sample weights): factor 1/T;
    "mean_with_sample_weight" divides by the sum of the weights: factor sum(w_t) / sum(w).
    ``chunk(t0, t1, y)`` does the same for the steps t0 .. t1 - 1 at once (the loss called on
    (B, t1 - t0, ...) slices); build the object with ``chunked=True`` for that use (it then
    keeps the targets and weights as they are instead of as per-step TensorArrays).
    Build it inside the traced function (it holds TensorArrays).
    """

    def __init__(self, loss, y_true, sample_weight, steps, dtype, chunked=False):
        inner, _, _ = _unwrap_loss(loss)
        self.loss = loss
        self.dtype = dtype
        y_true = tf.convert_to_tensor(y_true)
        # Static shapes were checked by per_step_reason; this catches unknown ones.
        check = tf.debugging.assert_equal(
            tf.shape(y_true)[1], steps,
            message="the targets must have the time steps of the inputs on axis 1")
        if check is not None:
            with tf.control_dependencies([check]):
                y_true = tf.identity(y_true)
        perm = [1, 0] + list(range(2, len(y_true.shape)))
        self.chunked = chunked
        self.y_true = y_true if chunked else None
        if not chunked:
            self.targets = tf.TensorArray(y_true.dtype, size=steps).unstack(
                tf.transpose(y_true, perm))
        reduction = getattr(inner, "reduction", "sum_over_batch_size")
        self.sum_reduction = reduction == "sum"
        inv_steps = 1.0 / tf.cast(steps, dtype)
        self.weights = self.total_weight = self.sample_weight = None
        if sample_weight is not None:
            w = tf.cast(sample_weight, dtype)
            if len(w.shape) == 3:
                w = tf.squeeze(w, axis=-1)
            if chunked:
                self.sample_weight = w
            else:
                self.weights = tf.TensorArray(dtype, size=steps).unstack(tf.transpose(w))
            if reduction == "mean_with_sample_weight":
                self.total_weight = tf.reduce_sum(w)
        self.factor = tf.constant(1.0, dtype) if reduction == "sum" else inv_steps

    def step(self, t, y_t):
        """(term of step t, dE/dy_t (B, n_out)) for the output y_t (B, n_out)."""
        target = self.targets.read(t)[:, None]
        weight = None if self.weights is None else self.weights.read(t)[:, None]
        with tf.GradientTape() as tape:
            tape.watch(y_t)
            if weight is None:
                value = self.loss(target, y_t[:, None])
            else:
                value = self.loss(target, y_t[:, None], sample_weight=weight)
            value = tf.cast(value, self.dtype)
            if self.total_weight is not None:
                value = value * tf.math.divide_no_nan(tf.reduce_sum(weight), self.total_weight)
            else:
                value = value * self.factor
        return value, self._error(tape, value, y_t)

    def chunk(self, t0, t1, y):
        """(sum of the terms of steps t0 .. t1 - 1, dE/dy (B, t1 - t0, n_out)) for the outputs
        y (B, t1 - t0, n_out) of those steps (``chunked=True``)."""
        target = self.y_true[:, t0:t1]
        weight = None if self.sample_weight is None else self.sample_weight[:, t0:t1]
        with tf.GradientTape() as tape:
            tape.watch(y)
            if weight is None:
                value = self.loss(target, y)
            else:
                value = self.loss(target, y, sample_weight=weight)
            value = tf.cast(value, self.dtype)
            if self.total_weight is not None:
                value = value * tf.math.divide_no_nan(tf.reduce_sum(weight), self.total_weight)
            elif not self.sum_reduction:
                # The slice's mean is over B (t1 - t0) entries, the sequence's over B T.
                value = value * (tf.cast(t1 - t0, self.dtype) * self.factor)
        return value, self._error(tape, value, y)

    def _error(self, tape, value, y):
        error = tape.gradient(value, y)
        if error is None:
            raise ValueError(f"The loss {self.loss!r} does not depend on the model output: no "
                             "learning signal can be formed.")
        return error


# ---------------------------------------------------------------------- feed-forward deep SNNs
# Rules that run a deep SNN step by step (S-TLLR on Dense/Conv2D synapses followed by
# kspike.IFNeurons/LIFNeurons) see the model as a list of per-step operations.

FEEDFORWARD_SUPPORTED = (
    "chains of Dense / Conv2D synapses (linear activation; bare, in keras.layers.TimeDistributed "
    "or kspike.FoldTime), each followed by a kspike.IFNeurons / kspike.LIFNeurons layer "
    "(return_sequences=True, output='spikes', not stateful), with BatchNormalization (last "
    "axis), MaxPooling2D, AveragePooling2D, Flatten and time-keeping Reshape layers in between; "
    "after the last neuron layer Dense layers (the readout, trained by its exact gradient) and "
    "optionally a GlobalAveragePooling1D (the mean over time)")

_SYNAPSE_TYPES = ("Dense", "Conv2D")
_STRUCTURAL = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Flatten,
               keras.layers.Reshape, keras.layers.Identity, keras.layers.BatchNormalization)


class FeedForwardOp(NamedTuple):
    """One per-step operation of a feed-forward deep SNN.

    kind: "synapse" (Dense/Conv2D whose kernel the rule trains), "neuron" (IF/LIF layer),
    "layer" (a weight-free per-step layer, or BatchNormalization), "readout" (a Dense after the
    last neuron layer). ``layer`` is the model's layer, ``fn`` the layer applied to one step
    (B, ...) (the wrapped layer of TimeDistributed/FoldTime). ``synapse`` (neuron ops only) is
    the index of the synapse op whose postsynaptic neurons these are.
    """
    kind: str
    layer: object
    fn: object
    synapse: Optional[int] = None


class FeedForwardPlan(NamedTuple):
    """A checked feed-forward deep SNN: its per-step operations in order."""
    ops: List[FeedForwardOp]
    time_average: bool        # the model ends with the mean over time (B, n_out)
    steps: Optional[int]      # static T of the input, or None
    input_shape: tuple        # (T, *features) of the model input
    dtype: str


def has_neuron_layers(model):
    """True if the top-level layers of ``model`` include a kspike IF/LIF neuron layer."""
    return any(graph.is_neuron_layer(layer) for layer in getattr(model, "layers", []))


def check_feedforward(model, rule_name):
    """Return the ``FeedForwardPlan`` of ``model`` or raise ValueError naming the first layer
    the rule cannot handle (its name, type and what is supported)."""
    stages = graph.parse(model, rule_name)
    ops = []
    pending = None          # index of a synapse op not yet followed by a neuron layer
    seen_neuron = False
    time_average = False
    for i, stage in enumerate(stages):
        layer = stage.layer
        if time_average:
            graph.refuse(stage, rule_name, f"{FEEDFORWARD_SUPPORTED}; the mean over time must "
                         "be the last layer")
        if isinstance(stage, graph.NeuronLayer):
            _check_feedforward_neuron(layer, rule_name, pending)
            ops.append(FeedForwardOp("neuron", layer, layer, pending))
            pending = None
            seen_neuron = True
            continue
        if isinstance(stage, graph.TimeAverage):
            if not seen_neuron:
                graph.refuse(stage, rule_name, FEEDFORWARD_SUPPORTED)
            time_average = True
            continue
        if not isinstance(stage, graph.PerStepLayer) or not stage.sequence_in:
            graph.refuse(stage, rule_name, FEEDFORWARD_SUPPORTED)
        pending = _feedforward_layer_op(stage, stages[i + 1:], rule_name, ops, pending,
                                        seen_neuron)
    if pending is not None:
        raise ValueError(f"{rule_name}: the synapse {graph.describe(ops[pending].layer)} is not "
                         f"followed by a neuron layer. Supported: {FEEDFORWARD_SUPPORTED}.")
    if not any(op.kind == "synapse" for op in ops):
        raise ValueError(f"{rule_name}: model {model.name!r} has no synapse followed by a "
                         f"neuron layer. Supported: {FEEDFORWARD_SUPPORTED}.")
    input_shape = tuple(model.inputs[0].shape[1:])
    dtype = next(op.layer.state_dtype for op in ops if op.kind == "neuron")
    return FeedForwardPlan(ops=ops, time_average=time_average, steps=input_shape[0],
                           input_shape=input_shape, dtype=dtype)


def _check_feedforward_neuron(layer, rule_name, pending):
    """Raise ValueError if the neuron ``layer`` has unsupported flags or no synapse before it."""
    problems = [flag for flag in ("stateful", "return_state") if getattr(layer, flag, False)]
    if not layer.return_sequences:
        problems.append("return_sequences=False")
    if layer.output_mode != "spikes":
        problems.append(f"output={layer.output_mode!r}")
    if problems:
        raise ValueError(f"{rule_name} does not support {graph.describe(layer)} with "
                         f"{', '.join(problems)}. Supported: {FEEDFORWARD_SUPPORTED}.")
    if pending is None:
        raise ValueError(f"{rule_name}: the neuron {graph.describe(layer)} is not "
                         "preceded by a synapse (a Dense or Conv2D layer since the "
                         "previous neuron layer), so it has no weights to learn. "
                         f"Supported: {FEEDFORWARD_SUPPORTED}.")


def _feedforward_layer_op(stage, rest, rule_name, ops, pending, seen_neuron):
    """Append the op of a per-step layer ``stage`` (synapse, readout, BatchNormalization or
    structural layer) to ``ops``, or refuse it; returns the new pending synapse index."""
    layer, inner = stage.layer, stage.inner
    kind_name = type(inner).__name__
    if kind_name in _SYNAPSE_TYPES and isinstance(inner, (keras.layers.Dense,
                                                          keras.layers.Conv2D)):
        return _feedforward_synapse_op(stage, rest, rule_name, ops, pending, seen_neuron)
    if isinstance(inner, keras.layers.BatchNormalization):
        axis = inner.axis[0] if isinstance(inner.axis, (list, tuple)) and len(
            inner.axis) == 1 else inner.axis
        if axis not in (-1, len(layer.output.shape) - 2):
            graph.refuse(stage, rule_name, f"{FEEDFORWARD_SUPPORTED} (BatchNormalization "
                         "over the last axis)")
        if pending is None:
            raise ValueError(f"{rule_name} supports BatchNormalization only between a "
                             f"synapse and its neuron layer; {graph.describe(layer)} is "
                             f"not. Supported: {FEEDFORWARD_SUPPORTED}.")
        ops.append(FeedForwardOp("layer", layer, inner))
        return pending
    if isinstance(inner, _STRUCTURAL):
        ops.append(FeedForwardOp("layer", layer, inner))
        return pending
    graph.refuse(stage, rule_name, FEEDFORWARD_SUPPORTED)


def _feedforward_synapse_op(stage, rest, rule_name, ops, pending, seen_neuron):
    """Append a Dense/Conv2D ``stage`` to ``ops`` as a synapse or the readout (no neuron
    layer in ``rest``), or refuse it; returns the new pending synapse index."""
    layer, inner = stage.layer, stage.inner
    kind_name = type(inner).__name__
    if inner.activation not in (None, keras.activations.linear):
        activation = getattr(inner.activation, "__name__", inner.activation)
        raise ValueError(f"{rule_name} does not support {graph.describe(layer)} with "
                         f"activation {activation!r}: a synapse's output is the "
                         "neurons' input current. Supported: "
                         f"{FEEDFORWARD_SUPPORTED}.")
    if kind_name == "Conv2D" and getattr(inner, "groups", 1) != 1:
        raise ValueError(f"{rule_name} does not support {graph.describe(layer)} with "
                         f"groups={inner.groups}. Supported: {FEEDFORWARD_SUPPORTED}.")
    if pending is not None:
        raise ValueError(f"{rule_name}: the synapse {graph.describe(layer)} follows the "
                         f"synapse {graph.describe(ops[pending].layer)} with no neuron "
                         "layer in between. Supported: "
                         f"{FEEDFORWARD_SUPPORTED}.")
    if kind_name == "Dense" and _is_last_synapse_free(rest):
        if not seen_neuron:
            graph.refuse(stage, rule_name, FEEDFORWARD_SUPPORTED)
        ops.append(FeedForwardOp("readout", layer, inner))
        return pending
    if kind_name == "Conv2D" and _is_last_synapse_free(rest):
        graph.refuse(stage, rule_name, f"{FEEDFORWARD_SUPPORTED} (a Conv2D must be "
                     "followed by a neuron layer)")
    ops.append(FeedForwardOp("synapse", layer, inner))
    return len(ops) - 1


def _is_last_synapse_free(rest):
    """True if no neuron layer follows (the rest of the chain is the readout part)."""
    return not any(isinstance(s, graph.NeuronLayer) for s in rest)


def batch_norm_train(layer, h):
    """``keras.layers.BatchNormalization`` (last axis) in training mode on one step ``h``,
    written out: normalised with the step's batch statistics over all axes but the last.

    Returns:
        (output, mean, variance); the layer's moving statistics are not touched.
    """
    axes = list(range(h.shape.rank - 1))
    mean, variance = tf.nn.moments(h, axes)
    out = (h - mean) * tf.math.rsqrt(variance + layer.epsilon)
    if layer.scale:
        out = out * tf.cast(layer.gamma, h.dtype)
    if layer.center:
        out = out + tf.cast(layer.beta, h.dtype)
    return out, mean, variance


def update_batch_norm_moving(layer, mean, variance):
    """moving <- momentum moving + (1 - momentum) statistic (Keras' update), once."""
    m = layer.momentum
    layer.moving_mean.assign(m * layer.moving_mean + (1.0 - m) * tf.cast(
        mean, layer.moving_mean.dtype))
    layer.moving_variance.assign(m * layer.moving_variance + (1.0 - m) * tf.cast(
        variance, layer.moving_variance.dtype))


def feedforward_step(plan, x_t, voltages, training, differentiable=False, records=None,
                     bn_stats=None):
    """One step of a feed-forward deep SNN (``FeedForwardPlan``), with kspike's node step.

    Args:
        x_t: (B, *features) input of the step.
        voltages: per neuron op (in order), V_{t-1}.
        training: BatchNormalization with the step's batch statistics (else moving ones).
        differentiable: spikes carry the surrogate gradient; V_{t-1} is always detached (no
            gradient through time).
        records: optional dict filled per synapse op index with ``pre`` (its input), ``out``
            (its output current), ``current`` (the neuron input), ``h`` (H_t), ``spikes``.
        bn_stats: optional dict filled per BatchNormalization op index with (mean, variance).

    Returns:
        (y_t, new voltages).
    """
    h = x_t
    new_voltages = []
    k = 0
    synapse = None
    for i, op in enumerate(plan.ops):
        if op.kind == "neuron":
            params = op.layer.parameters
            current = tf.cast(h, voltages[k].dtype)
            s, v, charged = dynamics.node_step(tf.stop_gradient(voltages[k]), current, params,
                                               differentiable)
            if records is not None:
                records[op.synapse].update(current=current, h=charged, spikes=s)
            new_voltages.append(v)
            k += 1
            h = s
        elif op.kind in ("synapse", "readout"):
            out = op.fn(h)
            if records is not None and op.kind == "synapse":
                records[i] = {"pre": h, "out": out}
            h = out
        elif isinstance(op.fn, keras.layers.BatchNormalization):
            if training:
                h, mean, variance = batch_norm_train(op.fn, h)
                if bn_stats is not None:
                    bn_stats[i] = (mean, variance)
            else:
                h = op.fn(h, training=False)
        else:
            h = op.fn(h)
    return h, new_voltages


def feedforward_initial_voltages(plan, x_t):
    """V_0 of every neuron op for a batch whose first step is ``x_t`` (shapes by a dry run)."""
    voltages = []
    h = x_t
    for op in plan.ops:
        if op.kind == "neuron":
            params = op.layer.parameters
            v0 = tf.fill(tf.shape(h), tf.constant(dynamics.node_initial_voltage(params),
                                                  op.layer.state_dtype))
            voltages.append(v0)
            h = tf.zeros_like(v0)
        elif isinstance(op.fn, keras.layers.BatchNormalization):
            continue
        else:
            h = op.fn(h)
    return voltages
