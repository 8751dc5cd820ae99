"""e-prop (Bellec et al. 2020): eligibility traces forward in time times learning signals.

docs/eprop.md. The eligibility traces are derived from kspike's own step
(``kspike.dynamics``: ``spike_derivatives``, ``eprop_state_jacobian``,
``eprop_eligibility_step``, ``eligibility_trace``), so the (1 - alpha), (1 - rho) factors and the
reset by A_t z_{t-1} of kspike's convention are part of them.
"""
from typing import NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from kspike import dynamics, engine
from kspike.learning import online as online_rules
from kspike.learning.base import LearningRule, RuleResult
from kspike.regularizers import SpikeRate, firing_rate_logs

__all__ = ["EProp"]

_FEEDBACKS = ("symmetric", "random", "adaptive")


class _FunctionCache:
    def __init__(self):
        self.functions = {}
        self.losses = {}


class FeedbackRule(LearningRule, tf.Module):
    """Holds the feedback matrices B of a rule as variables (tracked: ``tf.train.Checkpoint(
    rule=rule)`` saves them) and compiles ``compute`` when called eagerly."""

    def __init__(self, seed):
        tf.Module.__init__(self)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"`seed` must be an integer or None, received {seed!r}.")
        self.seed = None if seed is None else int(seed)
        self.feedback_weights = []
        # A plain holder: tf.Module would try to checkpoint a dict of functions.
        self._compiled = _FunctionCache()

    def _feedback_seed(self):
        if self.seed is None:
            # Drawn from NumPy's global generator, so keras.utils.set_random_seed fixes it.
            self.seed = int(np.random.randint(0, 2**31 - 1))
        return self.seed

    def _build_feedback(self, shapes, dtype, trainable):
        """Creates (once) the random feedback variables; checks their shapes afterwards."""
        if self.feedback_weights:
            have = [tuple(w.shape) for w in self.feedback_weights]
            if have != [tuple(s) for s in shapes]:
                raise ValueError(f"This {type(self).__name__} rule holds feedback matrices of "
                                 f"shapes {have} built for another model; this model needs "
                                 f"{[tuple(s) for s in shapes]}. Use one rule per model.")
            return self.feedback_weights
        values = online_rules.random_feedback(self._feedback_seed(), shapes, dtype)
        with tf.init_scope():
            for i, value in enumerate(values):
                self.feedback_weights.append(tf.Variable(value, trainable=trainable,
                                                         name=f"feedback_{i}"))
        return self.feedback_weights

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        plan = self.check_model(model)
        self._check_inputs(plan, x)
        regularizers = online_rules.check_regularizers(regularizers, type(self).__name__)
        if isinstance(loss, str):
            # One object per name, so a compiled function is reused across calls.
            name = loss
            loss = self._compiled.losses.get(name) or online_rules.resolve_loss(name)
            self._compiled.losses[name] = loss
        if not tf.executing_eagerly():
            return self._compute(plan, model, x, y, loss, sample_weight, regularizers, training)
        key = (id(model), id(loss), tuple(id(r) for r in regularizers), bool(training),
               sample_weight is None)
        fn = self._compiled.functions.get(key)
        if fn is None:
            def fn(x, y, sample_weight):
                return self._compute(plan, model, x, y, loss, sample_weight, regularizers,
                                     training)
            fn = tf.function(fn, reduce_retracing=True, autograph=False)
            self._compiled.functions[key] = fn
        return fn(x, y, sample_weight)

    def check_model(self, model):
        """Raise ValueError unless ``model`` is a supported chain; returns its plan."""
        return online_rules.check_chain(model, type(self).__name__)

    @staticmethod
    def _check_inputs(plan, x):
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(f"`x` must have shape (batch, time, {plan.layers[0].n_in}), "
                             f"received {None if shape is None else tuple(shape)}.")
        if shape[-1] is not None and shape[-1] != plan.layers[0].n_in:
            raise ValueError(f"`x` must have {plan.layers[0].n_in} input features, received "
                             f"shape {tuple(shape)}.")


