"""Rate-based backpropagation (Yu et al., NeurIPS 2024; docs/ratebp.md).

Training in two phases per batch:

1. Spike phase, without a gradient tape: the network runs its T steps with kspike's own step
   (``kspike.dynamics``), and each spiking neuron j of each layer accumulates

       rbar_j = (1/T) sum_t z_j(t)                               mean firing rate
       elig_j = (1/T) sum_t (psi_j(t) / A_j(t)) (1 - alpha) kappa_j(t)
       kappa_j(0) = 1,  kappa_j(t) = 1 + alpha kappa_j(t-1)

   elig_j is d rbar_j / d Ibar_j for a current held constant over the T steps, with the soft
   reset (and the threshold adaptation, which only depends on spikes) detached, as in the
   paper. In kspike's convention v_t = alpha v_{t-1} + (1 - alpha) I_t - A_t z_{t-1} and
   z_t = H((v_t - A_t) / A_t): dv_t / dI_k = (1 - alpha) alpha^(t-k) and dz_t / dv_t = psi_t / A_t,
   so lambda = alpha in the paper's kappa recursion and (1 - alpha) / A_t multiplies psi.

2. Rate phase, with a tape, one step deep: on the time-averaged input xbar each spiking layer
   computes Ibar = r_in W_in + zbar_prev W_rec + bias and outputs a tensor whose value is rbar
   and whose derivative with respect to Ibar is elig (``rbar + elig * (Ibar - stop(Ibar))``).
   The loss is taken on the time-averaged outputs (B, n_out).

Recurrent layers (an approximation, not in the paper): the recurrent input is treated as one
more time-averaged input, zbar_prev = (1/T) sum_t z(t-1), held constant in the rate phase. W_rec
gets the gradient zbar_prev^T (elig * dL/dr), but no gradient flows around the recurrent loop
(the dependence of zbar_prev on the layer's own rate is ignored), exactly as if the layer's past
spikes were an external input.

Memory and time of the backward pass are flat in T: the spike phase keeps only per-neuron
accumulators (no per-step tensors), and the taped graph is one step deep.

Supported models: chains (``keras.Sequential`` or a functional chain) of ``keras.layers.RNN`` /
``kspike.SpikingRNN`` over kspike ``LIF``/``ALIF`` cells (``return_sequences=True``,
``output="spikes"``, dense kernels), ``keras.layers.Dense`` without activation,
``kspike.LeakyReadout`` and ``keras.layers.GlobalAveragePooling1D``.

Deep SNNs (docs/ratebp.md "Deep SNNs"): models of ``kspike.IFNeurons`` / ``kspike.LIFNeurons``
between ``TimeDistributed`` / ``kspike.FoldTime`` weight layers (Conv, Dense, BatchNormalization,
pooling, Flatten, Dropout), residual ``keras.layers.Add`` blocks and the time-mean readout
(``GlobalAveragePooling1D`` as output), in the paper's form: the eligibility recursion of the
hard reset, the soft reset and detach_reset; BatchNorm in the rate phase with the spike phase's
statistics as values and the rate's as derivatives (running statistics from the spike phase
only); the loss gradient divided by T.
"""
import keras
import numpy as np
import tensorflow as tf

from kspike import compat, dynamics, graph
from kspike.learning.base import LearningRule, RuleResult
from kspike.regularizers import SpikeRate, firing_rate_logs

__all__ = ["RateBP"]

_SUPPORTED = ("chains of keras.layers.RNN/kspike.SpikingRNN over kspike cells, Dense (no "
              "activation), LeakyReadout and GlobalAveragePooling1D layers")


class _Item:
    def __init__(self, kind, layer, cell=None):
        self.kind, self.layer, self.cell = kind, layer, cell


