"""S-TLLR (Apolinario & Roy, TMLR 2025): a local, STDP-inspired rule with memory O(n).

docs/stllr.md. For every input, recurrent and bias weight of the spiking layers::

    trace_pre(t)  = lambda_pre  trace_pre(t-1)  + p_t            p = x_t, z_{t-1} or 1 (bias)
    trace_post(t) = lambda_post trace_post(t-1) + psi_t
    dW(t) = L_t (x) [ alpha_post trace_post(t-1) (x) p_t + alpha_pre psi_t (x) trace_pre(t) ]

summed over the batch and the (last k) steps. Recurrent chains: by default (``online=True``)
kspike's own step (``kspike.dynamics``) runs forward in time with (B, n_pre) and (B, n)
traces, memory independent of T; ``online=False`` forms the same gradient from the stored
sequences of one forward pass (per-neuron filters and one matmul per kernel): faster, memory
growing with T.
"""
import math

import keras
import numpy as np
import tensorflow as tf

from kspike import dynamics, engine
from kspike.learning import online as online_rules
from kspike.learning.base import RuleResult
from kspike.learning.eprop import FeedbackRule
from kspike.regularizers import SpikeRate, firing_rate_logs

__all__ = ["STLLR", "stllr_secondary_activation", "stllr_conv_secondary_activation"]

_FEEDBACKS = ("bp", "dfa")


def stllr_secondary_activation(x):
    """S-TLLR's default secondary activation psi = 1 / (100 |x| + 1)^2 of the distance to
    threshold x (dimensionless), same shape as ``x``."""
    d = 100.0 * tf.abs(x) + 1.0
    return 1.0 / (d * d)


def stllr_conv_secondary_activation(x):
    """S-TLLR's secondary activation of convolutional layers, psi = 0.3 max(0, 1 - |x|) of the
    distance to threshold x, same shape as ``x``."""
    return 0.3 * tf.nn.relu(1.0 - tf.abs(x))


def _check_factors(factors):
    """STLLR's ``factors`` as 4 floats (lambda_post, lambda_pre, alpha_post, alpha_pre), the
    two trace decays in [0, 1]."""
    try:
        factors = tuple(float(f) for f in factors)
    except (TypeError, ValueError):
        raise TypeError("`factors` must be 4 numbers (lambda_post, lambda_pre, alpha_post, "
                        f"alpha_pre), received {factors!r}.") from None
    if len(factors) != 4 or not all(math.isfinite(f) for f in factors):
        raise ValueError("`factors` must be 4 finite numbers (lambda_post, lambda_pre, "
                         f"alpha_post, alpha_pre), received {factors!r}.")
    if not (0.0 <= factors[0] <= 1.0 and 0.0 <= factors[1] <= 1.0):
        raise ValueError("The trace decays lambda_post, lambda_pre (`factors[0]`, "
                         f"`factors[1]`) must be in [0, 1], received {factors!r}.")
    return factors


def _check_last_steps(last_steps):
    """STLLR's ``last_steps``: None or an int >= 1."""
    if last_steps is not None:
        if (isinstance(last_steps, bool) or not isinstance(last_steps, (int, np.integer))
                or last_steps < 1):
            raise ValueError(f"`last_steps` must be None or an integer >= 1, received "
                             f"{last_steps!r}.")
        last_steps = int(last_steps)
    return last_steps


def _check_secondary_activation(secondary_activation):
    """STLLR's ``secondary_activation``: None, "surrogate" or a callable, unchanged."""
    if not (secondary_activation is None or secondary_activation == "surrogate"
            or callable(secondary_activation)):
        raise ValueError("`secondary_activation` must be None (the paper's 1/(100|x|+1)^2),"
                         " 'surrogate' or a callable x -> psi, received "
                         f"{secondary_activation!r}.")
    return secondary_activation