@keras.saving.register_keras_serializable(package="kspike")
class EProp(FeedbackRule):
    """e-prop: online eligibility propagation for LIF/ALIF networks with a leaky readout.

    The gradient of every input, recurrent and bias weight of the spiking layers is
    ``sum_{batch, t} L_j(t) ebar_ji(t)`` (docs/eprop.md), with eligibility traces
    ``e_ji(t)`` from kspike's own step and learning signals ``L_j(t) = sum_k B_jk dE/dy_k(t)``
    from the readout error. The readout (and its bias) learns from its exact local gradient.

    With ``feedback="symmetric"`` the result equals the autodiff gradient of the same network in
    which z_{t-1} is wrapped in ``stop_gradient`` where it enters the recurrent input and the
    reset term (not where it enters b_t): tested to float64 round-off in tests/test_eprop.py.

    Supported models: ``Input -> keras.layers.RNN / kspike.SpikingRNN (kspike cell,
    return_sequences=True) [-> more such layers] -> kspike.LeakyReadout``. Anything else raises
    ValueError (never a silent BPTT fallback). With stacked spiking layers each layer receives
    its learning signal from the readout error directly, as in the paper: the last layer through
    B (W_out^T with symmetric feedback), lower layers through their own random matrices
    (``"symmetric"``, ``"random"``) or trained ones (``"adaptive"``).

    How it runs, two ways with the same gradient:

    - Single pass (truly online, as in the paper): the spiking layers and the leaky readout
      (``LeakyReadout.step``) run forward; the output error dE/dy_t comes from the target at t
      (autodiff of the user's loss on the slice, rescaled from the slice's reduction to the
      sequence's), then the learning signals L_t = dE/dy_t B and the readout-filtered traces
      ebar_t, and the gradients accumulate. With ``native="auto"`` (default) this runs in
      chunks of 64 steps, the per-synapse traces advanced by a native C++ op (docs/eprop.md,
      "The native single pass"; a few times BPTT's time instead of ~85x); with
      ``native=False`` as one ``tf.while_loop``, step by step. It needs a loss that is a sum
      of per-step terms: ``keras.losses.MeanSquaredError``, ``CategoricalCrossentropy``,
      ``SparseCategoricalCrossentropy`` (without ``ignore_class``) or ``BinaryCrossentropy``
      (objects with any ``from_logits``/``label_smoothing`` and a scalar reduction, or their
      names such as ``"mse"``), targets with the outputs' time axis ((B, T, n_out); class
      indices (B, T) for the sparse cross-entropy) and, optionally, a ``sample_weight`` of
      shape (B, T) (e.g. a mask of the recall steps or of a cue window). The firing-rate
      regulariser needs the mean rate of the whole sequence: the loop sums the eligibility
      traces ``sum_{b,t} e_ji`` and contracts them with the regulariser's per-neuron derivative
      after the last step, which is exact.
    - Two passes (any loss of the output sequence: window-averaged cross-entropy, custom
      losses), in one of two forms with the same gradient (tested to float64 round-off):

      * stored states (``memory_flat=False``): one forward pass (the native C++
        forward in float32 where it applies, else a ``tf.while_loop``) keeps every layer's
        spikes, voltages and thresholds (B, T, n); the user's loss gives dE/dy, hence all
        learning signals; since they are known before the traces are needed the sum
        ``sum_t L_j(t) e_ji(t)`` factorises into a per-neuron backward recursion (one loop on
        (B, n), compiled by XLA) and one matmul over batch and time per weight. Memory
        O(T B n) per layer, like BPTT's; about as fast as BPTT.
      * traces (``memory_flat=True``, the default): a first pass keeps only the readout output y and spike
        counts; a second pass recomputes the network step by step with per-synapse
        eligibility traces (B, n_pre, n) and accumulates the gradient. Memory does not grow
        with T apart from the inputs, targets and outputs, but every step updates the traces
        of all synapses: tens of times slower than BPTT on large layers.

    Memory of the single pass: O(B n_pre n) for the traces (one (B, n_pre, n) trace more than
    the trace form of two passes) plus the inputs, targets and the outputs y (B, T, n_out)
    returned as predictions; nothing scales with T otherwise.

    Args:
        feedback: "symmetric" (B = W_out^T), "random" (fixed random B, seeded) or "adaptive"
            (B starts random and receives the readout's own gradient, transposed, plus
            ``weight_decay * B``, applied by ``feedback_optimizer``).
        seed: integer seed of the random feedback matrices (None: drawn from NumPy's global
            generator, fixed by ``keras.utils.set_random_seed``).
        online: the filter placement of the two-pass trace form (``memory_flat=True``). False
            (default) applies the readout filter kappa to the learning signal
            (``sum_t L_t ebar_t = sum_t Ltilde_t e_t``, identical gradient, one trace fewer);
            True filters the eligibility traces (ebar) as in the paper, each step using only
            L(t). The single pass always filters the traces; the stored-state form always
            filters the signal (the same gradient either way).
        single_pass: False (default): always two passes. True: always the single pass; a
            loss, target or sample weight it cannot take raises ValueError saying why. "auto":
            the single pass when the loss qualifies, otherwise two passes.
        memory_flat: the form of two passes. True (default): with per-synapse eligibility
            traces, memory independent of T (the rule's forward-in-time contract), much
            slower on large layers. False: from stored state sequences, about BPTT's time,
            with memory growing with T like BPTT's (choose it when the sequences fit).
        weight_decay: decay of the adaptive feedback matrices (the paper's option), >= 0.
        feedback_optimizer: Keras optimizer for adaptive feedback (default Adam(1e-3)).
        native: the single pass's implementation. "auto" (default): the native trace op where
            it can run (the native ops load; CPU; float32 or float64; not inside XLA; no layer
            built with ``native=False``), else the TensorFlow loop. True: the native op, or
            ValueError saying why not. False: the TensorFlow loop. The same gradient (tested
            to float64 round-off); the two-pass forms are unaffected.

    The feedback matrices are variables of the rule (``rule.feedback_weights``, saved by
    ``tf.train.Checkpoint(rule=rule)``; random ones are also reproducible from ``seed``).

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> rng = np.random.default_rng(0)
    >>> x = (rng.random((4, 20, 5)) < 0.3).astype("float32")     # (B, T, n_in) spikes
    >>> y = rng.normal(size=(4, 20, 2)).astype("float32")         # (B, T, n_out) targets
    >>> rule = kspike.learning.EProp(feedback="random", seed=1)
    >>> grads = rule.gradients(model, x, y, keras.losses.MeanSquaredError())
    >>> [tuple(g.shape) for g in grads]          # aligned with model.trainable_variables
    [(5, 8), (8, 8), (8, 2), (2,)]
    >>> keras.optimizers.Adam(1e-3).apply(grads, model.trainable_variables)
    >>> mask = np.zeros((4, 20), "float32"); mask[:, -5:] = 1.0  # loss on the last 5 steps
    >>> online = kspike.learning.EProp(single_pass=True)
    >>> online.uses_single_pass(model, x, y, "mse", sample_weight=mask)
    True
    >>> grads = online.gradients(model, x, y, "mse", sample_weight=mask)
    """

    name = "eprop"

    def __init__(self, feedback="symmetric", seed=None, online=False, weight_decay=0.0,
                 feedback_optimizer=None, single_pass=False, memory_flat=True, native="auto"):
        super().__init__(seed)
        if feedback not in _FEEDBACKS:
            raise ValueError(f"`feedback` must be one of {_FEEDBACKS}, received {feedback!r}.")
        self.feedback = feedback
        if not isinstance(online, (bool, np.bool_)):
            raise TypeError(f"`online` must be True or False, received {online!r}.")
        self.online = bool(online)
        if isinstance(single_pass, (bool, np.bool_)):
            single_pass = bool(single_pass)
        elif single_pass != "auto":
            raise ValueError(f"`single_pass` must be True, False or 'auto', received "
                             f"{single_pass!r}.")
        self.single_pass = single_pass
        if not isinstance(memory_flat, (bool, np.bool_)):
            raise TypeError(f"`memory_flat` must be True or False, received {memory_flat!r}.")
        self.memory_flat = bool(memory_flat)
        if isinstance(native, (bool, np.bool_)):
            native = bool(native)
        elif native != "auto":
            raise ValueError(f"`native` must be True, False or 'auto', received {native!r}.")
        self.native = native
        if (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
                or not np.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"`weight_decay` must be a finite number >= 0, received "
                             f"{weight_decay!r}.")
        self.weight_decay = float(weight_decay)
        if feedback_optimizer is not None and not isinstance(feedback_optimizer,
                                                             keras.optimizers.Optimizer):
            feedback_optimizer = keras.optimizers.get(feedback_optimizer)
        self.feedback_optimizer = feedback_optimizer

    def get_config(self):
        config = {"feedback": self.feedback, "seed": self.seed, "online": self.online,
                  "weight_decay": self.weight_decay, "single_pass": self.single_pass,
                  "memory_flat": self.memory_flat, "native": self.native}
        if self.feedback_optimizer is not None:
            config["feedback_optimizer"] = keras.optimizers.serialize(self.feedback_optimizer)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def uses_single_pass(self, model, x, y, loss, sample_weight=None):
        """Whether ``compute`` with these arguments runs the single pass (True) or two passes.

        Raises ValueError (with the reason) when ``single_pass=True`` and the loss, targets or
        sample weight do not form a per-step loss."""
        plan = self.check_model(model)
        self._check_inputs(plan, x)
        return self._single_pass(online_rules.resolve_loss(loss), x, y, sample_weight)

    def _single_pass(self, loss, x, y, sample_weight):
        if self.single_pass is False:
            return False
        reason = online_rules.per_step_reason(loss, y, sample_weight, x.shape[1])
        if reason is None:
            return True
        if self.single_pass is True:
            raise ValueError(f"EProp(single_pass=True) needs a loss that is a sum over time "
                             f"steps of terms depending only on y_t and the target at t; here "
                             f"{reason}. Use single_pass=False or 'auto' (two passes, any "
                             f"loss of the output sequence).")
        return False

    # ------------------------------------------------------------------ feedback matrices
    def _feedback_matrices(self, plan, readout_kernel):
        """Per layer (n_out, n_l) matrices mapping dE/dy onto learning signals."""
        n_out = plan.readout.units
        shapes = [(n_out, layer.units) for layer in plan.layers]
        if self.feedback == "symmetric":
            shapes = shapes[:-1]
        variables = self._build_feedback(shapes, plan.dtype,
                                         trainable=self.feedback == "adaptive") if shapes else []
        if self.feedback == "adaptive" and self.feedback_optimizer is None:
            self.feedback_optimizer = keras.optimizers.Adam(1e-3)
        if self.feedback == "adaptive" and not self.feedback_optimizer.built:
            with tf.init_scope():
                self.feedback_optimizer.build(variables)
        matrices = [tf.cast(v, plan.dtype) for v in variables]
        if self.feedback == "symmetric":
            matrices.append(tf.transpose(readout_kernel))
        return matrices

    # ------------------------------------------------------------------ the rule
    @tf.autograph.experimental.do_not_convert
    def _compute(self, plan, model, x, y, loss, sample_weight, regularizers, training):
        dtype = plan.dtype
        single = self._single_pass(loss, x, y, sample_weight)
        tape, weights, readout, weight_loss = online_rules.watched_weights(plan, model)
        feedback = self._feedback_matrices(plan, readout[0])
        x = tf.cast(x, dtype)
        ops = self._native_traces(plan) if single else None
        # The per-step copy of the inputs the TensorFlow loops read (the native single pass
        # slices x per chunk instead).
        sequence = online_rules.time_major(x, dtype) if ops is None else None
        batch, steps = tf.shape(x)[0], tf.shape(x)[1]
        net = _Network(plan, weights, feedback, x, sequence, self.feedback == "adaptive")
        if ops is not None:
            result = _native_single_pass_terms(ops, net, readout, loss, y, sample_weight,
                                               regularizers, batch, steps)
        elif single:
            result = _single_pass_terms(net, loss, y, sample_weight, regularizers, batch, steps)
        elif not self.memory_flat:
            result = _stored_state_terms(net, readout, loss, y, sample_weight, regularizers,
                                         batch, steps)
        else:
            result = _two_pass_terms(net, readout, loss, y, sample_weight, regularizers,
                                     self.online, batch, steps)
        grads = [online_rules.split_stacked(g, layer, w)
                 for g, layer, w in zip(result.grads, plan.layers, weights)]
        gradients, total = online_rules.model_gradients(
            tape, model, weights, grads, readout, result.readout_grad, result.error,
            result.task_loss + result.reg_loss, weight_loss, dtype,
            readout_bias_grad=result.bias_grad)
        del tape
        if self.feedback == "adaptive" and training:
            self._update_feedback(result.feedback_grads, dtype)
        rates = firing_rate_logs(
            [SpikeRate(layer.layer.name, tf.reduce_mean(c) / tf.cast(batch * steps, dtype),
                       layer.cell.dt, layer.units)
             for layer, c in zip(plan.layers, result.counts)])
        return RuleResult(loss=total, gradients=gradients, predictions=result.predictions,
                          logs=rates)

    def _native_traces(self, plan):
        """The native op module for the single pass (``native``), or None: the TensorFlow
        loop."""
        if self.native is False:
            return None
        reason = _native_trace_reason(plan, plan.dtype)
        if reason is None:
            from kspike import native as native_module
            return native_module.load()
        if self.native is True:
            raise ValueError(f"EProp(native=True) cannot run the single pass natively: {reason}. "
                             "Use native='auto' (the TensorFlow loop then) or False.")
        return None

    def _update_feedback(self, feedback_grads, dtype):
        """Adaptive feedback: B receives the readout's gradient (transposed) plus
        ``weight_decay * B``, applied by ``feedback_optimizer``."""
        updates = [g + self.weight_decay * tf.cast(v, dtype)
                   for g, v in zip(feedback_grads, self.feedback_weights)]
        self.feedback_optimizer.apply(
            [tf.cast(u, v.dtype) for u, v in zip(updates, self.feedback_weights)],
            self.feedback_weights)


