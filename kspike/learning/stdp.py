"""Trace STDP with SpikingJelly's ``STDPLearner`` semantics (docs/stdp.md).

For a synapse with presynaptic spikes ``s_pre`` (B, n_in) and postsynaptic spikes ``s_post``
(B, n_out) at one time step, the traces are updated first and the weight change follows::

    tr_pre  <- tr_pre  - tr_pre  / tau_pre  + s_pre
    tr_post <- tr_post - tr_post / tau_post + s_post
    dW[i, o] = f_post(W)[i, o] sum_b tr_pre[b, i] s_post[b, o]
             - f_pre(W)[i, o]  sum_b s_pre[b, i]  tr_post[b, o]

(Keras kernels are (n_in, n_out), the transpose of PyTorch's (out, in) weight.) Over a sequence the
weight W used by ``f_pre``/``f_post`` stays the one at the start, and dW is summed over time, as in
SpikingJelly's multi-step mode. tau_pre and tau_post are in time steps (>= 1).

Applying it, as SpikingJelly does:

- as a gradient contribution ``-dW * scale``, so any Keras optimizer applies it (plain SGD with
  learning rate lr gives W += lr * scale * dW) and STDP layers and gradient-descent layers train
  in one model (``STDP.compute`` / ``STDP.step(on_grad=True)``);
- as a direct update W += scale * dW (``STDP.update`` / ``STDP.step(on_grad=False)``).

Supported synapses: ``keras.layers.Dense`` (any leading axes) followed by spiking neurons,
``keras.layers.Conv2D`` (channels_last or channels_first, any strides, padding "valid" or "same"
with TensorFlow's padding rule) followed by spiking neurons, either wrapped in
``keras.layers.TimeDistributed``, and the input and recurrent kernels of kspike ``LIF``/``ALIF``
cells (bare or inside ``keras.layers.RNN`` / ``kspike.SpikingRNN``). The recurrent kernel's
presynaptic spikes at step t are the layer's own spikes z_{t-1}; its diagonal change is 0.
Not supported (a clear error is raised): Conv2D with dilation > 1 or groups > 1, other layer
types, and cells with sparse rewired kernels (``connectivity``/``dale``). For a Dense/Conv2D
synapse (also inside ``kspike.FoldTime``) the postsynaptic spikes are those of the
``kspike.IFNeurons``/``kspike.LIFNeurons`` layer that follows it in the model, found by
``kspike.graph.parse`` (``postsynaptic_neurons``), or of the layer given as ``neurons``.
"""
import math

import keras
import numpy as np
import tensorflow as tf

from kspike import graph
from kspike.layers import FoldTime
from kspike.learning.base import LearningRule, RuleResult

__all__ = ["STDP", "SoftBoundPre", "SoftBoundPost", "Clamp", "soft_bounds", "trace_sequence",
           "dense_weight_change", "conv2d_weight_change", "postsynaptic_neurons"]

# Traces are linear filters; up to this many steps a chunk is one (T, T) product.
_CHUNK = 256


# ----------------------------------------------------------------------------- weight dependence
class SoftBoundPre:
    """Soft lower bound for depression: f_pre(W) = W - w_min (depression fades at w_min)."""

    def __init__(self, w_min=0.0):
        self.w_min = float(w_min)

    def __call__(self, w):
        return w - tf.cast(self.w_min, w.dtype)

    def get_config(self):
        return {"w_min": self.w_min}

    def __repr__(self):
        return f"SoftBoundPre(w_min={self.w_min!r})"


class SoftBoundPost:
    """Soft upper bound for potentiation: f_post(W) = w_max - W (potentiation fades at w_max)."""

    def __init__(self, w_max=1.0):
        self.w_max = float(w_max)

    def __call__(self, w):
        return tf.cast(self.w_max, w.dtype) - w

    def get_config(self):
        return {"w_max": self.w_max}

    def __repr__(self):
        return f"SoftBoundPost(w_max={self.w_max!r})"


