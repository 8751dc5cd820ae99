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
"""
import keras
import tensorflow as tf

from kspike import dynamics, graph
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
        self._plans[key] = (plan, tf.function(
            lambda x: self._spike_phase(plan, x), reduce_retracing=True))
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
        plan, spike_phase = self._plan(model)
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