# ---------------------------------------------------------------------- the two computations
class _Network(NamedTuple):
    """What both computations run on: the checked chain, its effective weights, the feedback
    matrices (one (n_out, n_l) per layer), the inputs (B, T, n_in) and their time-major copy."""
    plan: object
    weights: list
    feedback: list
    x: tf.Tensor
    sequence: Optional[tuple]   # (TensorArray of the (B, n_in) steps, T); None if unused
    adaptive_feedback: bool   # every layer's B learns (else only the readout's term is formed)


class _Terms(NamedTuple):
    """The gradient terms one computation returns to ``EProp._compute``."""
    grads: list               # per layer (P, n), the stacked kernel [W_in; W_rec; bias]
    readout_grad: tf.Tensor   # (n, n_out)
    feedback_grads: list      # per layer (n_out, n) with adaptive feedback, else []
    task_loss: tf.Tensor
    reg_loss: tf.Tensor
    error: Optional[tf.Tensor]      # two passes: dE/dy (B, T, n_out)
    bias_grad: Optional[tf.Tensor]  # single pass: the readout bias gradient (n_out,)
    predictions: tf.Tensor    # (B, T, n_out)
    counts: list              # per layer (n,), spikes summed over batch and time


def _single_pass_terms(net, loss, y, sample_weight, regularizers, batch, steps):
    """One loop: network, readout, per-step output error, traces and gradients."""
    dtype = net.plan.dtype
    stream = online_rules.PerStepLoss(loss, y, sample_weight, steps, dtype)
    out = _trace_loop(net, online=True, errors=_ReadoutErrors(net.plan.readout, stream),
                      sum_traces=bool(regularizers))
    counts = out["counts"]
    reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, net.plan, counts,
                                                             batch, steps, dtype)
    grads = out["grads"]
    if regularizers:
        # dR/dz_j(t) is the same for every sample and step, known once the sequence has
        # ended: its term is that factor times the traces summed over batch and time.
        grads = [g if r is None else g + r[None, :] * e
                 for g, r, e in zip(grads, reg_signals, out["trace_sums"])]
    return _Terms(grads, out["readout_grad"], out["feedback_grads"], out["loss"], reg_loss,
                  None, out["bias_grad"], out["predictions"], counts)