class Clamp:
    """f(W) = clip(W, w_min, w_max), SpikingJelly's STDP tutorial weight dependence
    (``torch.clamp(w, -1, 1)`` for both f_pre and f_post)."""

    def __init__(self, w_min=-1.0, w_max=1.0):
        self.w_min, self.w_max = float(w_min), float(w_max)
        if not self.w_min < self.w_max:
            raise ValueError(f"`w_min` must be < `w_max`, received w_min={w_min!r}, "
                             f"w_max={w_max!r}.")

    def __call__(self, w):
        return tf.clip_by_value(w, tf.cast(self.w_min, w.dtype), tf.cast(self.w_max, w.dtype))

    def get_config(self):
        return {"w_min": self.w_min, "w_max": self.w_max}

    def __repr__(self):
        return f"Clamp(w_min={self.w_min!r}, w_max={self.w_max!r})"


def soft_bounds(w_min=0.0, w_max=1.0):
    """(f_pre, f_post) of multiplicative STDP keeping weights softly inside [w_min, w_max].

    Example:

    >>> import keras, kspike
    >>> f_pre, f_post = kspike.learning.stdp.soft_bounds(0.0, 1.0)
    >>> w = keras.ops.convert_to_tensor(0.25)
    >>> float(f_pre(w)), float(f_post(w))           # depression and potentiation factors
    (0.25, 0.75)
    >>> layer = keras.layers.RNN(kspike.LIF(16, recurrent=False))
    >>> rule = kspike.learning.STDP(f_pre=f_pre, f_post=f_post, synapse=layer)
    """
    w_min, w_max = float(w_min), float(w_max)
    if not w_min < w_max:
        raise ValueError(f"`w_min` must be < `w_max`, received w_min={w_min!r}, "
                         f"w_max={w_max!r}.")
    return SoftBoundPre(w_min), SoftBoundPost(w_max)


def _identity(w):
    return w


# ----------------------------------------------------------------------------- functional core
def trace_sequence(spikes, tau, initial=None):
    """Traces tr_t = tr_{t-1} - tr_{t-1} / tau + s_t along axis 1.

    Args:
        spikes: (B, T, ...) tensor.
        tau: trace time constant in time steps (>= 1); the decay per step is 1 - 1 / tau.
        initial: optional (B, ...) trace before the first step (default 0).

    Returns:
        (B, T, ...) traces (the trace at step t includes s_t).
    """
    s = tf.convert_to_tensor(spikes)
    decay = 1.0 - 1.0 / float(tau)
    steps = s.shape[1]
    if steps is None:
        start = tf.zeros_like(s[:, 0]) if initial is None else tf.cast(initial, s.dtype)
        out = tf.scan(lambda prev, st: prev - prev / tau + st, tf.experimental.numpy.moveaxis(
            s, 1, 0), initializer=start)
        return tf.experimental.numpy.moveaxis(out, 0, 1)
    pieces = []
    previous = None if initial is None else tf.cast(initial, s.dtype)
    for begin in range(0, steps, _CHUNK):
        chunk = s[:, begin:begin + _CHUNK]
        n = chunk.shape[1]
        t = np.arange(n)
        lag = t[:, None] - t[None, :]
        weights = np.where(lag >= 0, np.power(decay, np.maximum(lag, 0)), 0.0)
        tr = tf.einsum("ts,bs...->bt...", tf.constant(weights, s.dtype), chunk)
        if previous is not None:
            powers = tf.constant(np.power(decay, t + 1.0), s.dtype)
            shape = [1, n] + [1] * (s.shape.rank - 2)
            tr = tr + tf.reshape(powers, shape) * previous[:, None]
        previous = tr[:, -1]
        pieces.append(tr)
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=1)


def _pair_terms_dense(pre, post, trace_pre, trace_post):
    n_in, n_out = pre.shape[-1], post.shape[-1]
    pre2 = tf.reshape(pre, (-1, n_in))
    post2 = tf.reshape(post, (-1, n_out))
    potentiation = tf.matmul(tf.reshape(trace_pre, (-1, n_in)), post2, transpose_a=True)
    depression = tf.matmul(pre2, tf.reshape(trace_post, (-1, n_out)), transpose_a=True)
    return potentiation, depression