class RateBP(LearningRule):
    """Rate-based backpropagation: a spike phase without tape, a one-step rate phase with one.

    The loss receives the time-averaged network output (B, n_out) (the mean over time of what
    the model outputs per step, computed exactly in the spike phase), e.g. logits of a
    rate-coded classification. ``predictions`` in the result are those averages.

    Args:
        detach_recurrent: must be True (the recurrent rate is held constant in the rate
            phase, see the module docstring); kept as an argument so the approximation is
            explicit in configs.

    Example:

    >>> import keras, numpy as np, kspike
    >>> T, n_in = 10, 5
    >>> model = keras.Sequential([keras.Input((T, n_in)),
    ...     keras.layers.RNN(kspike.LIF(16, recurrent=False, seed=0), return_sequences=True),
    ...     keras.layers.RNN(kspike.LIF(8, seed=1), return_sequences=True),
    ...     kspike.LeakyReadout(3, seed=2)])
    >>> x = (np.random.default_rng(0).random((4, T, n_in)) < 0.5).astype("float32")
    >>> y = np.array([0, 1, 2, 1])                    # one class per sequence
    >>> rule = kspike.learning.RateBP()
    >>> grads = rule.gradients(model, x, y, keras.losses.SparseCategoricalCrossentropy(True))
    >>> len(grads) == len(model.trainable_variables)
    True
    """

    name = "ratebp"

    def __init__(self, detach_recurrent=True):
        if detach_recurrent is not True:
            raise ValueError("`detach_recurrent` must be True (rate-based backpropagation holds "
                             "the recurrent input rate constant), received "
                             f"{detach_recurrent!r}.")
        self.detach_recurrent = True
        self._plans = {}

    # ------------------------------------------------------------------ model analysis
    def check_model(self, model):
        self._plan(model)

    def _plan(self, model):
        key = id(model)
        if key in self._plans:
            return self._plans[key]
        if not model.built:
            raise ValueError("RateBP needs a built model: create it from keras.Input or call "
                             "it once before computing gradients.")
        nodes, output = graph.parse_graph(model, "RateBP")
        if any(isinstance(node.stage, graph.NeuronLayer) for node in nodes):
            plan = _deep_plan(nodes, output)
            self._plans[key] = ("deep", plan, output, tf.function(
                lambda x: _deep_spike_phase(plan, x), reduce_retracing=True, autograph=False))
            return self._plans[key]
        plan = []
        for stage in graph.parse(model, "RateBP"):
            layer = stage.layer
            if isinstance(stage, graph.SpikingLayer):
                cell = stage.cell
                graph.check_stateless(stage, "RateBP")
                graph.check_undelayed(cell, "RateBP", layer)
                if not getattr(layer, "return_sequences", False):
                    raise ValueError(f"RateBP needs return_sequences=True on spiking layer "
                                     f"{layer.name!r} (its output rate is a time average).")
                if cell.output_mode != "spikes":
                    raise ValueError(f"RateBP needs output='spikes' on the cell of layer "
                                     f"{layer.name!r}, received {cell.output_mode!r}.")
                if cell.rewired:
                    raise ValueError(f"RateBP does not support sparse rewired kernels (layer "
                                     f"{layer.name!r} has connectivity/dale set).")
                plan.append(_Item("spiking", layer, cell))
            elif isinstance(stage, graph.Readout):
                plan.append(_Item("readout", layer))
            elif isinstance(stage, graph.PerStepLayer) and type(layer) is keras.layers.Dense:
                if layer.activation not in (None, keras.activations.linear):
                    raise ValueError(f"RateBP supports Dense layers without activation only "
                                     f"(they commute with the time average); layer "
                                     f"{layer.name!r} has activation {layer.activation!r}.")
                plan.append(_Item("dense", layer))
            elif isinstance(stage, graph.TimeAverage):
                plan.append(_Item("mean", layer))
            else:
                graph.refuse(stage, "RateBP", _SUPPORTED)
        if not any(item.kind == "spiking" for item in plan):
            raise ValueError("RateBP needs at least one spiking layer (keras.layers.RNN or "
                             "kspike.SpikingRNN over a kspike cell) in the model.")
        for i, item in enumerate(plan):
            if item.kind == "mean" and i != len(plan) - 1:
                raise ValueError("GlobalAveragePooling1D must be the last layer for RateBP.")
        self._plans[key] = ("chain", plan, None, tf.function(
            lambda x: self._spike_phase(plan, x), reduce_retracing=True, autograph=False))
        return self._plans[key]

    # ------------------------------------------------------------------ spike phase
    @staticmethod
    def _spike_phase(plan, x):
        """Run the T steps without gradient; returns per-layer statistics (all (B, n))."""
        x = tf.convert_to_tensor(x)
        steps = tf.shape(x)[1]
        batch = tf.shape(x)[0]
        inputs = tf.TensorArray(x.dtype, size=steps).unstack(tf.transpose(x, (1, 0, 2)))
        kernels, params, carry = _spike_phase_start(plan, batch, x.dtype)

        def body(t, carry):
            h = inputs.read(t)
            new_carry = []
            for item, kern, prm, c in zip(plan, kernels, params, carry):
                if item.kind == "spiking":
                    c, h = _spiking_statistics_step(item.cell, kern, prm, c, h)
                elif item.kind == "readout":
                    c, h = _readout_statistics_step(item.layer, c, h)
                elif item.kind == "dense":
                    h = _dense_step(item.layer, h)
                new_carry.append(c)
            return t + 1, new_carry

        _, carry = tf.while_loop(lambda t, c: t < steps, body, (tf.constant(0), carry))
        count = tf.cast(steps, x.dtype)
        return {"input_mean": tf.reduce_mean(x, axis=1),
                "layers": _spike_phase_statistics(plan, carry, count), "steps": count}

    # ------------------------------------------------------------------ rate phase
    @staticmethod
    def _rate_phase(plan, stats):
        r = stats["input_mean"]
        steps = stats["steps"]
        rates = []
        for item, s in zip(plan, stats["layers"]):
            if item.kind == "spiking":
                cell = item.cell
                w_in, w_rec, bias = cell.effective_kernels(cell.state_dtype)
                current = tf.matmul(tf.cast(r, w_in.dtype), w_in)
                if w_rec is not None:
                    current = current + tf.matmul(s["recurrent_rate"], w_rec)
                if bias is not None:
                    current = current + bias
                r = s["rate"] + s["elig"] * (current - tf.stop_gradient(current))
                rates.append(s["rate"])
            elif item.kind == "readout":
                layer = item.layer
                k = layer.kappa
                # d mean(zhat) / d r for a rate held constant from zhat_{-1} = 0
                slope = 1.0 - k * (1.0 - tf.pow(tf.cast(k, steps.dtype), steps)) / (
                    (1.0 - k) * steps) if k > 0 else tf.ones_like(steps)
                m = s["filtered_mean"]
                r = m + tf.cast(slope, m.dtype) * (tf.cast(r, m.dtype) - tf.stop_gradient(
                    tf.cast(r, m.dtype)))
                r = tf.matmul(r, tf.cast(layer.kernel, r.dtype))
                if layer.bias is not None:
                    r = r + tf.cast(layer.bias, r.dtype)
            elif item.kind == "dense":
                layer = item.layer
                r = tf.matmul(r, tf.cast(layer.kernel, r.dtype))
                if layer.bias is not None:
                    r = r + tf.cast(layer.bias, r.dtype)
        return r, rates

    # ------------------------------------------------------------------ rule
    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        """One batch -> ``RuleResult`` (loss on the time-averaged outputs (B, n_out))."""
        if regularizers:
            raise ValueError("RateBP does not take sequence regularizers (the spike phase keeps "
                             "no spike sequences); received "
                             f"{list(regularizers)!r}.")
        kind, plan, output, spike_phase = self._plan(model)
        if kind == "deep":
            return self._compute_deep(model, plan, output, spike_phase, x, y, loss,
                                      sample_weight, training)
        x = tf.convert_to_tensor(x)
        if x.shape.rank != 3:
            raise ValueError(f"RateBP expects inputs of shape (B, T, n_in), received "
                             f"{tuple(x.shape)}.")
        if not x.dtype.is_floating:
            x = tf.cast(x, "float32")
        stats = tf.nest.map_structure(tf.stop_gradient, spike_phase(x))
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            outputs, rates = self._rate_phase(plan, stats)
            value = loss(y, outputs, sample_weight=sample_weight)
        gradients = tape.gradient(value, variables)
        spiking = [item for item in plan if item.kind == "spiking"]
        logs = firing_rate_logs(
            [SpikeRate(item.layer.name, tf.reduce_mean(r), item.cell.dt,
                                    item.cell.units) for item, r in zip(spiking, rates)])
        return RuleResult(loss=value, gradients=list(gradients), predictions=outputs, logs=logs)

    def loss_outputs(self, model, predictions):
        """The time average (B, n_out) of the model's per-step outputs (B, T, n_out), what
        the loss receives in training; outputs the model averages itself
        (GlobalAveragePooling1D last) pass unchanged."""
        if graph.parse(model, "RateBP")[-1].sequence_out:
            return tf.nest.map_structure(lambda t: tf.reduce_mean(t, axis=1), predictions)
        return predictions

    @staticmethod
    def _compute_deep(model, plan, output, spike_phase, x, y, loss, sample_weight, training):
        x = tf.convert_to_tensor(x)
        expected = tuple(model.inputs[0].shape)
        if x.shape.rank != len(expected):
            raise ValueError(f"RateBP expects inputs of shape {expected} (B, T, ...), "
                             f"received {tuple(x.shape)}.")
        if not x.dtype.is_floating:
            x = tf.cast(x, "float32")
        stats = tf.nest.map_structure(tf.stop_gradient, spike_phase(x))
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            outputs, rates = _deep_rate_phase(plan, output, stats)
            value = loss(y, outputs, sample_weight=sample_weight)
            # the paper's loss: the same value, its gradient divided by T
            scaled = value / tf.cast(stats["steps"], value.dtype)
        gradients = tape.gradient(scaled, variables)
        if training:
            # running statistics: from the spike phase only (the rate phase leaves them)
            for i, item in enumerate(plan):
                if item.kind == "bn":
                    bn, s = item.inner, stats["nodes"][i]
                    bn.moving_mean.assign(tf.cast(s["moving_mean"], bn.moving_mean.dtype))
                    bn.moving_variance.assign(tf.cast(s["moving_variance"],
                                                      bn.moving_variance.dtype))
        logs = firing_rate_logs([SpikeRate(layer.name, tf.reduce_mean(r), 1.0,
                                           int(np.prod(r.shape[1:]))) for layer, r in rates])
        return RuleResult(loss=value, gradients=list(gradients), predictions=outputs, logs=logs)

    def get_config(self):
        return {"detach_recurrent": self.detach_recurrent}