def _two_pass_terms(net, readout, loss, y, sample_weight, regularizers, online, batch, steps):
    """An inference pass gives y and the output errors of the user's loss; a second pass runs
    the traces with those errors (readout-filtered unless ``online``) as learning signals."""
    plan, dtype = net.plan, net.plan.dtype
    predictions, counts = online_rules.inference_pass(plan, net.weights, readout, net.x,
                                                      net.sequence)
    task_loss, error = online_rules.output_errors(loss, y, predictions, sample_weight)
    reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts,
                                                             batch, steps, dtype)
    signal = error if online else online_rules.backward_filter(error, plan.readout.kappa)
    signals = tf.TensorArray(dtype, size=steps).unstack(tf.transpose(signal, (1, 0, 2)))
    out = _trace_loop(net, online=online, errors=_SignalErrors(signals),
                      reg_signals=reg_signals)
    return _Terms(out["grads"], out["readout_grad"], out["feedback_grads"], task_loss, reg_loss,
                  error, None, predictions, counts)


# ---------------------------------------------------------------------- where errors come from
class _SignalErrors:
    """Two passes: the output error of step t is read from a TensorArray of (B, n_out)."""

    def __init__(self, signals):
        self.signals = signals

    def initial(self, plan, batch, steps):
        return {}

    def step(self, t, z_last, new_states, carry):
        return self.signals.read(t), carry

    def outputs(self, carry):
        return {}


class _ReadoutErrors:
    """Single pass: the readout runs in the loop (``LeakyReadout.step``) on the last layer's
    spikes and ``stream`` (a ``kspike.learning.online.PerStepLoss``) gives the step's loss term
    and error; the carry accumulates the loss, the bias gradient, the outputs and spike counts."""

    def __init__(self, readout, stream):
        self.readout, self.stream = readout, stream

    def initial(self, plan, batch, steps):
        dtype, n_out = plan.dtype, self.readout.units
        return {"counts": [tf.zeros((layer.units,), dtype) for layer in plan.layers],
                "filtered": tf.zeros((batch, n_out), dtype),
                "loss": tf.zeros((), dtype),
                "bias_grad": tf.zeros((n_out,), dtype),
                "ys": tf.TensorArray(dtype, size=steps)}

    def step(self, t, z_last, new_states, carry):
        carry = dict(carry)
        carry["counts"] = [c + tf.reduce_sum(s.z, axis=0)
                           for c, s in zip(carry["counts"], new_states)]
        y_t, carry["filtered"] = self.readout.step(z_last, carry["filtered"])
        value, error = self.stream.step(t, y_t)
        carry["loss"] = carry["loss"] + value
        carry["bias_grad"] = carry["bias_grad"] + tf.reduce_sum(error, axis=0)
        carry["ys"] = carry["ys"].write(t, y_t)
        return error, carry

    def outputs(self, carry):
        return dict(loss=carry["loss"], bias_grad=carry["bias_grad"], counts=carry["counts"],
                    predictions=tf.transpose(carry["ys"].stack(), (1, 0, 2)))


# ---------------------------------------------------------------------- the trace loop
def _trace_loop(net, online, errors, reg_signals=None, sum_traces=False):
    """The network step by step with eligibility traces, accumulating gradients.

    Each step first advances every layer and its traces (nothing there depends on the learning
    signal, ``_layer_traces``), then takes the output error of the step from ``errors``
    (``_SignalErrors`` or ``_ReadoutErrors``), then forms every layer's learning signal
    L = error B and gradient terms (``_layer_gradient_terms``, ``_readout_term``). ``online``:
    the traces are readout-filtered (ebar); otherwise the error is already filtered.

    Returns a dict: "grads" per layer (P, n) of the stacked kernel, "readout_grad" (n, n_out),
    "feedback_grads" (adaptive feedback), with ``sum_traces`` "trace_sums" per layer (P, n), the
    sum over batch and time of e_ji, and what ``errors.outputs`` adds (single pass: "loss",
    "bias_grad" (n_out,), "predictions" (B, T, n_out), "counts" per layer (n,)).
    """
    plan, weights, feedback = net.plan, net.weights, net.feedback
    kappa = plan.readout.kappa
    xs, steps = net.sequence
    batch = tf.shape(net.x)[0]
    last = len(plan.layers) - 1
    if reg_signals is None:
        reg_signals = [None] * len(plan.layers)
    states = online_rules.initial_states(plan, batch)
    layer_vars = [_zero_traces(layer, w, batch, plan.dtype, plan.readout.units, online,
                               sum_traces) for layer, w in zip(plan.layers, weights)]
    carry = errors.initial(plan, batch, steps)
    adaptive_params = [_adaptive_parameters(layer, w, plan.dtype)
                       for layer, w in zip(plan.layers, weights)]

    def body(t, flat, layer_vars, carry):
        states = online_rules.nested_state(plan, flat)
        inputs = xs.read(t)
        new_states, new_vars, local = [], [], []
        for layer, w, p, state, lv in zip(plan.layers, weights, adaptive_params, states,
                                          layer_vars):
            new_state, lv, item = _layer_traces(layer, w, p, state, lv, inputs)
            new_states.append(new_state)
            new_vars.append(lv)
            local.append(item)
            inputs = new_state.z
        error, carry = errors.step(t, inputs, new_states, carry)
        for i, (layer, lv, item, new_state) in enumerate(zip(plan.layers, new_vars, local,
                                                             new_states)):
            learning = tf.matmul(error, feedback[i])            # (B, n)
            _layer_gradient_terms(layer, lv, item, learning, reg_signals[i], kappa, online,
                                  sum_traces)
            _readout_term(lv, error, new_state.z, kappa, online,
                          i == last or net.adaptive_feedback)
        return t + 1, online_rules.flat_state(plan, new_states), new_vars, carry

    _, _, layer_vars, carry = tf.while_loop(
        lambda t, *_: t < steps, body,
        (0, online_rules.flat_state(plan, states), layer_vars, carry))
    out = {"grads": [lv["grad"] for lv in layer_vars],
           "readout_grad": tf.transpose(layer_vars[-1]["feedback_grad"]),
           "feedback_grads": ([lv["feedback_grad"] for lv in layer_vars]
                              if net.adaptive_feedback else [])}
    if sum_traces:
        out["trace_sums"] = [lv["trace_sum"] for lv in layer_vars]
    out.update(errors.outputs(carry))
    return out