def dense_weight_change(kernel, pre, post, tau_pre=2.0, tau_post=100.0, f_pre=None,
                        f_post=None, trace_pre=None, trace_post=None):
    """STDP weight change of a dense kernel over a sequence (SpikingJelly semantics).

    Args:
        kernel: W, (n_in, n_out).
        pre: presynaptic spikes (B, T, ..., n_in).
        post: postsynaptic spikes (B, T, ..., n_out).
        tau_pre, tau_post: trace time constants in time steps.
        f_pre, f_post: weight-dependence callables (identity when None).
        trace_pre, trace_post: traces before the first step, (B, ..., n_in) / (B, ..., n_out).

    Returns:
        (dW, last_trace_pre, last_trace_post); dW (n_in, n_out) in the dtype of ``pre``.
    """
    pre = tf.convert_to_tensor(pre)
    post = tf.cast(post, pre.dtype)
    tr_pre = trace_sequence(pre, tau_pre, trace_pre)
    tr_post = trace_sequence(post, tau_post, trace_post)
    potentiation, depression = _pair_terms_dense(pre, post, tr_pre, tr_post)
    w = tf.cast(kernel, pre.dtype)
    dw = (f_post or _identity)(w) * potentiation - (f_pre or _identity)(w) * depression
    return dw, tr_pre[:, -1], tr_post[:, -1]


def _conv_correlation(inputs, kernel_shape, outputs, strides, padding):
    # sum over batch and output positions of input patches times outputs: the kernel gradient
    # of a convolution, which TensorFlow computes with its own "same" padding rule.
    return tf.raw_ops.Conv2DBackpropFilter(
        input=inputs, filter_sizes=tf.constant(kernel_shape, tf.int32), out_backprop=outputs,
        strides=[1, strides[0], strides[1], 1], padding=padding.upper())


def conv2d_weight_change(kernel, pre, post, strides=(1, 1), padding="valid", tau_pre=2.0,
                         tau_post=100.0, f_pre=None, f_post=None, trace_pre=None,
                         trace_post=None):
    """STDP weight change of a Conv2D kernel over a sequence (channels_last).

    Every kernel entry W[kh, kw, i, o] pairs the input at the patch position (kh, kw), channel
    i, with the output channel o at the same output position, summed over the batch, the output
    positions and time; the presynaptic trace is the trace of the input, zero in the padding.

    Args:
        kernel: W, (kh, kw, C_in, C_out).
        pre: input spikes (B, T, H, W, C_in).
        post: output spikes (B, T, H', W', C_out), H', W' those of the convolution.
        strides: (sh, sw).
        padding: "valid" or "same".
        Other arguments as in ``dense_weight_change`` (traces (B, H, W, C_in) / (B, H', W', C_out)).

    Returns:
        (dW, last_trace_pre, last_trace_post); dW (kh, kw, C_in, C_out).
    """
    pre = tf.convert_to_tensor(pre)
    post = tf.cast(post, pre.dtype)
    tr_pre = trace_sequence(pre, tau_pre, trace_pre)
    tr_post = trace_sequence(post, tau_post, trace_post)
    kernel_shape = [int(d) for d in kernel.shape]

    def merge(a):
        return tf.reshape(a, tf.concat([[-1], tf.shape(a)[2:]], 0))

    potentiation = _conv_correlation(merge(tr_pre), kernel_shape, merge(post), strides, padding)
    depression = _conv_correlation(merge(pre), kernel_shape, merge(tr_post), strides, padding)
    w = tf.cast(kernel, pre.dtype)
    dw = (f_post or _identity)(w) * potentiation - (f_pre or _identity)(w) * depression
    return dw, tr_pre[:, -1], tr_post[:, -1]