@keras.saving.register_keras_serializable(package="kspike")
class STLLR(FeedbackRule):
    """S-TLLR: STDP-like eligibility (pre and post traces) times an instantaneous learning signal.

    Args:
        factors: (lambda_post, lambda_pre, alpha_post, alpha_pre); the paper's CLI default
            (0.2, 0.75, -1.0, 1.0). The lambdas are trace decays per step in [0, 1].
        last_steps: None to update the spiking layers at every step, or k >= 1 to accumulate
            their updates only in the final k steps (the paper's "delay-ls"). Traces run over
            the whole sequence either way; the readout always learns from its exact local
            gradient.
        feedback: "bp": L_t is the gradient of the instantaneous loss at step t backpropagated
            through the layers but not through time (readout: (1 - kappa) dE/dy_t W_out^T;
            lower layers through W_in^T, (1 - alpha) and the cell's pseudo-derivative);
            "dfa": L_t = dE/dy_t B_l with a fixed random matrix B_l per spiking layer (seeded,
            N(0, 1/n_l), held in ``rule.feedback_weights``).
        secondary_activation: psi as a function of the normalised distance to threshold
            x_t = (v_t - A_t) / A_t that kspike's spike function sees (for a unit threshold
            this is S-TLLR's u - thr). None: the paper's 1 / (100 |x| + 1)^2
            (``stllr_secondary_activation``); "surrogate": the cell's own pseudo-derivative;
            or a callable x -> psi. psi is 0 while a neuron is refractory.
        seed: seed of the DFA matrices (None: from NumPy's global generator).
        online: recurrent chains only. True (default): forward in chunks of 64 steps with
            the traces carried across chunks, memory independent of T (apart from the inputs
            and the outputs); one pass for a per-step loss without regulariser (about the
            stored form's time), else an outputs pass first. False: one forward pass
            (kspike's native loop where it applies) stores the (T, B, n) sequences and the
            gradient is formed from them with per-neuron filters and one matmul per kernel:
            about BPTT's time, memory growing with T. Same gradient (docs/stllr.md).

    dE/dy_t for every step comes from the user's loss on the whole output sequence (a first
    inference pass keeps only the (B, T, n_out) outputs), so any per-step or window loss works;
    a ``kspike.FiringRateRegularizer`` adds its per-spike gradient to L_t.

    Supported models: as ``kspike.learning.EProp`` (Input -> kspike spiking RNN layer(s) with
    return_sequences=True -> kspike.LeakyReadout), and feed-forward / convolutional deep SNNs:
    Dense and Conv2D synapses (bare, in TimeDistributed or kspike.FoldTime) each followed by a
    ``kspike.IFNeurons``/``kspike.LIFNeurons`` layer, with BatchNormalization, pooling,
    Flatten and Reshape layers, a Dense readout and optionally the mean over time
    (docs/stllr.md, "Feed-forward and convolutional deep SNNs"). There the traces have the
    shapes of each synapse's input and of its neurons, psi is by default the seed's function of
    the layer type (``stllr_secondary_activation`` after a Dense,
    ``stllr_conv_secondary_activation`` after a Conv2D) of H_t - V_th, and ``last_steps`` must
    not exceed T. Anything else raises ValueError naming the layer.

    Scale of the updates: the spiking layers' updates are much smaller than BPTT's gradient
    (no propagation through time, and the paper's psi is ~1e-4 one threshold away from
    threshold). On the sequential-MNIST LSNN network (thr 0.01, class read from the 56 cue
    steps, ``last_steps=56``) their norms are ~1e-6 (input) and ~1e-11 (recurrent) against
    ~3e-2 and ~4e-2 for BPTT: per entry far below Adam's epsilon (1e-7), so those weights hardly
    move, while a constant shrinkage such as ``kspike.DeepR``'s ``lr * l1`` per step still
    applies and prunes them (activity then dies within a few hundred steps). Use dense kernels
    or ``DeepR(l1=0)`` with this rule. The paper's recurrent (SHD) setting is
    ``factors=(0.5, 1.0, 1.0, 1.0)``, ``last_steps=90``, Adam 2e-4; (0.2, 0.75, -1, 1) is its
    command-line default. ``secondary_activation="surrogate"`` gives updates closer to the BPTT
    gradient on small problems (cosine > 0.5) than the paper's narrow psi; on the
    sequential-MNIST tutorial network (class read from the last 28 steps) the cosines of the
    input and recurrent updates with the BPTT gradient at initialisation are ~0.6 with the
    surrogate psi and ~0 with the paper's, and a ~100-step pre-trace (lambda_pre 0.99) learnt
    best there (``bin/bench_stllr_alignment.py``, ``bin/tutorial_sequential_mnist_with_LSNN.py``).

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> rng = np.random.default_rng(0)
    >>> x = (rng.random((4, 20, 5)) < 0.3).astype("float32")     # (B, T, n_in) spikes
    >>> y = rng.normal(size=(4, 20, 2)).astype("float32")         # (B, T, n_out) targets
    >>> rule = kspike.learning.STLLR(factors=(0.2, 0.75, -1.0, 1.0), last_steps=5)
    >>> grads = rule.gradients(model, x, y, "mse")
    >>> [tuple(g.shape) for g in grads]          # aligned with model.trainable_variables
    [(5, 8), (8, 8), (8, 2), (2,)]
    >>> keras.optimizers.Adam(1e-3).apply(grads, model.trainable_variables)

    A convolutional deep SNN (T = 4 steps of 8x8 images):

    >>> conv = keras.Sequential([keras.Input((4, 8, 8, 1)),
    ...     kspike.FoldTime(keras.layers.Conv2D(4, 3, padding="same", use_bias=False)),
    ...     kspike.LIFNeurons(), kspike.FoldTime(keras.layers.MaxPooling2D()),
    ...     kspike.FoldTime(keras.layers.Flatten()), kspike.FoldTime(keras.layers.Dense(3)),
    ...     keras.layers.GlobalAveragePooling1D()])
    >>> images = rng.random((2, 4, 8, 8, 1)).astype("float32") * 3
    >>> rule = kspike.learning.STLLR(last_steps=2)
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> [tuple(g.shape) for g in rule.gradients(conv, images, np.array([0, 2]), loss)]
    [(3, 3, 1, 4), (64, 3), (3,)]
    """

    name = "stllr"

    def __init__(self, factors=(0.2, 0.75, -1.0, 1.0), last_steps=None, feedback="bp",
                 secondary_activation=None, seed=None, online=True):
        super().__init__(seed)
        self.factors = _check_factors(factors)
        self.last_steps = _check_last_steps(last_steps)
        if feedback not in _FEEDBACKS:
            raise ValueError(f"`feedback` must be one of {_FEEDBACKS}, received {feedback!r}.")
        self.feedback = feedback
        self.secondary_activation = _check_secondary_activation(secondary_activation)
        if not isinstance(online, (bool, np.bool_)):
            raise TypeError(f"`online` must be True or False, received {online!r}.")
        self.online = bool(online)

    def get_config(self):
        return {"factors": self.factors, "last_steps": self.last_steps,
                "feedback": self.feedback, "secondary_activation": self.secondary_activation,
                "seed": self.seed, "online": self.online}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ dispatch
    def check_model(self, model):
        """The plan of ``model``: a recurrent chain (``online.check_chain``) or, when it has
        kspike IF/LIF neuron layers, a feed-forward deep SNN (``online.check_feedforward``);
        raises ValueError naming the first unsupported layer."""
        if isinstance(model, keras.Model) and online_rules.has_neuron_layers(model):
            return online_rules.check_feedforward(model, type(self).__name__)
        return super().check_model(model)

    def _check_inputs(self, plan, x):
        if not isinstance(plan, online_rules.FeedForwardPlan):
            super()._check_inputs(plan, x)
            if self.last_steps is not None:
                steps = getattr(x, "shape", (None, None))[1]
                if steps is not None and self.last_steps > steps:
                    raise ValueError(f"`last_steps`={self.last_steps} is larger than the "
                                     f"{steps} time steps of `x`; use at most T = {steps}.")
            return
        shape = getattr(x, "shape", None)
        expected = (None,) + tuple(plan.input_shape)
        if shape is None or len(shape) != len(expected) or any(
                e is not None and d is not None and d != e
                for d, e in zip(tuple(shape)[1:], expected[1:])):
            raise ValueError(f"`x` must have shape {expected} (batch, time, *features), "
                             f"received {None if shape is None else tuple(shape)}.")
        steps = shape[1] if shape[1] is not None else plan.steps
        if steps is None:
            raise ValueError("STLLR on a feed-forward deep SNN needs a static number of time "
                             f"steps: `x` of shape {tuple(shape)} and a model input of shape "
                             f"{expected} leave T unknown.")
        if self.last_steps is not None and self.last_steps > steps:
            raise ValueError(f"`last_steps`={self.last_steps} is larger than the {steps} time "
                             f"steps of `x`; use at most T = {steps}.")

    def _compute(self, plan, model, x, y, loss, sample_weight, regularizers, training):
        if isinstance(plan, online_rules.FeedForwardPlan):
            return self._compute_feedforward(plan, model, x, y, loss, sample_weight,
                                             regularizers, training)
        return self._compute_recurrent(plan, model, x, y, loss, sample_weight, regularizers,
                                       training)

    # ------------------------------------------------------------------ feed-forward deep SNNs
    def _node_psi(self, x, synapse_layer, params):
        """psi of a neuron layer at the distance to threshold x = H_t - V_th."""
        if self.secondary_activation == "surrogate":
            return params.spike_function.pseudo_derivative(x)
        if self.secondary_activation is not None:
            return tf.cast(self.secondary_activation(x), x.dtype)
        if isinstance(synapse_layer, keras.layers.Conv2D):
            return stllr_conv_secondary_activation(x)
        return stllr_secondary_activation(x)

    @tf.autograph.experimental.do_not_convert
    def _compute_feedforward(self, plan, model, x, y, loss, sample_weight, regularizers,
                             training):
        if regularizers:
            raise ValueError("STLLR on a feed-forward deep SNN takes no regularizers, received "
                             f"{list(regularizers)!r}.")
        dtype = plan.dtype
        x = tf.cast(x, dtype)
        steps = x.shape[1] or plan.steps
        first_update = 0 if self.last_steps is None else steps - self.last_steps
        ops = plan.ops
        neurons = [i for i, op in enumerate(ops) if op.kind == "neuron"]
        batch_norms = [i for i, op in enumerate(ops)
                       if isinstance(op.fn, keras.layers.BatchNormalization)]

        # Pass 1: the outputs only (no tape), for the loss and dE/dy.
        predictions, stats, spike_means = _feedforward_outputs(plan, x, steps, training,
                                                               neurons, batch_norms)
        task_loss, error = online_rules.output_errors(loss, y, predictions, sample_weight)
        if training:
            for i in batch_norms:
                means, variances = zip(*stats[i])
                online_rules.update_batch_norm_moving(ops[i].fn, tf.add_n(means) / steps,
                                                      tf.add_n(variances) / steps)
        feedback = None
        if self.feedback == "dfa":
            n_out = int(predictions.shape[-1])
            shapes = [(n_out, int(np.prod(ops[i].layer.output.shape[2:]))) for i in neurons]
            feedback = [tf.cast(v, dtype) for v in self._build_feedback(shapes, dtype, False)]

        # Pass 2: the traces and the per-step learning signals.
        totals = _feedforward_traces(self, plan, x, steps, training, error, feedback,
                                     first_update)
        total = tf.cast(task_loss, dtype)
        total = _add_weight_losses(model, totals, total, dtype)
        gradients = [totals.get(id(v)) for v in model.trainable_variables]
        logs = {f"spikes_per_step/{ops[i].layer.name}": tf.cast(m, tf.float32)
                for i, m in zip(neurons, spike_means)}
        return RuleResult(loss=total, gradients=gradients, predictions=predictions, logs=logs)

    # ------------------------------------------------------------------ recurrent chains
    def _psi(self, state, A, params, allowed):
        if self.secondary_activation == "surrogate":
            return dynamics.spike_pseudo_derivative(state.v, A, params, allowed)
        fn = self.secondary_activation or stllr_secondary_activation
        psi = tf.cast(fn((state.v - A) / A), state.v.dtype)
        if allowed is not None:
            psi = psi * tf.cast(allowed, psi.dtype)
        return psi

    def _native_psi(self, rec, params):
        """psi of a layer's stored (T, B, n) sequences in one native op
        (``KspikePseudoDerivative``, the float operations of ``_psi`` in its order) for the
        paper's psi or a catalogue surrogate on float32 sequences of the native forward op;
        None where that does not apply (``_psi`` then runs)."""
        v = rec["v"]
        ops = engine.native_rule_ops(v.dtype) if v.dtype == tf.float32 else None
        if ops is None or (rec["allowed"] is not None and rec.get("allowed_u8") is None):
            return None
        if self.secondary_activation is None:
            attrs = {"stllr": True}
        elif self.secondary_activation == "surrogate":
            attrs = engine.native_surrogate_attrs(params.spike_function)
            if attrs is None:
                return None
        else:
            return None
        A = rec["A"]
        threshold = tf.constant(A, tf.float32) if isinstance(A, float) else A
        allowed = rec.get("allowed_u8")
        if allowed is None:
            allowed = tf.zeros((0,), tf.uint8)
        return ops.kspike_pseudo_derivative(v, threshold, allowed, **attrs)

    @tf.autograph.experimental.do_not_convert
    def _compute_recurrent(self, plan, model, x, y, loss, sample_weight, regularizers,
                           training):
        dtype = plan.dtype
        tape, weights, readout, weight_loss = online_rules.watched_weights(plan, model)
        feedback = None
        if self.feedback == "dfa":
            shapes = [(plan.readout.units, layer.units) for layer in plan.layers]
            feedback = [tf.cast(v, dtype) for v in self._build_feedback(shapes, dtype, False)]
        x = tf.cast(x, dtype)
        batch, steps = tf.shape(x)[0], tf.shape(x)[1]
        if self.online and not regularizers and online_rules.per_step_reason(
                loss, y, sample_weight, x.shape[1]) is None:
            # A per-step loss and no regulariser: every step's error is known when its chunk
            # runs, so one pass forms outputs, errors and the gradient (docs/stllr.md).
            stream = online_rules.PerStepLoss(loss, y, sample_weight, steps, dtype,
                                              chunked=True)
            (grads, readout_grad, bias_grad, task_loss, predictions,
             counts) = self._chunked_gradients(plan, weights, readout, feedback, x, None,
                                               [None] * len(plan.layers), stream=stream)
            gradients, total = online_rules.model_gradients(
                tape, model, weights, grads, readout, readout_grad, None, task_loss,
                weight_loss, dtype, readout_bias_grad=bias_grad)
            del tape
            return RuleResult(loss=total, gradients=gradients, predictions=predictions,
                              logs=self._rate_logs(plan, counts, batch, steps, dtype))
        if self.online:
            predictions, counts = _chunked_outputs(plan, weights, readout, x)
        else:
            records = _recurrent_sequences(plan, model, weights, x)
            predictions, counts = _sequence_outputs(plan, readout, records)
        task_loss, error = online_rules.output_errors(loss, y, predictions, sample_weight)
        reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts, batch,
                                                                 steps, dtype)
        if self.online:
            grads, readout_grad = self._chunked_gradients(plan, weights, readout, feedback, x,
                                                          error, reg_signals)
        else:
            grads, readout_grad = self._sequence_gradients(plan, weights, readout, feedback,
                                                           records, error, reg_signals)
        gradients, total = online_rules.model_gradients(tape, model, weights, grads, readout,
                                                        readout_grad, error, task_loss + reg_loss,
                                                        weight_loss, dtype)
        del tape
        return RuleResult(loss=total, gradients=gradients, predictions=predictions,
                          logs=self._rate_logs(plan, counts, batch, steps, dtype))

    @staticmethod
    def _rate_logs(plan, counts, batch, steps, dtype):
        return firing_rate_logs(
            [SpikeRate(layer.layer.name, tf.reduce_mean(c) / tf.cast(batch * steps, dtype),
                       layer.cell.dt, layer.units)
             for layer, c in zip(plan.layers, counts)])

    def _chunked_gradients(self, plan, weights, readout, feedback, x, error, reg_signals,
                           stream=None):
        """The online form: the gradient of ``_sequence_gradients`` accumulated chunk by chunk
        of ``_CHUNK_STEPS`` steps, forward in time, with memory of one chunk.

        ``error``: dE/dy (B, T, n_out) from a first pass; returns (layer grads, readout grad).
        With ``stream`` (an ``online.PerStepLoss`` with ``chunked=True``; ``error`` None)
        the chunk's readout outputs, loss terms and errors are formed in the chunk itself (a
        single pass; the readout gradient sum_t zhat_t^T dE/dy_t from the carried filter of
        the spikes) and it returns (layer grads, readout grad, readout bias grad, loss,
        predictions (B, T, n_out), spike counts per layer).

        Each chunk runs the layers forward from the carried states (``_chunk_records``) and
        adds P^T M of its steps, M from ``_modulation`` started at the carried trace_post;
        the steps before the chunk enter through the carried trace_pre(t0 - 1):
        sum_{t in chunk} lambda_pre^(t - t0 + 1) trace_pre(t0 - 1)^T u_t =
        lambda_pre trace_pre(t0 - 1)^T ubar_t0. Steps before ``last_steps`` have a zero
        learning signal (their traces still run)."""
        dtype = plan.dtype
        kappa = plan.readout.kappa
        lambda_post, lambda_pre = self.factors[:2]
        kernel, out_bias = readout
        n_out = plan.readout.units
        if stream is None:
            err = tf.transpose(error, (1, 0, 2))                            # (T, B, n_out)
            # The readout filter moved onto the errors (online_rules.backward_filter).
            filtered_err = engine.linear_filter(err, kappa, 1.0 - kappa, reverse=True)
        steps = tf.shape(x)[1]
        batch = tf.shape(x)[0]
        first = 0 if self.last_steps is None else tf.maximum(steps - self.last_steps, 0)
        n_chunks = (steps + _CHUNK_STEPS - 1) // _CHUNK_STEPS
        layers = []
        for layer, w in zip(plan.layers, weights):
            entry = {"post": tf.zeros((batch, layer.units), dtype),
                     "pre_x": tf.zeros((batch, layer.n_in), dtype),
                     "g_x": tf.zeros((layer.n_in, layer.units), dtype)}
            if w.recurrent_kernel is not None:
                entry["pre_z"] = tf.zeros((batch, layer.units), dtype)
                entry["g_z"] = tf.zeros((layer.units, layer.units), dtype)
            if w.bias is not None:
                entry["pre_one"] = tf.zeros((), dtype)
                entry["g_bias"] = tf.zeros((layer.units,), dtype)
            layers.append(entry)
        readout_grad = tf.zeros((plan.layers[-1].units, n_out), dtype)
        states = [[tf.cast(s, dtype) for s in layer.cell.get_initial_state(batch)]
                  for layer in plan.layers]
        # Single pass: the readout's filter states (of the output and of the spikes), the
        # loss, the bias gradient, the spike counts and the outputs.
        outputs = {"filtered": tf.zeros((batch, n_out), dtype),
                   "zhat": tf.zeros((batch, plan.layers[-1].units), dtype),
                   "loss": tf.zeros((), dtype), "bias_grad": tf.zeros((n_out,), dtype),
                   "counts": [tf.zeros((layer.units,), dtype) for layer in plan.layers],
                   "ys": tf.TensorArray(dtype, size=(steps + _CHUNK_STEPS - 1) // _CHUNK_STEPS,
                                        infer_shape=False)}

        def body(c, states, layers, readout_grad, outputs):
            t0 = c * _CHUNK_STEPS
            t1 = tf.minimum(t0 + _CHUNK_STEPS, steps)
            length = t1 - t0
            records, finals = _chunk_records(plan, weights, x[:, t0:t1], states)
            z_last = records[-1]["z"]                                          # (K, B, n)
            if stream is None:
                err_c = err[t0:t1]
            else:
                outputs = dict(outputs)
                y_c, outputs["filtered"] = online_rules.readout_chunk(
                    z_last, kernel, out_bias, kappa, outputs["filtered"])
                outputs["ys"] = outputs["ys"].write(c, y_c)
                value, err_bm = stream.chunk(t0, t1, tf.transpose(y_c, (1, 0, 2)))
                err_c = tf.transpose(err_bm, (1, 0, 2))
                outputs["loss"] = outputs["loss"] + value
                outputs["bias_grad"] = outputs["bias_grad"] + tf.reduce_sum(err_c, axis=(0, 1))
                outputs["counts"] = [n + tf.reduce_sum(r["z"], axis=(0, 1))
                                     for n, r in zip(outputs["counts"], records)]
            flat_err = tf.reshape(err_c, (-1, n_out))
            steps_out = [_neuron_rows(rec) for rec in records]
            if self.feedback == "dfa":
                signals = _dfa_signals(flat_err, feedback, reg_signals)
            else:
                signals = _bp_signals(flat_err, readout[0], kappa, steps_out, weights,
                                      reg_signals)
            active = tf.cast(tf.range(t0, t1) >= first, dtype)[:, None, None]   # (K, 1, 1)
            decay_post = tf.pow(tf.constant(lambda_post, dtype), tf.cast(length, dtype))
            decay_pre = tf.pow(tf.constant(lambda_pre, dtype), tf.cast(length, dtype))
            new_layers = []
            for rec, w, (_, state, A, allowed), signal, entry in zip(
                    records, weights, steps_out, signals, layers):
                shape = tf.shape(rec["v"])
                psi = self._native_psi(rec, w.params)
                if psi is None:
                    psi = tf.reshape(self._psi(state, A, w.params, allowed), shape)
                signal = tf.reshape(signal, shape) * active
                m, ubar0 = _modulation(psi, signal, entry["post"], self.factors)
                m_flat = tf.reshape(m, (-1, rec["units"]))
                new = {"post": decay_post * entry["post"] + _decayed_sum(psi, lambda_post)}
                x_c = rec["x"]
                new["g_x"] = (entry["g_x"] + engine.sparse_transpose_matmul(
                    tf.reshape(x_c, (-1, x_c.shape[-1])), m_flat)
                    + lambda_pre * tf.matmul(entry["pre_x"], ubar0, transpose_a=True))
                new["pre_x"] = decay_pre * entry["pre_x"] + _decayed_sum(x_c, lambda_pre)
                if "g_z" in entry:
                    new["g_z"] = (entry["g_z"] + _shifted_product(rec["z0"], rec["z"], m, 0)
                                  + lambda_pre * tf.matmul(entry["pre_z"], ubar0,
                                                           transpose_a=True))
                    # z_{t-1} over the chunk is z0, z_0 .. z_{K-2}: its decayed sum is
                    # lambda_pre^(K-1) z0 + that of z[:-1] (no shifted copy).
                    new["pre_z"] = (decay_pre * entry["pre_z"]
                                    + tf.pow(tf.constant(lambda_pre, dtype),
                                             tf.cast(length - 1, dtype)) * rec["z0"]
                                    + _decayed_sum(rec["z"][:-1], lambda_pre))
                if "g_bias" in entry:
                    new["g_bias"] = (entry["g_bias"] + tf.reduce_sum(m_flat, axis=0)
                                     + lambda_pre * entry["pre_one"]
                                     * tf.reduce_sum(ubar0, axis=0))
                    ones = tf.reduce_sum(tf.pow(tf.constant(lambda_pre, dtype),
                                                tf.cast(tf.range(length), dtype)))
                    new["pre_one"] = decay_pre * entry["pre_one"] + ones
                new_layers.append(new)
            if stream is None:
                readout_grad = readout_grad + tf.matmul(
                    tf.reshape(z_last, (-1, z_last.shape[-1])),
                    tf.reshape(filtered_err[t0:t1], (-1, n_out)), transpose_a=True)
            else:
                zhat = engine.linear_filter(z_last, kappa, 1.0 - kappa,
                                            initial=outputs["zhat"])
                outputs["zhat"] = zhat[-1]
                readout_grad = readout_grad + tf.matmul(
                    tf.reshape(zhat, (-1, zhat.shape[-1])), flat_err, transpose_a=True)
            return c + 1, finals, new_layers, readout_grad, outputs

        # parallel_iterations=1: later chunks' forward passes do not wait for the earlier
        # chunks' products, and would otherwise run ahead with their sequences in memory.
        _, _, layers, readout_grad, outputs = tf.while_loop(
            lambda c, *_: c < n_chunks, body, (0, states, layers, readout_grad, outputs),
            parallel_iterations=1)
        grads = [(entry["g_x"], entry.get("g_z"), entry.get("g_bias")) for entry in layers]
        if stream is None:
            return grads, readout_grad
        predictions = outputs["ys"].concat()
        predictions.set_shape([x.shape[1], x.shape[0], n_out])
        return (grads, readout_grad, outputs["bias_grad"], outputs["loss"],
                tf.transpose(predictions, (1, 0, 2)), outputs["counts"])

    def _sequence_gradients(self, plan, weights, readout, feedback, records, error,
                            reg_signals):
        """The sum over batch and steps of the rule's updates from the stored sequences
        (``_recurrent_sequences``): per-neuron filters on (T, B, n) and one matmul per kernel.

        sum_t trace_pre(t)^T u_t = sum_s p_s^T ubar_s with ubar the backward filter (decay
        lambda_pre) of u_t = alpha_pre psi_t L_t, so every kernel's gradient is P^T M with
        M_t = alpha_post trace_post(t-1) L_t + ubar_t over the updated steps t >= t0; the
        steps before t0 enter only through trace_pre(t0 - 1) (one weighted sum over time).
        """
        dtype = plan.dtype
        kappa = plan.readout.kappa
        lambda_post, lambda_pre = self.factors[:2]
        err = tf.transpose(error, (1, 0, 2))                                # (T, B, n_out)
        steps = tf.shape(err)[0]
        first = 0 if self.last_steps is None else tf.maximum(steps - self.last_steps, 0)
        n_out = int(err.shape[-1])
        flat_err = tf.reshape(err, (-1, n_out))
        steps_out = [_neuron_rows(rec) for rec in records]
        if self.feedback == "dfa":
            signals = _dfa_signals(flat_err, feedback, reg_signals)
        else:
            signals = _bp_signals(flat_err, readout[0], kappa, steps_out, weights, reg_signals)
        grads = []
        for rec, w, (_, state, A, allowed), signal in zip(records, weights, steps_out,
                                                           signals):
            shape = tf.shape(rec["v"])
            psi = self._native_psi(rec, w.params)                              # (T, B, n)
            if psi is None:
                psi = tf.reshape(self._psi(state, A, w.params, allowed), shape)
            signal = tf.reshape(signal, shape)
            # trace_post(t0 - 1), then trace_post(t - 1) over the updated steps.
            post_before = _decayed_sum(psi[:first], lambda_post)
            m, u_first = _modulation(psi[first:], signal[first:], post_before, self.factors)
            m_flat = tf.reshape(m, (-1, rec["units"]))
            carried = u_first if self.last_steps is not None else None
            # (presynaptic sequence before the updated steps, kernel gradient): the input,
            # and z_{t-1} (z0 at t = 0) as two products over views of z instead of one over
            # a shifted copy of the whole sequence.
            parts = [(rec["x"][:first], engine.sparse_transpose_matmul(
                tf.reshape(rec["x"][first:], (-1, rec["x"].shape[-1])), m_flat))]
            if w.recurrent_kernel is not None:
                parts.append((_shifted(rec["z0"], rec["z"][:first])[:first],
                              _shifted_product(rec["z0"], rec["z"], m, first)))
            kernel_grads = []
            for early, g in parts:
                if carried is not None:
                    # trace_pre(t0) = lambda_pre trace_pre(t0 - 1) + p_t0: the earlier
                    # steps' part of the first updated step's trace.
                    before = lambda_pre * _decayed_sum(early, lambda_pre)
                    g = g + tf.matmul(before, carried, transpose_a=True)
                kernel_grads.append(g)
            g_bias = None
            if w.bias is not None:
                ones = lambda_pre * tf.reduce_sum(tf.pow(tf.constant(lambda_pre, dtype),
                                                         tf.cast(tf.range(first), dtype)))
                g_bias = tf.reduce_sum(m_flat, axis=0)
                if carried is not None:
                    g_bias = g_bias + ones * tf.reduce_sum(carried, axis=0)
            g_rec = kernel_grads[1] if w.recurrent_kernel is not None else None
            grads.append((kernel_grads[0], g_rec, g_bias))
        z_last = records[-1]["z"]
        filtered = online_rules.backward_filter(error, kappa)              # (B, T, n_out)
        readout_grad = engine.sparse_transpose_matmul(
            tf.reshape(z_last, (-1, z_last.shape[-1])),
            tf.reshape(tf.transpose(filtered, (1, 0, 2)), (-1, n_out)))
        return grads, readout_grad