# ---------------------------------------------------------------------- spike phase steps
def _spike_phase_start(plan, batch, dtype):
    """Per stage: effective kernels and parameters (spiking stages) and the zero loop carry:
    (neuron states, kappa, sum z, sum elig, sum z_{t-1}) for a spiking stage, (zhat, sum zhat)
    for the readout, () otherwise."""
    kernels, params, carry = [], [], []
    for item in plan:
        if item.kind == "spiking":
            cell = item.cell
            state_dtype = cell.state_dtype
            kernels.append(cell.effective_kernels(state_dtype))
            params.append(cell.parameters(state_dtype))
            zeros = tf.zeros((batch, cell.units), state_dtype)
            states = cell.get_initial_state(batch)
            carry.append((tuple(states), zeros, zeros, zeros, zeros))
        elif item.kind == "readout":
            width = item.layer.kernel.shape[0]
            zeros = tf.zeros((batch, width), dtype)
            kernels.append(None)
            params.append(None)
            carry.append((zeros, zeros))
        else:
            kernels.append(None)
            params.append(None)
            carry.append(())
    return kernels, params, carry


def _spiking_statistics_step(cell, kernels, params, carry, h):
    """One step of a spiking stage: its new carry and its spikes (the next stage's input)."""
    states, kappa, z_sum, elig_sum, zprev_sum = carry
    state = cell.pack_state(list(states))
    w_in, w_rec, bias = kernels
    current = dynamics.input_current(tf.cast(h, w_in.dtype), state.z, w_in, w_rec, bias)
    new_state, A = dynamics.neuron_step(current, state, params)
    psi = params.spike_function.pseudo_derivative((new_state.v - A) / A)
    if params.n_refractory > 0:
        # refractory neurons pass no pseudo-derivative, as in neuron_step
        psi = psi * tf.cast(tf.equal(state.r, 0.0), psi.dtype)
    kappa = 1.0 + params.alpha * kappa
    elig_sum = elig_sum + psi / A * (1.0 - params.alpha) * kappa
    return ((tuple(cell.unpack_state(new_state)), kappa, z_sum + new_state.z, elig_sum,
             zprev_sum + state.z), new_state.z)