# ----------------------------------------------------------------------------- synapses
class _Synapse:
    """What the rule needs to know about one synapse layer."""

    def __init__(self, layer, neurons):
        self.layer = layer
        self.neurons = neurons
        self.cell = graph.spiking_cell_of(layer)
        inner = layer.layer if isinstance(layer, (keras.layers.TimeDistributed,
                                                  FoldTime)) else layer
        self.inner = inner
        if self.cell is not None:
            self.kind = "cell"
            graph.check_undelayed(self.cell, "STDP", layer)
            if self.cell.rewired:
                raise ValueError("STDP does not support cells with sparse rewired kernels "
                                 f"(connectivity={self.cell.connectivity!r}, "
                                 f"dale={self.cell.dale!r}); build the cell with "
                                 "connectivity=None and dale=None.")
            if self.cell.output_mode != "spikes":
                raise ValueError("STDP needs the cell's spikes as its output: build it with "
                                 f"output='spikes', received output={self.cell.output_mode!r}.")
            if neurons is not None and neurons is not layer:
                raise ValueError("`neurons` must be None for a kspike cell (the cell's own "
                                 f"spikes are the postsynaptic activity), received {neurons!r}.")
        elif isinstance(inner, keras.layers.Conv2D) and type(inner).__name__ == "Conv2D":
            self.kind = "conv2d"
            if tuple(inner.dilation_rate) != (1, 1):
                raise ValueError("STDP supports Conv2D with dilation_rate=(1, 1) only, received "
                                 f"dilation_rate={tuple(inner.dilation_rate)!r}.")
            if getattr(inner, "groups", 1) != 1:
                raise ValueError("STDP supports Conv2D with groups=1 only, received "
                                 f"groups={inner.groups!r}.")
            if inner.padding not in ("valid", "same"):
                raise ValueError("STDP supports Conv2D padding 'valid' or 'same', received "
                                 f"padding={inner.padding!r}.")
        elif isinstance(inner, keras.layers.Dense) and type(inner).__name__ == "Dense":
            self.kind = "dense"
        else:
            raise TypeError("`synapse` must be a keras.layers.Dense, a keras.layers.Conv2D "
                            "(optionally inside TimeDistributed), a kspike LIF/ALIF cell or an "
                            f"RNN layer wrapping one; received {layer!r}.")

    def kernels(self, which):
        """[(name, variable)] of the kernels this rule trains."""
        if self.kind != "cell":
            if not self.inner.built:
                raise ValueError(f"The synapse layer {self.inner.name!r} is not built yet; "
                                 "call the model once (or build it) before using STDP.")
            return [("kernel", self.inner.kernel)]
        if not self.cell.built:
            raise ValueError(f"The cell {self.cell.name!r} is not built yet; call the model "
                             "once (or build it) before using STDP.")
        out = []
        if which in ("all", "input"):
            # Dense cells only (rewired ones are refused above): the kernels are the variables.
            out.append(("input", self.cell.input_kernel))
        if which in ("all", "recurrent"):
            if self.cell.recurrent:
                out.append(("recurrent", self.cell.recurrent_kernel))
            elif which == "recurrent":
                raise ValueError("`kernels='recurrent'` needs a recurrent cell, received a cell "
                                 "built with recurrent=False.")
        return out

    def single_rank(self):
        return {"dense": 2, "conv2d": 4, "cell": 2}[self.kind]


# Shape-preserving per-step layers allowed between a synapse and its neuron layer.
_BETWEEN = (keras.layers.BatchNormalization, keras.layers.Dropout, keras.layers.Identity)
_NEURONS = "a kspike.IFNeurons / kspike.LIFNeurons layer"


def _synapse_index(stages, synapse):
    for i, stage in enumerate(stages):
        if stage.layer is synapse or getattr(stage, "inner", None) is synapse:
            return i
    return None


def _is_synapse_stage(stage):
    inner = getattr(stage, "inner", None)
    return (isinstance(stage, graph.PerStepLayer)
            and isinstance(inner, (keras.layers.Dense, keras.layers.Conv2D)))


def _between(stage):
    return isinstance(stage, graph.PerStepLayer) and isinstance(stage.inner, _BETWEEN)


def postsynaptic_neurons(model, synapse, who="STDP"):
    """The neuron layer whose spikes are the postsynaptic activity of ``synapse`` in ``model``.

    ``model`` is parsed by ``kspike.graph.parse``; the answer is the first
    ``kspike.IFNeurons``/``kspike.LIFNeurons`` layer after ``synapse`` (a Dense/Conv2D layer, or
    its TimeDistributed/FoldTime wrapper), with only BatchNormalization, Dropout or Identity
    layers in between (they keep the synapse's output shape).

    Returns:
        (synapse_layer, neuron_layer): the model's layer holding the synapse (the wrapper if
        it is wrapped; its input is the presynaptic activity) and the neuron layer.

    Raises:
        ValueError: ``synapse`` is not a layer of the chain, or is not followed by a neuron
            layer (the message names the layer found instead).

    Example:

    >>> import keras, kspike
    >>> conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    >>> model = keras.Sequential([keras.Input((8, 12, 12, 1)), kspike.FoldTime(conv),
    ...                           kspike.IFNeurons(name="if1")])
    >>> kspike.learning.stdp.postsynaptic_neurons(model, conv)[1].name
    'if1'
    """
    stages = graph.parse(model, who)
    index = _synapse_index(stages, synapse)
    if index is None:
        raise ValueError(f"{who}: the synapse {graph.describe(synapse)} is not a layer of the "
                         f"chain of model {model.name!r}.")
    for stage in stages[index + 1:]:
        if isinstance(stage, graph.NeuronLayer):
            return stages[index].layer, stage.layer
        if not _between(stage):
            raise ValueError(f"{who}: the synapse {graph.describe(synapse)} is followed by "
                             f"{graph.describe(stage.layer)} before any neuron layer; the "
                             f"postsynaptic spikes come from {_NEURONS} right after the synapse "
                             "(only BatchNormalization, Dropout or Identity in between), or "
                             "pass `neurons=` explicitly.")
    raise ValueError(f"{who}: the synapse {graph.describe(synapse)} is not followed by "
                     f"{_NEURONS} in model {model.name!r}; pass `neurons=` explicitly.")