def _decayed_sum(seq, decay):
    """sum_s decay^(S - 1 - s) seq_s of a (S, B, n) sequence: its filter's value at the last
    step (zeros for S = 0), (B, n)."""
    length = tf.shape(seq)[0]
    powers = tf.pow(tf.constant(decay, seq.dtype),
                    tf.cast(tf.range(length - 1, -1, -1), seq.dtype))
    flat = tf.reshape(seq, (length, -1))
    out = tf.matmul(powers[None], flat)
    return tf.reshape(out, tf.shape(seq)[1:])


def _shifted(z0, z):
    """z_{t-1} of every step t, (T, B, n): z0 then z_0 ... z_{T-2}."""
    return tf.concat([z0[None], z[:-1]], axis=0)


def _shifted_product(z0, z, m, first):
    """sum_{t >= first} z_{t-1}^T m_{t - first} with z_{-1} = z0 and m over the steps from
    ``first`` on: the recurrent kernel's gradient without a shifted copy of z."""
    n, q = z.shape[-1], m.shape[-1]
    # Steps t >= max(first, 1) read z_{t-1} from z; step 0 (when updated) reads z0.
    start = tf.maximum(first, 1)
    steps = tf.shape(z)[0]
    rest = engine.sparse_transpose_matmul(tf.reshape(z[start - 1:steps - 1], (-1, n)),
                                          tf.reshape(m[start - first:], (-1, q)))
    head = tf.matmul(z0, m[0], transpose_a=True)
    return rest + head * tf.cast(tf.equal(first, 0), head.dtype)