def _readout_statistics_step(layer, carry, h):
    """One step of the leaky readout: (zhat, sum zhat) and its output."""
    zhat, zhat_sum = carry
    k = layer.kappa
    zhat = k * zhat + (1.0 - k) * tf.cast(h, zhat.dtype)
    return (zhat, zhat_sum + zhat), tf.matmul(zhat, tf.cast(layer.kernel, zhat.dtype))


def _dense_step(layer, h):
    h = tf.matmul(h, tf.cast(layer.kernel, h.dtype))
    if layer.bias is not None:
        h = h + tf.cast(layer.bias, h.dtype)
    return h


def _spike_phase_statistics(plan, carry, count):
    """Per stage, the means over the T steps: spiking stages "rate", "elig" and
    "recurrent_rate" (B, n); the readout "filtered_mean"; {} otherwise."""
    stats = []
    for item, c in zip(plan, carry):
        if item.kind == "spiking":
            _, _, z_sum, elig_sum, zprev_sum = c
            stats.append({"rate": z_sum / count, "elig": elig_sum / count,
                          "recurrent_rate": zprev_sum / count})
        elif item.kind == "readout":
            stats.append({"filtered_mean": c[1] / count})
        else:
            stats.append({})
    return stats

# ====================================================================== deep (feed-forward) SNNs
# docs/ratebp.md "Deep SNNs": IFNeurons/LIFNeurons between TimeDistributed/FoldTime weight
# layers, BatchNormalization, residual Add blocks and the time-mean readout, as in the paper's
# code (Tab-ct/rate-based-backpropagation).