def _zero_traces(layer, weights, batch, dtype, n_out, online, sum_traces):
    """A layer's loop variables: its traces and gradient accumulators, all zero.

    Plain neurons (the first ``n_plain``) carry eps (B, P), adaptive ones eps_v, eps_b
    (B, P, k) and the previous step's spike derivatives (B, k); ``online`` adds the filtered
    traces ebar. "zhat" (B, n) is the readout-filtered spike train."""
    size = online_rules.presynaptic_size(layer, weights)
    k = layer.units - layer.n_plain
    lv = {"grad": tf.zeros((size, layer.units), dtype)}
    if sum_traces:
        lv["trace_sum"] = tf.zeros((size, layer.units), dtype)
    if layer.n_plain:
        lv["eps_plain"] = tf.zeros((batch, size), dtype)
        if online:
            lv["ebar_plain"] = tf.zeros((batch, size, layer.n_plain), dtype)
    if k:
        lv["eps_v"] = tf.zeros((batch, size, k), dtype)
        lv["eps_b"] = tf.zeros((batch, size, k), dtype)
        lv["dz_dv"] = tf.zeros((batch, k), dtype)
        lv["dz_db"] = tf.zeros((batch, k), dtype)
        if online:
            lv["ebar_a"] = tf.zeros((batch, size, k), dtype)
    lv["zhat"] = tf.zeros((batch, layer.units), dtype)
    lv["feedback_grad"] = tf.zeros((n_out, layer.units), dtype)
    return lv


def _adaptive_parameters(layer, weights, dtype):
    """The layer's parameters with beta restricted to its adaptive neurons."""
    params = weights.params
    if layer.units > layer.n_plain:
        beta = tf.constant(layer.cell.beta_vector[layer.n_plain:], dtype)
        params = params._replace(beta=beta)
    return params


def _layer_traces(layer, weights, adaptive_params, state, lv, inputs):
    """One step of a layer and its eligibility traces.

    Returns (new state, a copy of ``lv`` with the new traces, the step's traces: "eps" and
    "dz_dv" of the plain neurons (B, P), (B, n_plain); "e" of the adaptive ones (B, P, k))."""
    lv = dict(lv)
    p = online_rules.presynaptic(inputs, state.z, weights)
    new_state, A, allowed = online_rules.layer_step(inputs, state, weights)
    derivatives = dynamics.spike_derivatives(new_state, A, weights.params, allowed)
    n0 = layer.n_plain
    item = {}
    if n0:
        # Plain LIF: eps_t = alpha eps_{t-1} + (1 - alpha) p_t, the same for every neuron.
        eps, _ = dynamics.eprop_eligibility_step(
            lv["eps_plain"], None, p, dynamics.StateJacobian(weights.params.alpha, None,
                                                             None, None), weights.params)
        lv["eps_plain"] = eps
        item["eps"], item["dz_dv"] = eps, derivatives.dz_dv[:, :n0]
    if layer.units > n0:
        previous = dynamics.SpikeDerivatives(lv["dz_dv"], lv["dz_db"])
        jac = dynamics.eprop_state_jacobian(state.z[:, n0:], previous, adaptive_params)
        jac = dynamics.StateJacobian(*[j[:, None, :] for j in jac])
        eps_v, eps_b = dynamics.eprop_eligibility_step(
            lv["eps_v"], lv["eps_b"], p[:, :, None], jac, weights.params)
        lv["eps_v"], lv["eps_b"] = eps_v, eps_b
        current = dynamics.SpikeDerivatives(derivatives.dz_dv[:, n0:],
                                            derivatives.dz_db[:, n0:])
        lv["dz_dv"], lv["dz_db"] = current
        item["e"] = dynamics.eligibility_trace(
            eps_v, eps_b, dynamics.SpikeDerivatives(current.dz_dv[:, None, :],
                                                    current.dz_db[:, None, :]))
    return new_state, lv, item


def _layer_gradient_terms(layer, lv, item, learning, reg, kappa, online, sum_traces):
    """Adds the step's gradient term (P, n) to ``lv["grad"]`` (and the traces summed over the
    batch to ``lv["trace_sum"]``); ``learning`` (B, n) is the learning signal, ``reg`` (n,)
    the firing-rate regulariser's signal or None."""
    n0 = layer.n_plain
    parts, sums = [], []
    if n0:
        parts.append(_plain_term(lv, item["eps"], item["dz_dv"], learning[:, :n0],
                                 None if reg is None else reg[:n0], kappa, online))
        if sum_traces:
            sums.append(tf.matmul(item["eps"], item["dz_dv"], transpose_a=True))
    if layer.units > n0:
        parts.append(_adaptive_term(lv, item["e"], learning[:, n0:],
                                    None if reg is None else reg[n0:], kappa, online))
        if sum_traces:
            sums.append(tf.reduce_sum(item["e"], axis=0))
    lv["grad"] = lv["grad"] + _joined(parts)
    if sum_traces:
        lv["trace_sum"] = lv["trace_sum"] + _joined(sums)


def _plain_term(lv, eps, dz_dv, learning, reg, kappa, online):
    """sum_b L_j ebar_ji for plain neurons (``online``: filtering e_ji = dz_j/dv_j eps_i into
    ``lv["ebar_plain"]``), plus the regulariser's sum_b reg_j e_ji."""
    if online:
        e = eps[:, :, None] * dz_dv[:, None, :]
        ebar = kappa * lv["ebar_plain"] + (1.0 - kappa) * e
        lv["ebar_plain"] = ebar
        g = tf.reduce_sum(ebar * learning[:, None, :], axis=0)
        if reg is not None:
            g = g + tf.matmul(eps, reg * dz_dv, transpose_a=True)
        return g
    # A plain LIF neuron's trace factorises: e_ji = dz_j/dv_j eps_i, so the batch sum is one
    # matmul.
    post = learning if reg is None else learning + reg
    return tf.matmul(eps, post * dz_dv, transpose_a=True)