def _modulation(psi, signal, post_before, factors):
    """M_t = alpha_post trace_post(t-1) L_t + ubar_t over (S, B, n) sequences psi_t and L_t
    from trace_post(-1) = ``post_before``, with ubar the backward filter (decay lambda_pre) of
    alpha_pre psi_t L_t; returns (M, ubar_0). One native op where it loads (the same
    products and sums in the same order, so the same result bit for bit), else TensorFlow's
    filters and element-wise ops."""
    lambda_post, lambda_pre, alpha_post, alpha_pre = factors
    ops = engine.native_rule_ops(psi.dtype)
    if ops is not None:
        return ops.kspike_stllr_modulation(
            psi, signal, post_before,
            tf.constant([lambda_post, lambda_pre, alpha_post, alpha_pre], psi.dtype))
    post = _forward_filter(psi, lambda_post, post_before)
    post_previous = tf.concat([post_before[None], post[:-1]], axis=0)
    u_filtered = _backward_filter(alpha_pre * psi * signal, lambda_pre)
    return alpha_post * post_previous * signal + u_filtered, u_filtered[0]


def _forward_filter(seq, decay, initial):
    """trace_t = decay trace_{t-1} + seq_t with trace_{-1} = initial, (S, B, n)."""
    return engine.linear_filter(seq, decay, initial=initial)