_DEEP_SUPPORTED = (
    "kspike.IFNeurons/LIFNeurons (return_sequences=True, output='spikes', not stateful); "
    "keras.layers.TimeDistributed or kspike.FoldTime of Conv1D/Conv2D/Conv3D/Dense (no "
    "activation), BatchNormalization (channels last), MaxPooling1D/2D, AveragePooling1D/2D, "
    "GlobalAveragePooling2D, GlobalMaxPooling2D, Flatten, Dropout; the same layers unwrapped when "
    "they act on the last axis (Dense, Dropout, BatchNormalization); keras.layers.Add; a "
    "keras.layers.Reshape that keeps the time axis; and a final keras.layers."
    "GlobalAveragePooling1D (the time-mean readout)")
_MAP_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense,
               keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
               keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
               keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
               keras.layers.Flatten, keras.layers.Identity)


class _Deep:
    """One node of a deep plan: ``kind`` in reshape, map, dropout, bn, neuron, add, mean."""

    def __init__(self, kind, layer, inputs, inner=None, folded=False):
        self.kind, self.layer, self.inputs = kind, layer, tuple(inputs)
        self.inner, self.folded = inner, folded

    @property
    def step_shape(self):
        """Static shape of one step of the node's output (without batch and time)."""
        return tuple(self.layer.output.shape[2:])


def _check_bn_training(stage, bn):
    layer = stage.layer
    if not bn.trainable or not layer.trainable:
        raise ValueError(f"RateBP: BatchNormalization {describe_layer(layer)} is frozen "
                         "(trainable=False), so Keras runs it in inference mode; RateBP's rate "
                         "phase needs the batch statistics of training mode. Unfreeze it or "
                         "remove it.")
    for kwargs in compat.call_keyword_arguments(layer):
        if kwargs.get("training", None) is False:
            raise ValueError(f"RateBP: BatchNormalization {describe_layer(layer)} is called "
                             "with training=False in the model, so it never uses batch "
                             "statistics; RateBP's rate phase normalises with them. Call it "
                             "without the training argument.")
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    # rank of what the BatchNormalization itself sees: one frame (B, ...) when wrapped
    rank = len(layer.input.shape) - (0 if stage.inner is layer else 1)
    if len(axis) != 1 or axis[0] not in (-1, rank - 1):
        raise ValueError(f"RateBP supports BatchNormalization over the last (channel) axis "
                         f"only; {describe_layer(layer)} has axis={bn.axis!r}.")


def describe_layer(layer):
    return graph.describe(layer)