def _adaptive_term(lv, e, learning, reg, kappa, online):
    """sum_b L_j ebar_ji for adaptive neurons (``online``: filtering e into ``lv["ebar_a"]``),
    plus the regulariser's sum_b reg_j e_ji."""
    if online:
        ebar = kappa * lv["ebar_a"] + (1.0 - kappa) * e
        lv["ebar_a"] = ebar
        g = tf.reduce_sum(ebar * learning[:, None, :], axis=0)
        if reg is not None:
            g = g + reg * tf.reduce_sum(e, axis=0)
        return g
    post = learning if reg is None else learning + reg
    return tf.reduce_sum(e * post[:, None, :], axis=0)


def _readout_term(lv, error, z, kappa, online, wanted):
    """Advances the filtered spikes zhat (``online``) and, if ``wanted``, adds this step's
    dE/dW_out^T = err_t^T zhat_t (two passes, the filter being on the error: err_t^T z_t) to
    ``lv["feedback_grad"]`` (n_out, n); the adaptive B learns from the same sum."""
    if online:
        zhat = kappa * lv["zhat"] + (1.0 - kappa) * z
        lv["zhat"] = zhat
        if wanted:
            lv["feedback_grad"] = lv["feedback_grad"] + tf.matmul(error, zhat, transpose_a=True)
    elif wanted:
        lv["feedback_grad"] = lv["feedback_grad"] + tf.matmul(error, z, transpose_a=True)


def _joined(parts):
    """The plain and adaptive neurons' (P, n0), (P, k) blocks side by side."""
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


# ---------------------------------------------------------------------- the stored-state form
# Two passes with every learning signal known before the second: the gradient
# sum_{b,t} L_j(t) e_ji(t) factorises over synapses. With u = (1, 0) and J_j(t) the 2x2
# state Jacobian dh_t/dh_{t-1} (``dynamics.eprop_state_jacobian``), eps_ji(t) =
# sum_{s <= t} J_j(t) .. J_j(s + 1) u (1 - alpha) p_i(s), so
#
#     sum_t L_j(t) e_ji(t) = (1 - alpha) sum_s p_i(s) q^v_j(s),
#     q_j(s) = L_j(s) d_j(s) + J_j(s + 1)^T q_j(s + 1),   q_j(T + 1) = 0,
#
# with d_j = (dz_j/dv_j, dz_j/db_j): a per-neuron backward recursion, then one matmul of the
# presynaptic factors p (B T, P) with q^v (B T, n). Exact (the same sums, reordered).


def _forward_states(layer, weights, inputs, batch, dtype, state0=None):
    """Runs one spiking layer over time-major ``inputs`` (T, B, n_in) from ``state0`` (a
    ``NeuronState``; default the initial state), through ``kspike.engine.forward_sequences``
    (the native forward op where it applies, else the TensorFlow loop).

    Returns a dict of time-major (T, B, n) sequences: "z" (spikes), "v", "A" (the adaptive
    threshold, None for a LIF cell), "allowed" (0/1, None without refractoriness), "z0"
    (B, n) and "final" (the ``NeuronState`` after the last step)."""
    cell = layer.cell
    initial = (cell.get_initial_state(batch) if state0 is None
               else cell.unpack_state(state0))
    seq = engine.forward_sequences(
        cell, tf.transpose(inputs, (1, 0, 2)), weights.input_kernel, weights.recurrent_kernel,
        weights.bias, initial, native=getattr(layer.layer, "native", "auto"))
    allowed = seq["allowed"]
    return {"z": seq["z"], "v": seq["v"], "A": seq["A"], "z0": seq["z0"],
            "allowed": None if allowed is None else tf.cast(allowed, dtype),
            "final": cell.pack_state(seq["final"])}


def _adjoint(layer, params, states, learning):
    """q^v (T, B, n) of the backward recursion above for one layer; ``learning`` (T, B, n) is
    L_j(t) (readout-filtered error through B, plus the regulariser's signal).

    Runs as one loop compiled by XLA (the per-step work, elementwise on (B, n), is too small
    for TensorFlow's per-op dispatch); each step forms the spike derivatives d(s) and the
    Jacobian J(s + 1) (from z_s and d(s), ``dynamics.eprop_state_jacobian``) itself."""
    adaptive = states["A"] is not None and layer.n_plain < layer.units
    refractory = states["allowed"] is not None
    beta = tf.constant(layer.cell.beta_vector, learning.dtype) if adaptive else None
    alpha, rho, thr = params.alpha, params.rho, params.thr
    pseudo_derivative = params.spike_function.pseudo_derivative

    def derivatives(v, A, allowed):
        psi = pseudo_derivative((v - A) / A)
        return psi * allowed if refractory else psi

    def lif_step(q_v, elems):
        L, v, allowed = elems
        return L * derivatives(v, thr, allowed) / thr + alpha * q_v

    def alif_step(q, elems):
        q_v, q_b = q
        L, v, A, z, allowed = elems
        psi = derivatives(v, A, allowed)
        dz_dv = psi / A
        dz_db = -psi * beta * v / (A * A)
        b_v = (1.0 - rho) * dz_dv
        b_b = rho + (1.0 - rho) * dz_db
        beta_z = beta * z
        return (L * dz_dv + (alpha - beta_z * b_v) * q_v + b_v * q_b,
                L * dz_db - beta_z * b_b * q_v + b_b * q_b)

    def run(learning, v, A, z, allowed):
        zero = tf.zeros_like(learning[0])
        if not adaptive:
            return tf.scan(lambda q, e: lif_step(q, e), (learning, v, allowed),
                           initializer=zero, reverse=True)
        q_v, _ = tf.scan(alif_step, (learning, v, A, z, allowed), initializer=(zero, zero),
                         reverse=True)
        return q_v

    v = states["v"]
    A = states["A"] if adaptive else v
    allowed = states["allowed"] if refractory else v
    return tf.function(run, jit_compile=True, autograph=False)(learning, v, A, states["z"],
                                                                allowed)