def _check_preceded(model, synapse, neurons, who="STDP"):
    """A neuron layer given as ``neurons`` must be preceded by ``synapse`` (parser)."""
    try:
        stages = graph.parse(model, who)
    except ValueError:
        return None            # not a chain: the layers' own tensors are read as given
    position = next((i for i, s in enumerate(stages) if s.layer is neurons), None)
    if position is None:
        return None
    for stage in reversed(stages[:position]):
        if _between(stage):
            continue
        if stage.layer is synapse or getattr(stage, "inner", None) is synapse:
            return stage.layer
        if _is_synapse_stage(stage):
            raise ValueError(f"{who}: the neuron {graph.describe(neurons)} is preceded by the "
                             f"synapse {graph.describe(stage.layer)}, not by the `synapse` "
                             f"{graph.describe(synapse)}.")
        break
    raise ValueError(f"{who}: the neuron {graph.describe(neurons)} is not preceded by a "
                     "synapse (a Dense or Conv2D layer, only BatchNormalization, Dropout or "
                     "Identity in between), so it cannot be the postsynaptic side of "
                     f"{graph.describe(synapse)}.")


def _check_trace_tau(name, value):
    """A trace time constant ``tau_pre``/``tau_post`` as a float >= 1 (time steps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number (time steps), received {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"`{name}` must be a finite number >= 1 (time steps; the trace "
                         f"decays by 1 - 1/{name} per step), received {value!r}.")
    return value


def _check_scale(scale):
    """STDP's ``scale`` as a finite non-zero float."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"`scale` must be a number, received {scale!r}.") from None
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"`scale` must be a finite non-zero number, received {scale!r}.")
    return scale


def _record_change(rule, pre, post, state):
    """{kernel name: (variable, dW)} of ``rule`` (an ``STDP``) for one multi-step record
    (B, T, ...) of ``pre`` and ``post``; ``state`` holds the traces and is updated."""
    syn = rule.synapse
    out = {}
    pre64 = tf.cast(pre, tf.float64)
    post64 = tf.cast(post, tf.float64)
    for name, var in syn.kernels(rule.kernels):
        if syn.kind == "conv2d":
            layer = syn.inner
            p, q = pre64, post64
            if layer.data_format == "channels_first":
                p = tf.transpose(p, (0, 1, 3, 4, 2))
                q = tf.transpose(q, (0, 1, 3, 4, 2))
            dw, tr_pre, tr_post = conv2d_weight_change(
                var, p, q, layer.strides, layer.padding, rule.tau_pre, rule.tau_post,
                rule.f_pre, rule.f_post, state.get("pre"), state.get("post"))
            state["pre"], state["post"] = tr_pre, tr_post
        elif name == "recurrent":
            z0 = state.get("last_z")
            if z0 is None:
                z0 = tf.zeros_like(post64[:, 0])
            rec_pre = tf.concat([z0[:, None], post64[:, :-1]], axis=1)
            dw, tr_pre, tr_post = dense_weight_change(
                var, rec_pre, post64, rule.tau_pre, rule.tau_post, rule.f_pre, rule.f_post,
                state.get("pre_rec"), state.get("post"))
            dw = dw * (1.0 - tf.eye(dw.shape[0], dtype=dw.dtype))
            state["pre_rec"], state["post_next"] = tr_pre, tr_post
        else:
            dw, tr_pre, tr_post = dense_weight_change(
                var, pre64, post64, rule.tau_pre, rule.tau_post, rule.f_pre, rule.f_post,
                state.get("pre"), state.get("post"))
            state["pre"], state["post_next"] = tr_pre, tr_post
        out[name] = (var, dw)
    if "post_next" in state:
        state["post"] = state.pop("post_next")
    if syn.kind == "cell":
        state["last_z"] = post64[:, -1]
    return out