def _deep_plan(nodes, output):
    plan = []
    for node in nodes:
        stage, layer = node.stage, node.stage.layer
        if isinstance(stage, graph.NeuronLayer):
            for flag, ok in (("return_sequences", True), ("return_state", False),
                             ("stateful", False)):
                if getattr(layer, flag) is not ok:
                    raise ValueError(f"RateBP needs {flag}={ok} on {describe_layer(layer)}.")
            if layer.output_mode != "spikes":
                raise ValueError(f"RateBP needs output='spikes' on {describe_layer(layer)}, "
                                 f"received {layer.output_mode!r}.")
            plan.append(_Deep("neuron", layer, node.inputs))
            continue
        if isinstance(stage, graph.Merge):
            plan.append(_Deep("add", layer, node.inputs))
            continue
        if isinstance(stage, graph.PerStepLayer) and isinstance(layer, keras.layers.Reshape):
            # a Reshape keeping the time axis; stage.inner is its one-step form
            plan.append(_Deep("reshape", layer, node.inputs,
                              inner=tuple(stage.inner.target_shape)))
            continue
        if isinstance(stage, graph.TimeAverage):
            plan.append(_Deep("mean", layer, node.inputs))
            continue
        if isinstance(stage, graph.PerStepLayer) and stage.sequence_in:
            inner = stage.inner
            # A BatchNormalization over (B, T, n) or inside FoldTime normalises over all B*T
            # frames; inside TimeDistributed, over each step's B frames.
            folded = not isinstance(layer, keras.layers.TimeDistributed)
            if type(inner) is keras.layers.BatchNormalization:
                _check_bn_training(stage, inner)
                plan.append(_Deep("bn", layer, node.inputs, inner, folded))
                continue
            if type(inner) is keras.layers.Dropout:
                plan.append(_Deep("dropout", layer, node.inputs, inner))
                continue
            if type(inner) in _MAP_LAYERS:
                activation = getattr(inner, "activation", None)
                if activation not in (None, keras.activations.linear):
                    raise ValueError(f"RateBP supports {type(inner).__name__} layers without "
                                     f"activation only (the rate phase applies them to time "
                                     f"averages); {describe_layer(layer)} has activation "
                                     f"{activation!r}.")
                if stage.inner is layer and not isinstance(
                        inner, (keras.layers.Dense, keras.layers.Identity)):
                    graph.refuse(stage, "RateBP", _DEEP_SUPPORTED)
                plan.append(_Deep("map", layer, node.inputs, inner))
                continue
        if isinstance(stage, graph.SpikingLayer):
            raise ValueError(f"RateBP does not support {describe_layer(layer)} in a model with "
                             "IFNeurons/LIFNeurons layers (recurrent kspike cells are supported "
                             "in chains of recurrent and Dense layers only). Supported here: "
                             f"{_DEEP_SUPPORTED}.")
        graph.refuse(stage, "RateBP", _DEEP_SUPPORTED)
    if plan[output].kind != "mean" or any(output in item.inputs for item in plan):
        raise ValueError("RateBP needs the time-mean readout, a keras.layers."
                         "GlobalAveragePooling1D over time, as the model's output (the loss "
                         "sees the time-averaged output); the model's output is "
                         f"{describe_layer(plan[output].layer)}.")
    for i, item in enumerate(plan):
        if item.kind == "mean" and i != output:
            raise ValueError(f"RateBP: {describe_layer(item.layer)} averages over time before "
                             "the model's output; only the final readout may.")
    return plan


def _batch_shape(batch, dims):
    return tf.concat([[batch], tf.constant(list(dims), tf.int32)], 0)


def _ancestors(plan, roots):
    seen, todo = set(), [r for r in roots if r >= 0]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(j for j in plan[i].inputs if j >= 0)
    return seen


def _bn_affine(bn, xhat):
    if bn.scale:
        xhat = xhat * tf.cast(bn.gamma, xhat.dtype)
    if bn.center:
        xhat = xhat + tf.cast(bn.beta, xhat.dtype)
    return xhat


def _node_constants(layer):
    params = layer.parameters
    leak, gain = dynamics.node_charge_partials(params)
    return params, leak, gain


def _deep_spike_phase(plan, x):
    """The T steps without tape, layer after layer at each step; returns per-node statistics.

    A BatchNormalization over all B*T frames needs its statistics before its first step: one
    extra pass over the T steps (through the nodes feeding it) computes them, in order, so
    memory stays independent of T."""
    x = tf.convert_to_tensor(x)
    steps, batch = tf.shape(x)[1], tf.shape(x)[0]
    rank = x.shape.rank
    frames = tf.TensorArray(x.dtype, size=steps, element_shape=x.shape[:1] + x.shape[2:]
                            ).unstack(tf.transpose(x, [1, 0] + list(range(2, rank))))
    count = tf.cast(steps, x.dtype)
    masks = _deep_dropout_masks(plan, batch, x.dtype)
    folded = {}
    ctx = (plan, frames, steps, batch, x.dtype, masks, folded)
    order = [i for i, item in enumerate(plan) if item.kind == "bn" and item.folded]
    for j in order:
        carry = _deep_run(ctx, _ancestors(plan, plan[j].inputs), False, [j])
        s1, s2 = carry[f"t{j}"]
        mean = s1 / count
        folded[j] = (mean, tf.nn.relu(s2 / count - tf.square(mean)))
    carry = _deep_run(ctx, set(range(len(plan))), True, [])
    stats = _deep_statistics(plan, carry, folded, masks, count)
    return {"input_mean": tf.reduce_mean(x, axis=1), "nodes": stats, "steps": count}


def _deep_dropout_masks(plan, batch, dtype):
    """One dropout mask per Dropout node with rate > 0, shared by all T steps."""
    masks = {}
    for i, item in enumerate(plan):
        if item.kind == "dropout" and item.inner.rate > 0:
            keep = 1.0 - item.inner.rate
            shape = _batch_shape(batch, item.step_shape)
            masks[i] = tf.cast(tf.random.uniform(shape) < keep, dtype) / keep
    return masks