def _backward_filter(seq, decay):
    """out_t = sum_{t' >= t} decay^(t' - t) seq_t', (S, B, n)."""
    return engine.linear_filter(seq, decay, reverse=True)


# Steps per chunk of the online form: its memory is a few (_CHUNK_STEPS, B, n) sequences
# per layer, and its cost about that of the stored-sequence form (a few ops per chunk).
_CHUNK_STEPS = 64


def _neuron_rows(rec):
    """(None, NeuronState(v), A, allowed) of a layer's (K, B, n) record, flattened to
    (K B, n) rows: what ``_bp_signals`` and ``STLLR._psi`` read."""
    v = tf.reshape(rec["v"], (-1, rec["units"]))
    A = rec["A"] if isinstance(rec["A"], float) else tf.reshape(rec["A"], tf.shape(v))
    allowed = None if rec["allowed"] is None else tf.reshape(rec["allowed"], tf.shape(v))
    return None, dynamics.NeuronState(v=v, b=None, z=None, r=None), A, allowed


def _chunk_records(plan, weights, x, states, spikes_only=False):
    """The layers run forward over one chunk ``x`` (B, K, n_in) from ``states`` (each
    layer's state list): the records of ``_recurrent_sequences`` for the chunk (with
    ``spikes_only``, their spikes only) and the state lists at its end."""
    records, finals = [], []
    inputs = x
    for layer, w, initial in zip(plan.layers, weights, states):
        record, final = _layer_record(plan, layer, w, inputs, initial, spikes_only)
        records.append(record)
        finals.append(final)
        inputs = tf.transpose(record["z"], (1, 0, 2))
    return records, finals