def _stored_state_terms(net, readout, loss, y, sample_weight, regularizers, batch, steps):
    """Two passes from stored state sequences: the forward keeps every layer's z, v, A (memory
    O(T B n)); the readout output, the user's loss and the readout-filtered learning signals
    follow, then per layer one backward recursion per neuron and one matmul per weight."""
    plan, dtype = net.plan, net.plan.dtype
    kernel, bias = readout
    kappa = plan.readout.kappa
    inputs = tf.transpose(net.x, (1, 0, 2))
    layer_inputs, records = [], []
    for layer, w in zip(plan.layers, net.weights):
        record = _forward_states(layer, w, inputs, batch, dtype)
        layer_inputs.append(inputs)
        records.append(record)
        inputs = record["z"]
    n_out = plan.readout.units
    outputs, _ = online_rules.readout_chunk(inputs, kernel, bias, kappa)
    predictions = tf.transpose(outputs, (1, 0, 2))
    counts = [tf.reduce_sum(r["z"], axis=(0, 1)) for r in records]
    task_loss, error = online_rules.output_errors(loss, y, predictions, sample_weight)
    reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts,
                                                             batch, steps, dtype)
    signal = tf.transpose(online_rules.backward_filter(error, kappa), (1, 0, 2))
    flat_signal = tf.reshape(signal, (-1, n_out))
    grads, feedback_grads = [], []
    for i, (layer, w, record, pre) in enumerate(zip(plan.layers, net.weights, records,
                                                    layer_inputs)):
        learning = tf.reshape(tf.matmul(flat_signal, net.feedback[i]),
                              (steps, batch, layer.units))
        if reg_signals[i] is not None:
            learning = learning + reg_signals[i]
        q = tf.reshape(_adjoint(layer, w.params, record, learning), (-1, layer.units))
        q = (1.0 - w.params.alpha) * q
        parts = [tf.matmul(tf.reshape(pre, (-1, layer.n_in)), q, transpose_a=True)]
        if w.recurrent_kernel is not None:
            previous = tf.concat([record["z0"][None], record["z"][:-1]], axis=0)
            parts.append(tf.matmul(tf.reshape(previous, (-1, layer.units)), q,
                                   transpose_a=True))
        if w.bias is not None:
            parts.append(tf.reduce_sum(q, axis=0, keepdims=True))
        grads.append(tf.concat(parts, axis=0) if len(parts) > 1 else parts[0])
        if net.adaptive_feedback:
            feedback_grads.append(tf.matmul(
                flat_signal, tf.reshape(record["z"], (-1, layer.units)), transpose_a=True))
    readout_grad = tf.matmul(tf.reshape(inputs, (-1, inputs.shape[-1])), flat_signal,
                             transpose_a=True)
    return _Terms(grads, readout_grad, feedback_grads, task_loss, reg_loss, error, None,
                  predictions, counts)


# ---------------------------------------------------------------------- the native single pass
# The single pass with the per-synapse recursions in C++ (``KspikeEpropTraces``,
# kspike/native/spiking_ops.cc). Time advances in chunks of ``_CHUNK_STEPS`` steps: the layers
# run forward for the chunk (the native forward op in float32, else ``dynamics`` in a loop) from
# the state where the previous chunk ended, the readout, the chunk's loss terms, output errors
# and learning signals follow, and every per-neuron factor of the trace recursions (spike
# derivatives, the state Jacobian) is formed for the whole chunk at once; the op then advances
# every synapse's traces through the chunk and returns the chunk's gradient. The gradient is
# still accumulated forward in time, from the targets up to the chunk's end, and memory holds one
# chunk: it does not grow with T apart from the inputs, targets and outputs.

_CHUNK_STEPS = 64


def _native_trace_reason(plan, dtype):
    """Why the native trace op cannot run the single pass of this chain, or None when it can."""
    from kspike import compat
    from kspike import native as native_module
    if tf.as_dtype(dtype) not in (tf.float32, tf.float64):
        return f"the state dtype is {tf.as_dtype(dtype).name} (the op runs float32 and float64)"
    for layer in plan.layers:
        if getattr(layer.layer, "native", "auto") is False:
            return f"layer {layer.layer.name!r} was built with native=False"
    if compat.in_xla_context():
        return ("the call is traced inside an XLA-compiled function (XLA cannot compile the "
                "native ops)")
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return (f"the process has {len(gpus)} GPU(s) and the native ops have CPU kernels only")
    return native_module.unavailable_reason()