def _deep_initial_carry(plan, batch, dtype, needed, final, targets):
    """The zero loop carry of one pass: "n{i}" per node with a state, "t{j}" per BatchNorm
    whose (sum mean, sum mean of squares) over the steps this pass collects."""
    carry = {}
    for i in sorted(needed):
        item = plan[i]
        shape = _batch_shape(batch, item.step_shape)
        if item.kind == "neuron":
            state_dtype = item.layer.state_dtype
            params = item.layer.parameters
            v0 = tf.fill(shape, tf.constant(dynamics.node_initial_voltage(params), state_dtype))
            zeros = tf.zeros(shape, state_dtype)
            carry[f"n{i}"] = ((v0, zeros, zeros, tf.ones(shape, state_dtype)) if final
                              else (v0,))
        elif item.kind == "bn" and not item.folded and final:
            bn = item.inner
            channels = item.step_shape[-1]
            zeros = tf.zeros((channels,), dtype)
            carry[f"n{i}"] = (zeros, zeros, tf.cast(bn.moving_mean, dtype),
                              tf.cast(bn.moving_variance, dtype))
        elif item.kind == "mean" and final:
            carry[f"n{i}"] = (tf.zeros(_batch_shape(batch, item.layer.input.shape[2:]),
                                       dtype),)
    for j in targets:
        channels = plan[j].step_shape[-1]
        carry[f"t{j}"] = (tf.zeros((channels,), dtype), tf.zeros((channels,), dtype))
    return carry


def _deep_run(ctx, needed, final, targets):
    """One pass over the T steps through the nodes ``needed``; returns the final carry."""
    plan, frames, steps, batch, dtype, masks, folded = ctx
    carry = _deep_initial_carry(plan, batch, dtype, needed, final, targets)

    def body(t, carry):
        return t + 1, _deep_step(ctx, needed, final, targets, frames.read(t), carry)

    # one step at a time: steps running ahead would keep their frames alive
    _, carry = tf.while_loop(lambda t, c: t < steps, body, (tf.constant(0), carry),
                             parallel_iterations=1)
    return carry


def _deep_step(ctx, needed, final, targets, frame, carry):
    """One step of every node in ``needed``; returns the new carry."""
    plan, _, _, batch, dtype, masks, folded = ctx
    new = dict(carry)
    out = {-1: frame}
    for i in sorted(needed):
        item = plan[i]
        h = out[item.inputs[0]]
        if item.kind == "reshape":
            y = tf.reshape(h, _batch_shape(batch, item.inner))
        elif item.kind == "map":
            y = item.inner(h)
        elif item.kind == "dropout":
            y = h * tf.cast(masks[i], h.dtype) if i in masks else h
        elif item.kind == "add":
            y = h
            for j in item.inputs[1:]:
                y = y + tf.cast(out[j], y.dtype)
        elif item.kind == "bn":
            y = _deep_bn_step(item, i, h, final, folded, carry, new)
        elif item.kind == "neuron":
            y = _deep_neuron_step(item, i, h, final, carry, new)
        elif item.kind == "mean":
            new[f"n{i}"] = (carry[f"n{i}"][0] + tf.cast(h, dtype),)
            y = h
        out[i] = y
    for j in targets:
        h = tf.cast(out[plan[j].inputs[0]], dtype)
        axes = list(range(h.shape.rank - 1))
        s1, s2 = carry[f"t{j}"]
        new[f"t{j}"] = (s1 + tf.reduce_mean(h, axes),
                        s2 + tf.reduce_mean(tf.square(h), axes))
    return new


def _deep_bn_step(item, i, h, final, folded, carry, new):
    """One step of BatchNorm node ``i``: folded statistics, or this step's batch statistics
    (accumulated into ``new`` in the final pass)."""
    bn = item.inner
    if item.folded:
        mean, var = folded[i]
    else:
        axes = list(range(h.shape.rank - 1))
        mean = tf.reduce_mean(h, axes)
        var = tf.reduce_mean(tf.square(h - mean), axes)
        if final:
            s1, s2, mm, mv = carry[f"n{i}"]
            m = bn.momentum
            new[f"n{i}"] = (s1 + mean, s2 + var + tf.square(mean),
                            m * mm + (1.0 - m) * mean, m * mv + (1.0 - m) * var)
    return _bn_affine(bn, (h - tf.cast(mean, h.dtype)) * tf.math.rsqrt(
        tf.cast(var, h.dtype) + bn.epsilon))