def _activity_probe(syn, model):
    """A ``keras.Model`` of ``model``'s input returning [pre, post, *outputs]: the activity
    before and after the synapse ``syn`` (a ``_Synapse``) and the model's outputs."""
    layer = syn.layer
    if syn.kind == "cell" and layer is syn.cell:
        # a bare cell: read the activity of the sequence layer that runs it
        wrappers = [l for l in model.layers
                    if graph.is_spiking_layer(l) and l.cell is syn.cell]
        if len(wrappers) != 1:
            raise ValueError(f"The cell {syn.cell.name!r} is run by {len(wrappers)} "
                             "layers of the model; pass the RNN layer as `synapse`.")
        layer = wrappers[0]
    post_layer = layer
    if syn.kind != "cell":
        if syn.neurons is None:
            layer, post_layer = postsynaptic_neurons(model, syn.layer)
        else:
            post_layer = syn.neurons
            if graph.is_neuron_layer(post_layer):
                layer = _check_preceded(model, syn.layer, post_layer) or layer
    try:
        pre = layer.input
        post = post_layer.output
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        probe = keras.Model(inputs, [pre, post] + list(tf.nest.flatten(model.outputs)))
    except (AttributeError, ValueError) as error:
        raise ValueError("STDP.compute needs a functional or Sequential model (built "
                         "from keras.Input) that contains the synapse and neuron "
                         f"layers; could not read their activity: {error}") from None
    return probe