def _chunked_outputs(plan, weights, readout, x):
    """The readout sequence (B, T, n_out) and every layer's spike counts (n,) from a forward
    pass in chunks of ``_CHUNK_STEPS`` steps that keeps only the outputs."""
    dtype = plan.dtype
    kernel, bias = readout
    kappa = plan.readout.kappa
    batch, steps = tf.shape(x)[0], tf.shape(x)[1]
    n_chunks = (steps + _CHUNK_STEPS - 1) // _CHUNK_STEPS
    n_out = plan.readout.units
    states = [[tf.cast(s, dtype) for s in layer.cell.get_initial_state(batch)]
              for layer in plan.layers]
    counts = [tf.zeros((layer.units,), dtype) for layer in plan.layers]
    zhat = tf.zeros((batch, n_out), dtype)
    ys = tf.TensorArray(dtype, size=n_chunks, infer_shape=False)

    def body(c, states, counts, zhat, ys):
        t0 = c * _CHUNK_STEPS
        t1 = tf.minimum(t0 + _CHUNK_STEPS, steps)
        records, finals = _chunk_records(plan, weights, x[:, t0:t1], states, spikes_only=True)
        counts = [n + tf.reduce_sum(r["z"], axis=(0, 1)) for n, r in zip(counts, records)]
        # The outputs without the bias, added once at the end.
        filtered, end = online_rules.readout_chunk(records[-1]["z"], kernel, None, kappa, zhat)
        return c + 1, finals, counts, end, ys.write(c, filtered)

    _, _, counts, _, ys = tf.while_loop(lambda c, *_: c < n_chunks, body,
                                        (0, states, counts, zhat, ys), parallel_iterations=1)
    y = ys.concat()
    y.set_shape([x.shape[1], x.shape[0], n_out])
    y = tf.transpose(y, (1, 0, 2))
    if bias is not None:
        y = y + bias
    return y, counts