def _deep_neuron_step(item, i, h, final, carry, new):
    """One step of neuron node ``i`` (its new state into ``new``); returns its spikes."""
    params, leak, _ = _node_constants(item.layer)
    v = carry[f"n{i}"][0]
    current = tf.cast(h, v.dtype)
    hv = dynamics.node_charge(v, current, params)
    s = dynamics.node_fire(hv, params, differentiable=False)
    v_new = dynamics.node_reset(hv, s, params)
    if final:
        _, s_sum, elig_sum, f = carry[f"n{i}"]
        sg = params.spike_function.pseudo_derivative(hv - params.thr)
        elig_sum = elig_sum + f * sg
        f = 1.0 + f * leak * _reset_slope(hv, s, sg, params)
        new[f"n{i}"] = (v_new, s_sum + s, elig_sum, f)
    else:
        new[f"n{i}"] = (v_new,)
    return s


def _deep_statistics(plan, carry, folded, masks, count):
    """Per-node statistics of the final pass: neuron "rate"/"elig", BatchNorm batch and
    running statistics, the readout "mean" and dropout "mask"."""
    stats = {}
    for i, item in enumerate(plan):
        if item.kind == "neuron":
            _, _, gain = _node_constants(item.layer)
            _, s_sum, elig_sum, _ = carry[f"n{i}"]
            stats[i] = {"rate": s_sum / tf.cast(count, s_sum.dtype),
                        "elig": gain * elig_sum / tf.cast(count, s_sum.dtype)}
        elif item.kind == "bn":
            stats[i] = _deep_bn_statistics(item, carry.get(f"n{i}"), folded.get(i), count)
        elif item.kind == "mean":
            stats[i] = {"mean": carry[f"n{i}"][0] / count}
        elif item.kind == "dropout" and i in masks:
            stats[i] = {"mask": masks[i]}
    return stats


def _deep_bn_statistics(item, sums, folded_stats, count):
    if item.folded:
        mean, var = folded_stats
        m = item.inner.momentum
        moving = (m * tf.cast(item.inner.moving_mean, mean.dtype) + (1.0 - m) * mean,
                  m * tf.cast(item.inner.moving_variance, var.dtype) + (1.0 - m) * var)
    else:
        s1, s2, mm, mv = sums
        mean = s1 / count
        var = tf.nn.relu(s2 / count - tf.square(mean))
        moving = (mm, mv)
    return {"mean": mean, "var": var, "moving_mean": moving[0],
            "moving_variance": moving[1]}


def _reset_slope(h, s, sg, params):
    """dV_t/dH_t of the reset (``dynamics.node_step_vjp``): the paper's hard-reset factor
    (1 - S) - H sg for V_reset = 0, 1 - V_th sg for the soft reset, 1 with detach_reset."""
    if params.v_reset is None:
        return tf.ones_like(h) if params.detach_reset else 1.0 - params.thr * sg
    slope = 1.0 - s
    if not params.detach_reset:
        slope = slope + (params.v_reset - h) * sg
    return slope


def _deep_rate_phase(plan, output, stats):
    out = {-1: stats["input_mean"]}
    rates = []
    for i, item in enumerate(plan):
        h = out[item.inputs[0]]
        s = stats["nodes"].get(i, {})
        if item.kind == "reshape":
            y = tf.reshape(h, _batch_shape(tf.shape(h)[0], item.inner))
        elif item.kind == "map":
            y = item.inner(h)
        elif item.kind == "dropout":
            y = h * tf.cast(s["mask"], h.dtype) if "mask" in s else h
        elif item.kind == "add":
            y = h
            for j in item.inputs[1:]:
                y = y + tf.cast(out[j], y.dtype)
        elif item.kind == "bn":
            # value: the spike phase's statistics; derivative: the rate's own statistics.
            axes = list(range(h.shape.rank - 1))
            m_rate = tf.reduce_mean(h, axes)
            mean = tf.cast(s["mean"], h.dtype) + m_rate - tf.stop_gradient(m_rate)
            v_rate = tf.reduce_mean(tf.square(h - mean), axes)
            var = tf.nn.relu(tf.cast(s["var"], h.dtype) + v_rate - tf.stop_gradient(v_rate))
            y = _bn_affine(item.inner, (h - mean) / tf.sqrt(var + item.inner.epsilon))
        elif item.kind == "neuron":
            current = tf.cast(h, s["elig"].dtype) * s["elig"]
            y = s["rate"] + current - tf.stop_gradient(current)
            rates.append((item.layer, s["rate"]))
        elif item.kind == "mean":
            y = tf.cast(s["mean"], h.dtype) + h - tf.stop_gradient(h)
        out[i] = y
    return out[output], rates