# ----------------------------------------------------------------------------- the rule
class STDP(LearningRule):
    """Trace STDP of one synapse layer, SpikingJelly ``STDPLearner`` semantics.

    Args:
        tau_pre: presynaptic trace time constant in time steps (>= 1).
        tau_post: postsynaptic trace time constant in time steps (>= 1).
        f_pre: weight dependence of depression, a callable W -> tensor (identity when None);
            see ``soft_bounds``.
        f_post: weight dependence of potentiation (identity when None).
        scale: factor of the weight change (> 0 or < 0 for anti-STDP; not 0).
        synapse: the layer whose kernel STDP trains: a ``keras.layers.Dense`` or
            ``keras.layers.Conv2D`` (optionally inside ``TimeDistributed``), or a kspike cell /
            an RNN layer wrapping one. May be None for the functional helpers only.
        neurons: for Dense/Conv2D, the layer whose output spikes are the postsynaptic activity
            (same shape as the synapse's output); None: the neuron layer that follows the
            synapse in the model (``postsynaptic_neurons``). None for cells.
        kernels: for cells, "all" (input and recurrent), "input" or "recurrent".

    Use:
        - ``compute(model, x, y, loss)``: one batch of a model; STDP kernels get -dW * scale
          as their gradient, the other variables their backpropagated gradient (or None when
          ``loss`` is None), so one optimizer (or a ``kspike.Trainer``) trains both. Traces
          start at 0 for each batch, as after SpikingJelly's ``reset()``.
        - ``update(model, x)``: the direct update W += scale * dW of one batch.
        - streaming, as SpikingJelly's monitors: ``record(pre, post)`` after each step
          (single-step (B, ...) or multi-step (B, T, ...) tensors), then ``step(on_grad=True)``
          -> ``[(gradient, variable)]`` for ``optimizer.apply_gradients`` or
          ``step(on_grad=False)`` to update directly. Traces persist across ``step`` calls
          until ``reset()``.

    Example:

    >>> import keras, numpy as np, kspike
    >>> cell = kspike.LIF(16, recurrent=False, seed=0)
    >>> model = keras.Sequential([keras.Input((10, 20)),
    ...                           keras.layers.RNN(cell, return_sequences=True),
    ...                           keras.layers.RNN(kspike.LIF(4, seed=1), return_sequences=True)])
    >>> x = (np.random.default_rng(0).random((2, 10, 20)) < 0.5).astype("float32")
    >>> y = np.zeros((2, 10, 4), "float32")
    >>> rule = kspike.learning.STDP(tau_pre=2.0, tau_post=100.0, synapse=model.layers[0])
    >>> grads = rule.gradients(model, x, y, keras.losses.MeanSquaredError())
    >>> [tuple(g.shape) for g in grads]   # -dW for the STDP kernel, backprop for the others
    [(20, 16), (16, 4), (4, 4)]
    >>> keras.optimizers.SGD(0.1).apply(grads, model.trainable_variables)   # W += 0.1 dW
    """

    name = "stdp"

    def __init__(self, tau_pre=2.0, tau_post=100.0, f_pre=None, f_post=None, scale=1.0,
                 synapse=None, neurons=None, kernels="all"):
        self.tau_pre = _check_trace_tau("tau_pre", tau_pre)
        self.tau_post = _check_trace_tau("tau_post", tau_post)
        for name, f in (("f_pre", f_pre), ("f_post", f_post)):
            if f is not None and not callable(f):
                raise TypeError(f"`{name}` must be a callable W -> tensor or None, received "
                                f"{f!r}.")
        self.f_pre = f_pre
        self.f_post = f_post
        self.scale = _check_scale(scale)
        if kernels not in ("all", "input", "recurrent"):
            raise ValueError("`kernels` must be 'all', 'input' or 'recurrent', received "
                             f"{kernels!r}.")
        self.kernels = kernels
        self.synapse = None if synapse is None else _Synapse(synapse, neurons)
        self._probes = {}
        self.reset()

    def _need_synapse(self):
        if self.synapse is None:
            raise ValueError("This STDP rule has no `synapse`: build it with "
                             "STDP(..., synapse=layer[, neurons=spiking_layer]).")
        return self.synapse

    def _check_pair(self, pre, post):
        syn = self._need_synapse()
        pre = tf.convert_to_tensor(pre)
        post = tf.convert_to_tensor(post)
        single = syn.single_rank()
        if pre.shape.rank not in (single, single + 1) or post.shape.rank != pre.shape.rank:
            raise ValueError(f"STDP of a {syn.kind} synapse expects `pre` and `post` of rank "
                             f"{single} (single step, (B, ...)) or {single + 1} (multi-step, "
                             f"(B, T, ...)); received pre {tuple(pre.shape)} and post "
                             f"{tuple(post.shape)}.")
        if pre.shape.rank == single:
            pre, post = pre[:, None], post[:, None]
        return pre, post

    # ------------------------------------------------------------------ streaming API
    def reset(self):
        """Forget recorded activity and traces (SpikingJelly's ``reset()``)."""
        self._records = []
        self._state = {}

    @property
    def traces(self):
        """Current traces of the streaming API: dict with "pre" (presynaptic, input kernel),
        "post" and, for recurrent cells, "pre_recurrent"; each (B, ...) float64, or None
        before the first ``step``/``weight_change``."""
        return {"pre": self._state.get("pre"), "post": self._state.get("post"),
                "pre_recurrent": self._state.get("pre_rec")}

    def record(self, pre, post):
        """Record one step (B, ...) or a sequence (B, T, ...) of pre- and postsynaptic spikes.

        For a Dense synapse pre is its input (..., n_in) and post the spikes of the neurons
        after it (..., n_out); for Conv2D (B, [T,] H, W, C_in) / (B, [T,] H', W', C_out);
        for a cell its input (B, [T,] n_in) and its spikes (B, [T,] units).
        """
        self._records.append(self._check_pair(pre, post))

    def weight_change(self):
        """Consume the recorded activity; returns [(variable, scale * dW)].

        Raises:
            ValueError: nothing was recorded since the last call.
        """
        if not self._records:
            raise ValueError("STDP has no recorded activity: call record(pre, post) after the "
                             "forward pass (or use compute()/update() with a model) before "
                             "asking for the weight change.")
        total = {}
        records, self._records = self._records, []
        for pre, post in records:
            for name, (var, dw) in _record_change(self, pre, post, self._state).items():
                total[name] = (var, dw if name not in total else total[name][1] + dw)
        return [(var, tf.cast(self.scale * dw, var.dtype)) for var, dw in total.values()]

    def step(self, on_grad=True):
        """Apply the recorded activity, as SpikingJelly's ``STDPLearner.step``.

        Args:
            on_grad: True returns ``[(-scale * dW, variable)]`` to pass to
                ``optimizer.apply_gradients`` (add it to other gradients of the same variable
                if there are any); False adds scale * dW to the weights now and returns
                ``[(scale * dW, variable)]``.
        """
        changes = self.weight_change()
        if on_grad:
            return [(-dw, var) for var, dw in changes]
        for var, dw in changes:
            var.assign_add(dw)
        return [(dw, var) for var, dw in changes]

    # ------------------------------------------------------------------ model API
    def check_model(self, model):
        """Build the probe reading the synapse's activity (raises ValueError if impossible)."""
        self._probe(model)

    def _probe(self, model):
        syn = self._need_synapse()
        key = id(model)
        if key not in self._probes:
            self._probes[key] = _activity_probe(syn, model)
        return self._probes[key]

    def _forward(self, model, x, training):
        outputs = self._probe(model)(x, training=training)
        pre, post, rest = outputs[0], outputs[1], outputs[2:]
        if self.synapse.kind == "cell" and isinstance(post, (list, tuple)):
            post = post[0]
        predictions = rest[0] if len(rest) == 1 else rest
        return pre, post, predictions

    def _changes_for_batch(self, pre, post):
        pre, post = self._check_pair(pre, post)
        changes = _record_change(self, tf.stop_gradient(pre), tf.stop_gradient(post), {})
        return {id(var): tf.cast(self.scale * dw, var.dtype) for var, dw in changes.values()}

    def activity_layers(self, model):
        """(pre, post) symbolic tensors of ``model`` whose values are this rule's pre- and
        postsynaptic activity (build one ``keras.Model`` reading several rules' activity)."""
        probe = self._probe(model)
        return probe.outputs[0], probe.outputs[1]

    def batch_gradients(self, pre, post):
        """[(-scale * dW, variable)] of one batch of activity (B, T, ...), traces from 0 (as
        ``compute``; usable inside a ``tf.function``, unlike the streaming API)."""
        changes = self._changes_for_batch(pre, post)
        return [(-changes[id(var)], var) for _, var in self._need_synapse().kernels(
            self.kernels)]

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        """One batch: STDP kernels get -scale * dW as gradient, the rest backpropagation.

        With ``loss=None`` only the STDP kernels get a gradient (the others None) and the
        returned loss is 0. ``regularizers`` must be empty (a ValueError says so otherwise).
        """
        if regularizers:
            raise ValueError("STDP.compute does not take regularizers (STDP kernels follow "
                             "the STDP rule only); received "
                             f"{list(regularizers)!r}.")
        with tf.GradientTape() as tape:
            pre, post, predictions = self._forward(model, x, training)
            if loss is None:
                value = tf.constant(0.0)
            else:
                value = loss(y, predictions, sample_weight=sample_weight)
        variables = model.trainable_variables
        changes = self._changes_for_batch(pre, post)
        if loss is None:
            backprop = [None] * len(variables)
        else:
            others = [v for v in variables if id(v) not in changes]
            grads = dict(zip([id(v) for v in others], tape.gradient(value, others)))
            backprop = [grads.get(id(v)) for v in variables]
        gradients = [-changes[id(v)] if id(v) in changes else g
                     for v, g in zip(variables, backprop)]
        logs = {"postsynaptic_rate": tf.reduce_mean(tf.cast(post, tf.float32))}
        return RuleResult(loss=value, gradients=gradients, predictions=predictions, logs=logs)

    def update(self, model, x, training=False):
        """Direct update W += scale * dW from one batch ``x`` (B, T, ...) of ``model``.

        Returns:
            [(scale * dW, variable)] applied.
        """
        pre, post, _ = self._forward(model, x, training)
        changes = self._changes_for_batch(pre, post)
        applied = []
        for _, var in self.synapse.kernels(self.kernels):
            var.assign_add(changes[id(var)])
            applied.append((changes[id(var)], var))
        return applied

    def get_config(self):
        def describe(f):
            if f is None:
                return None
            return repr(f) if isinstance(f, (SoftBoundPre, SoftBoundPost, Clamp)) else getattr(
                f, "__name__", repr(f))
        return {"tau_pre": self.tau_pre, "tau_post": self.tau_post,
                "f_pre": describe(self.f_pre), "f_post": describe(self.f_post),
                "scale": self.scale, "kernels": self.kernels}