def _layer_record(plan, layer, w, inputs, initial, spikes_only=False):
    """One layer's forward pass over ``inputs`` (B, T, n_in) from the state list
    ``initial``: its record of ``_recurrent_sequences`` (with ``spikes_only``: "z" only) and
    its final state list."""
    cell = layer.cell
    dtype = plan.dtype
    params = cell.parameters(dtype)
    w_rec = None if w.recurrent_kernel is None else tf.stop_gradient(w.recurrent_kernel)
    bias = None if w.bias is None else tf.stop_gradient(w.bias)
    w_in = tf.stop_gradient(w.input_kernel)
    seq = engine.forward_sequences(cell, tf.cast(inputs, dtype), w_in, w_rec, bias, initial,
                                   native=getattr(layer.layer, "native", "auto"),
                                   spikes_only=spikes_only)
    if spikes_only:
        return {"z": seq["z"]}, seq["final"]
    x_time = tf.transpose(inputs, (1, 0, 2))
    z, z0, v, A, allowed = seq["z"], seq["z0"], seq["v"], seq["A"], seq["allowed"]
    if A is None:
        A = float(params.thr)
    allowed_u8 = allowed if allowed is not None and allowed.dtype == tf.uint8 else None
    if allowed is not None:
        allowed = tf.not_equal(tf.cast(allowed, dtype), 0.0)
    return ({"x": x_time, "z": z, "z0": z0, "v": v, "A": A, "allowed": allowed,
             "allowed_u8": allowed_u8, "units": layer.units}, seq["final"])


def _recurrent_sequences(plan, model, weights, x):
    """One forward pass of the spiking layers keeping, time-major (T, B, n), what the rule
    needs: each layer's input ``x``, spikes ``z`` and ``z0`` (z_{-1}), voltage ``v``,
    threshold ``A`` (the float thr for LIF cells) and refractory mask ``allowed`` (bool, or
    None; ``allowed_u8``: the native forward op's uint8 mask, or None).

    The loops are kspike's engine (``kspike.engine``): its native C++ forward loop where it
    applies to the cell (float32, catalogue surrogate, CPU), else its TensorFlow loop; the
    weights are detached (gradients are formed by the rule, not by autodiff)."""
    records = []
    inputs = x                                                    # (B, T, n_in)
    batch = tf.shape(x)[0]
    for layer, w in zip(plan.layers, weights):
        initial = [tf.cast(s, plan.dtype) for s in layer.cell.get_initial_state(batch)]
        record, _ = _layer_record(plan, layer, w, inputs, initial)
        records.append(record)
        inputs = tf.transpose(record["z"], (1, 0, 2))
    return records


def _sequence_outputs(plan, readout, records):
    """The readout sequence y (B, T, n_out) and every layer's spike counts (n,) from the
    stored spikes: y_t = zhat_t W_out + b with zhat the leaky filter of the last layer's
    spikes (the filter applied after the product, which is linear)."""
    kernel, bias = readout
    y, _ = online_rules.readout_chunk(records[-1]["z"], kernel, bias, plan.readout.kappa)
    counts = [tf.reduce_sum(rec["z"], axis=(0, 1)) for rec in records]
    return tf.transpose(y, (1, 0, 2)), counts


# ---------------------------------------------------------------------- feed-forward deep SNNs
def _accumulate(totals, var, grad):
    """Add ``grad`` (cast to the variable's dtype) to the total of ``var``; None adds nothing."""
    if grad is None:
        return
    key = id(var)
    grad = tf.cast(grad, var.dtype)
    totals[key] = grad if key not in totals else totals[key] + grad


def _feedforward_outputs(plan, x, steps, training, neurons, batch_norms):
    """Pass 1 over the T steps without tape: the predictions, the per-step BatchNorm
    statistics and each neuron layer's mean spikes per step."""
    dtype = plan.dtype
    ops = plan.ops
    voltages = online_rules.feedforward_initial_voltages(plan, x[:, 0])
    outputs, stats = [], {i: [] for i in batch_norms}
    spike_means = [tf.constant(0.0, dtype) for _ in neurons]
    for t in range(steps):
        step_stats = {}
        records = {}
        y_t, voltages = online_rules.feedforward_step(plan, x[:, t], voltages, training,
                                                      False, records, step_stats)
        for i, value in step_stats.items():
            stats[i].append(value)
        for k, i in enumerate(neurons):
            spike_means[k] = spike_means[k] + tf.reduce_mean(
                records[ops[i].synapse]["spikes"]) / steps
        outputs.append(y_t)
    if plan.time_average:
        predictions = tf.add_n(outputs) / steps
    else:
        predictions = tf.stack(outputs, axis=1)
    del outputs
    return predictions, stats, spike_means