def _native_single_pass_terms(ops, net, readout, loss, y, sample_weight, regularizers, batch,
                              steps):
    """The single pass in chunks, the traces advanced by the native op (see above)."""
    plan, dtype = net.plan, net.plan.dtype
    kernel, bias = readout
    kappa = plan.readout.kappa
    n_out = plan.readout.units
    last = len(plan.layers) - 1
    sum_traces = bool(regularizers)
    stream = online_rules.PerStepLoss(loss, y, sample_weight, steps, dtype, chunked=True)
    chunk = _CHUNK_STEPS
    n_chunks = (steps + chunk - 1) // chunk
    adaptive_params = [_adaptive_parameters(layer, w, dtype)
                       for layer, w in zip(plan.layers, net.weights)]
    constants = [tf.constant([w.params.alpha, kappa, 1.0 - kappa], dtype) for w in net.weights]

    def zero_vars(layer, w):
        size = online_rules.presynaptic_size(layer, w)
        n0, ka = layer.n_plain, layer.units - layer.n_plain
        lv = {"eps_plain": tf.zeros((batch, size), dtype),
              "ebar_plain": tf.zeros((batch, size, n0), dtype),
              "eps_v": tf.zeros((batch, size, ka), dtype),
              "eps_b": tf.zeros((batch, size, ka), dtype),
              "ebar_a": tf.zeros((batch, size, ka), dtype),
              "dz_dv": tf.zeros((batch, ka), dtype), "dz_db": tf.zeros((batch, ka), dtype),
              "grad": tf.zeros((size, layer.units), dtype),
              "zhat": tf.zeros((batch, layer.units), dtype),
              "feedback_grad": tf.zeros((n_out, layer.units), dtype)}
        if sum_traces:
            lv["trace_sum"] = tf.zeros((size, layer.units), dtype)
        return lv

    carry = {"counts": [tf.zeros((layer.units,), dtype) for layer in plan.layers],
             "filtered": tf.zeros((batch, n_out), dtype), "loss": tf.zeros((), dtype),
             "bias_grad": tf.zeros((n_out,), dtype),
             "ys": tf.TensorArray(dtype, size=n_chunks, infer_shape=False)}
    layer_vars = [zero_vars(layer, w) for layer, w in zip(plan.layers, net.weights)]

    def body(c, flat, layer_vars, carry):
        t0 = c * chunk
        t1 = tf.minimum(t0 + chunk, steps)
        states = online_rules.nested_state(plan, flat)
        inputs = tf.transpose(net.x[:, t0:t1], (1, 0, 2))
        records, layer_inputs = [], []
        for layer, w, state in zip(plan.layers, net.weights, states):
            record = _forward_states(layer, w, inputs, batch, dtype, state0=state)
            records.append(record)
            layer_inputs.append(inputs)
            inputs = record["z"]
        carry = dict(carry)
        carry["counts"] = [n + tf.reduce_sum(r["z"], axis=(0, 1))
                           for n, r in zip(carry["counts"], records)]
        # The readout of the chunk (LeakyReadout.step), its loss terms and output errors.
        outputs, carry["filtered"] = online_rules.readout_chunk(inputs, kernel, bias, kappa,
                                                               carry["filtered"])
        carry["ys"] = carry["ys"].write(c, outputs)
        value, error = stream.chunk(t0, t1, tf.transpose(outputs, (1, 0, 2)))
        carry["loss"] = carry["loss"] + value
        carry["bias_grad"] = carry["bias_grad"] + tf.reduce_sum(error, axis=(0, 1))
        error = tf.transpose(error, (1, 0, 2))
        flat_error = tf.reshape(error, (-1, n_out))
        new_vars = []
        for i, (layer, w, record, state, lv) in enumerate(zip(
                plan.layers, net.weights, records, states, layer_vars)):
            lv = dict(lv)
            learning = tf.einsum("tbo,on->tbn", error, net.feedback[i])
            factors = _chunk_factors(layer, w, adaptive_params[i], record, state, lv,
                                     layer_inputs[i])
            traces = ops.kspike_eprop_traces(
                scaled_presynaptic=factors["scaled"], learning=learning,
                dz_dv=factors["dz_dv"], dz_db=factors["dz_db"], jacobian=factors["jacobian"],
                constants=constants[i], eps_plain=lv["eps_plain"], ebar_plain=lv["ebar_plain"],
                eps_v=lv["eps_v"], eps_b=lv["eps_b"], ebar_adaptive=lv["ebar_a"],
                sum_traces=sum_traces)
            (lv["eps_plain"], lv["ebar_plain"], lv["eps_v"], lv["eps_b"], lv["ebar_a"],
             gradient, trace_sum) = traces
            lv["grad"] = lv["grad"] + gradient
            if sum_traces:
                lv["trace_sum"] = lv["trace_sum"] + trace_sum
            if i == last or net.adaptive_feedback:
                # dE/dW_out^T = sum_t err_t^T zhat_t with zhat the readout-filtered spikes.
                zhat = engine.linear_filter(record["z"], kappa, 1.0 - kappa,
                                            initial=lv["zhat"])
                lv["zhat"] = zhat[-1]
                lv["feedback_grad"] = lv["feedback_grad"] + tf.matmul(
                    flat_error, tf.reshape(zhat, (-1, layer.units)), transpose_a=True)
            new_vars.append(lv)
        new_flat = online_rules.flat_state(plan, [r["final"] for r in records])
        return c + 1, new_flat, new_vars, carry

    states = online_rules.initial_states(plan, batch)
    # parallel_iterations=1: the forward of later chunks does not depend on the traces and
    # would otherwise run ahead, holding the buffers of up to 10 chunks at once.
    _, _, layer_vars, carry = tf.while_loop(
        lambda c, *_: c < n_chunks, body,
        (0, online_rules.flat_state(plan, states), layer_vars, carry), parallel_iterations=1)
    counts = carry["counts"]
    reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts, batch,
                                                             steps, dtype)
    grads = [lv["grad"] for lv in layer_vars]
    if regularizers:
        grads = [g if r is None else g + r[None, :] * lv["trace_sum"]
                 for g, r, lv in zip(grads, reg_signals, layer_vars)]
    predictions = tf.transpose(carry["ys"].concat(), (1, 0, 2))
    feedback_grads = [lv["feedback_grad"] for lv in layer_vars] if net.adaptive_feedback else []
    return _Terms(grads, tf.transpose(layer_vars[-1]["feedback_grad"]), feedback_grads,
                  carry["loss"], reg_loss, None, carry["bias_grad"], predictions, counts)


def _chunk_factors(layer, weights, adaptive_params, record, state, lv, inputs):
    """The per-step factors of one layer's trace recursions for a chunk, (K, B, ...): "scaled"
    (1 - alpha) p, "dz_dv" (every neuron), "dz_db" and "jacobian" (4, K, B, k) of the adaptive
    neurons. Updates ``lv`` with the last step's spike derivatives (the next chunk's
    Jacobian needs them)."""
    params = weights.params
    z_previous = tf.concat([state.z[None], record["z"][:-1]], axis=0)
    parts = [inputs]
    if weights.recurrent_kernel is not None:
        parts.append(z_previous)
    if weights.bias is not None:
        parts.append(tf.ones_like(inputs[..., :1]))
    p = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
    A = record["A"] if record["A"] is not None else params.thr
    psi = dynamics.spike_pseudo_derivative(record["v"], A, params, record["allowed"])
    dz_dv = psi / A
    n0 = layer.n_plain
    out = {"scaled": (1.0 - params.alpha) * p, "dz_dv": dz_dv}
    if layer.units == n0:
        shape = tf.concat([tf.shape(dz_dv)[:2], [0]], axis=0)
        out["dz_db"] = tf.zeros(shape, dz_dv.dtype)
        out["jacobian"] = tf.zeros(tf.concat([[4], shape], axis=0), dz_dv.dtype)
        return out
    v_a, A_a, psi_a = record["v"][..., n0:], A[..., n0:], psi[..., n0:]
    dz_db = -psi_a * adaptive_params.beta * v_a / (A_a * A_a)
    dz_dv_a = dz_dv[..., n0:]
    previous = dynamics.SpikeDerivatives(tf.concat([lv["dz_dv"][None], dz_dv_a[:-1]], axis=0),
                                         tf.concat([lv["dz_db"][None], dz_db[:-1]], axis=0))
    jac = dynamics.eprop_state_jacobian(z_previous[..., n0:], previous, adaptive_params)
    lv["dz_dv"], lv["dz_db"] = dz_dv_a[-1], dz_db[-1]
    out["dz_db"] = dz_db
    out["jacobian"] = tf.stack([jac.v_v, jac.v_b, jac.b_v, jac.b_b])
    return out