def _feedforward_traces(rule, plan, x, steps, training, error, feedback, first_update):
    """Pass 2 over the T steps: the readout and layer gradients and the S-TLLR updates of
    the synapses from their traces and per-step learning signals, as {id(variable): total}."""
    dtype = plan.dtype
    ops = plan.ops
    synapses = [i for i, op in enumerate(ops) if op.kind == "synapse"]
    neurons = [i for i, op in enumerate(ops) if op.kind == "neuron"]
    readout_vars = [v for op in ops if op.kind == "readout" for v in op.fn.trainable_variables]
    layer_vars = [v for op in ops if op.kind == "layer" for v in op.fn.trainable_variables]
    totals = {}
    voltages = online_rules.feedforward_initial_voltages(plan, x[:, 0])
    traces = {"pre": {i: None for i in synapses}, "post": {i: None for i in synapses},
              "one": 0.0}
    for t in range(steps):
        err_t = error / steps if plan.time_average else error[:, t]
        err_t = tf.stop_gradient(tf.cast(err_t, dtype))
        active = t >= first_update
        records = {}
        with tf.GradientTape(persistent=True) as tape:
            y_t, new_voltages = online_rules.feedforward_step(plan, x[:, t], voltages,
                                                              training, True, records)
            objective = tf.reduce_sum(tf.cast(y_t, dtype) * err_t)
        for var, g in zip(readout_vars, tape.gradient(objective, readout_vars)):
            _accumulate(totals, var, g)
        if active and layer_vars:
            for var, g in zip(layer_vars, tape.gradient(objective, layer_vars)):
                _accumulate(totals, var, g)
        signals = _feedforward_signals(rule, ops, synapses, neurons, records, tape, objective,
                                       err_t, feedback, active)
        traces["one"] = rule.factors[1] * traces["one"] + 1.0
        for i in synapses:
            _feedforward_synapse_update(rule, ops, neurons, i, records[i], tape, traces,
                                        signals, active, totals)
        del tape
        voltages = [tf.stop_gradient(v) for v in new_voltages]
    return totals


def _feedforward_signals(rule, ops, synapses, neurons, records, tape, objective, err_t,
                         feedback, active):
    """The learning signal of each synapse's spikes at one step (DFA: B @ error; bp:
    dE/dspikes while the step updates the weights), or None."""
    signals = None
    if rule.feedback == "dfa":
        signals = {ops[i].synapse: tf.reshape(
            tf.matmul(err_t, feedback[k]), tf.shape(records[ops[i].synapse]["spikes"]))
            for k, i in enumerate(neurons)}
    elif active:
        spikes = [records[i]["spikes"] for i in synapses]
        grads = tape.gradient(objective, spikes)
        signals = {i: tf.zeros_like(s) if g is None else g
                   for i, s, g in zip(synapses, spikes, grads)}
    return signals


def _feedforward_synapse_update(rule, ops, neurons, i, rec, tape, traces, signals, active,
                                totals):
    """One step of synapse ``i``: its traces, and (when ``active``) its S-TLLR update."""
    lambda_post, lambda_pre, alpha_post, alpha_pre = rule.factors
    op = ops[i]
    trace_pre, trace_post = traces["pre"], traces["post"]
    neuron = next(ops[j] for j in neurons if ops[j].synapse == i)
    params = neuron.layer.parameters
    psi = tf.stop_gradient(rule._node_psi(rec["h"] - params.thr, op.fn, params))
    pre = tf.stop_gradient(rec["pre"])
    trace_pre[i] = pre if trace_pre[i] is None else lambda_pre * trace_pre[i] + pre
    if active:
        signal = tf.stop_gradient(signals[i])
        g_pre = alpha_pre * psi * signal
        delta_pre = tape.gradient(rec["current"], rec["out"], output_gradients=g_pre)
        with tf.GradientTape() as kernel_tape:
            traced = op.fn(trace_pre[i])
        _accumulate(totals, op.fn.kernel, kernel_tape.gradient(
            traced, op.fn.kernel, output_gradients=delta_pre))
        axes = list(range(delta_pre.shape.rank - 1))
        bias = traces["one"] * tf.reduce_sum(delta_pre, axes)
        if trace_post[i] is not None and alpha_post != 0.0:
            g_post = alpha_post * trace_post[i] * signal
            delta_post = tape.gradient(rec["current"], rec["out"], output_gradients=g_post)
            _accumulate(totals, op.fn.kernel, tape.gradient(rec["out"], op.fn.kernel,
                                                            output_gradients=delta_post))
            bias = bias + tf.reduce_sum(delta_post, axes)
        if op.fn.use_bias:
            _accumulate(totals, op.fn.bias, bias)
    trace_post[i] = psi if trace_post[i] is None else lambda_post * trace_post[i] + psi


def _add_weight_losses(model, totals, total, dtype):
    """Add the gradients of the model's weight losses (model.losses) to ``totals``; returns
    ``total`` plus their value."""
    weight_losses = model.losses
    if weight_losses:
        with tf.GradientTape() as tape:
            weight_loss = online_rules.model_weight_losses(model)
        variables = model.trainable_variables
        for var, g in zip(variables, tape.gradient(weight_loss, variables)):
            _accumulate(totals, var, g)
        total = total + tf.cast(weight_loss, dtype)
    return total


def _dfa_signals(error, feedback, reg_signals):
    """DFA learning signals L_l = dE/dy_t B_l (+ the regulariser's signal), per layer (B, n_l)."""
    signals = [tf.matmul(error, feedback[i]) for i in range(len(reg_signals))]
    return [s if r is None else s + r for s, r in zip(signals, reg_signals)]


def _bp_signals(error, w_out, kappa, steps_out, weights, reg_signals):
    """The instantaneous loss's gradient backpropagated through the layers of this step, top
    layer first: (1 - kappa) dE/dy_t W_out^T, then through (1 - alpha) dz/dv and W_in^T."""
    signals = [None] * len(weights)
    signal = (1.0 - kappa) * tf.matmul(error, w_out, transpose_b=True)
    for i in reversed(range(len(weights))):
        if reg_signals[i] is not None:
            signal = signal + reg_signals[i]
        signals[i] = signal
        if i:
            _, state_i, A_i, allowed_i = steps_out[i]
            params = weights[i].params
            dz_dv = dynamics.spike_pseudo_derivative(state_i.v, A_i, params, allowed_i) / A_i
            signal = tf.matmul((1.0 - params.alpha) * dz_dv * signal, weights[i].input_kernel,
                               transpose_b=True)
    return signals
