"""e-prop (Bellec et al. 2020): eligibility traces forward in time times learning signals.

docs/eprop.md. The eligibility traces are derived from kspike's own step
(``kspike.dynamics``: ``spike_derivatives``, ``eprop_state_jacobian``,
``eprop_eligibility_step``, ``eligibility_trace``), so the (1 - alpha), (1 - rho) factors and the
reset by A_t z_{t-1} of kspike's convention are part of them.
"""
import keras
import numpy as np
import tensorflow as tf

from kspike import dynamics
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
    ``e_ji(t)`` computed forward in time from kspike's own step, inside the ``tf.while_loop`` that
    runs the network (no stored sequence of states: memory does not grow with T), and learning
    signals ``L_j(t) = sum_k B_jk dE/dy_k(t)`` from the readout error. The readout (and its bias)
    learns from its exact local gradient.

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

    - Single pass (truly online, as in the paper): ONE ``tf.while_loop`` runs the spiking
      layers and the leaky readout (``LeakyReadout.step``); at every step t it forms the output
      error dE/dy_t from the target at t (autodiff of the user's loss on the slice t, rescaled
      from the slice's reduction to the sequence's), the learning signals L_t = dE/dy_t B, the
      readout-filtered traces ebar_t, and accumulates the gradients. It needs a loss that is a sum
      of per-step terms: ``keras.losses.MeanSquaredError``, ``CategoricalCrossentropy``,
      ``SparseCategoricalCrossentropy`` (without ``ignore_class``) or ``BinaryCrossentropy``
      (objects with any ``from_logits``/``label_smoothing`` and a scalar reduction, or their
      names such as ``"mse"``), targets with the outputs' time axis ((B, T, n_out); class
      indices (B, T) for the sparse cross-entropy) and, optionally, a ``sample_weight`` of
      shape (B, T) (e.g. a mask of the recall steps or of a cue window). The firing-rate
      regulariser needs the mean rate of the whole sequence: the loop sums the eligibility
      traces ``sum_{b,t} e_ji`` and contracts them with the regulariser's per-neuron derivative
      after the last step, which is exact.
    - Two passes: a first pass runs the network and keeps only the readout output y (B, T,
      n_out) and spike counts; the user's loss then gives dE/dy_t for every step (so any loss of
      the output sequence works: window-averaged cross-entropy, custom losses); a second pass
      recomputes the network step by step with the eligibility traces and accumulates the
      gradient.

    Memory in both: O(B n_pre n) for the traces (one (B, n_pre, n) trace more in single pass)
    plus the inputs, targets and the outputs y (B, T, n_out) returned as predictions; nothing
    scales with T otherwise.

    Args:
        feedback: "symmetric" (B = W_out^T), "random" (fixed random B, seeded) or "adaptive"
            (B starts random and receives the readout's own gradient, transposed, plus
            ``weight_decay * B``, applied by ``feedback_optimizer``).
        seed: integer seed of the random feedback matrices (None: drawn from NumPy's global
            generator, fixed by ``keras.utils.set_random_seed``).
        online: the form of the two-pass computation. False (default) applies the readout filter
            kappa to the learning signal (``sum_t L_t ebar_t = sum_t Ltilde_t e_t``, identical
            gradient, one trace fewer); True filters the eligibility traces (ebar) as in the
            paper, each step using only L(t). The single pass always filters the traces.
        single_pass: False (default): always two passes, the fastest form on CPU (the second
            pass's signal filter needs no (B, n_pre, n) ebar trace, and a plain LIF neuron's
            gradient is then one matmul per step). True: always the single pass; a loss, target
            or sample weight it cannot take raises ValueError saying why. "auto": the single
            pass when the loss qualifies, otherwise two passes.
        weight_decay: decay of the adaptive feedback matrices (the paper's option), >= 0.
        feedback_optimizer: Keras optimizer for adaptive feedback (default Adam(1e-3)).

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
                 feedback_optimizer=None, single_pass=False):
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
                  "weight_decay": self.weight_decay, "single_pass": self.single_pass}
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
        sequence = online_rules.time_major(x, dtype)
        batch, steps = tf.shape(x)[0], tf.shape(x)[1]
        if single:
            stream = online_rules.PerStepLoss(loss, y, sample_weight, steps, dtype)
            out = self._loop(plan, weights, feedback, x, sequence, online=True, stream=stream,
                             sum_traces=bool(regularizers))
            counts = out["counts"]
            reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts,
                                                                     batch, steps, dtype)
            grads = out["grads"]
            if regularizers:
                # dR/dz_j(t) is the same for every sample and step, known once the sequence has
                # ended: its term is that factor times the traces summed over batch and time.
                grads = [g if r is None else g + r[None, :] * e
                         for g, r, e in zip(grads, reg_signals, out["trace_sums"])]
            task_loss, error, bias_grad = out["loss"], None, out["bias_grad"]
            predictions = out["predictions"]
        else:
            predictions, counts = online_rules.inference_pass(plan, weights, readout, x, sequence)
            task_loss, error = online_rules.output_errors(loss, y, predictions, sample_weight)
            reg_loss, reg_signals = online_rules.regularizer_signals(regularizers, plan, counts,
                                                                     batch, steps, dtype)
            signal = (error if self.online
                      else online_rules.backward_filter(error, plan.readout.kappa))
            signals = tf.TensorArray(dtype, size=steps).unstack(tf.transpose(signal, (1, 0, 2)))
            out = self._loop(plan, weights, feedback, x, sequence, online=self.online,
                             signals=signals, reg_signals=reg_signals)
            grads, bias_grad = out["grads"], None
        grads = [online_rules.split_stacked(g, layer, w)
                 for g, layer, w in zip(grads, plan.layers, weights)]
        gradients, total = online_rules.model_gradients(tape, model, weights, grads, readout,
                                                        out["readout_grad"], error,
                                                        task_loss + reg_loss, weight_loss, dtype,
                                                        readout_bias_grad=bias_grad)
        del tape
        if self.feedback == "adaptive" and training:
            updates = [g + self.weight_decay * tf.cast(v, dtype)
                       for g, v in zip(out["feedback_grads"], self.feedback_weights)]
            self.feedback_optimizer.apply(
                [tf.cast(u, v.dtype) for u, v in zip(updates, self.feedback_weights)],
                self.feedback_weights)
        rates = firing_rate_logs(
            [SpikeRate(layer.layer.name,
                                    tf.reduce_mean(c) / tf.cast(batch * steps, dtype),
                                    layer.cell.dt, layer.units)
             for layer, c in zip(plan.layers, counts)])
        return RuleResult(loss=total, gradients=gradients, predictions=predictions, logs=rates)

    def _loop(self, plan, weights, feedback, x, sequence, online, signals=None, stream=None,
              reg_signals=None, sum_traces=False):
        """The network step by step with eligibility traces, accumulating gradients.

        Each step first advances every layer and its traces (nothing there depends on the
        learning signal), then takes the output error of the step: read from ``signals``
        (TensorArray of (B, n_out), two passes) or, with ``stream`` (a
        ``kspike.learning.online.PerStepLoss``),
        formed from the readout run in the same loop; then forms every layer's learning signal
        and gradient term.

        Returns a dict: "grads" per layer (P, n) of the stacked kernel, "readout_grad" (n, n_out),
        "feedback_grads" (adaptive feedback) and, with ``stream``: "loss", "bias_grad" (n_out,),
        "predictions" (B, T, n_out), "counts" per layer (n,) spikes summed over batch and time;
        with ``sum_traces``: "trace_sums" per layer (P, n), sum over batch and time of e_ji.
        """
        dtype = plan.dtype
        readout_layer = plan.readout
        kappa = readout_layer.kappa
        xs, steps = sequence
        batch = tf.shape(x)[0]
        n_layers = len(plan.layers)
        adaptive_feedback = self.feedback == "adaptive"
        if reg_signals is None:
            reg_signals = [None] * n_layers
        states = online_rules.initial_states(plan, batch)

        # Loop variables per layer: traces and gradient accumulators.
        layer_vars = []
        for layer, w in zip(plan.layers, weights):
            size = online_rules.presynaptic_size(layer, w)
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
            lv["feedback_grad"] = tf.zeros((readout_layer.units, layer.units), dtype)
            layer_vars.append(lv)
        carry = {}
        if stream is not None:
            carry = {"counts": [tf.zeros((layer.units,), dtype) for layer in plan.layers],
                     "filtered": tf.zeros((batch, readout_layer.units), dtype),
                     "loss": tf.zeros((), dtype),
                     "bias_grad": tf.zeros((readout_layer.units,), dtype),
                     "ys": tf.TensorArray(dtype, size=steps)}
        adaptive_params = []
        for layer, w in zip(plan.layers, weights):
            p = w.params
            if layer.units > layer.n_plain:
                beta = tf.constant(layer.cell.beta_vector[layer.n_plain:], dtype)
                p = p._replace(beta=beta)
            adaptive_params.append(p)

        def body(t, flat, layer_vars, carry):
            states = online_rules.nested_state(plan, flat)
            inputs = xs.read(t)
            new_states, new_vars, local = [], [], []
            # 1. Every layer's step and eligibility traces.
            for i, (layer, w, state, lv) in enumerate(zip(plan.layers, weights, states,
                                                          layer_vars)):
                lv = dict(lv)
                p = online_rules.presynaptic(inputs, state.z, w)
                new_state, A, allowed = online_rules.layer_step(inputs, state, w)
                derivatives = dynamics.spike_derivatives(new_state, A, w.params, allowed)
                n0 = layer.n_plain
                item = {}
                if n0:
                    eps, _ = dynamics.eprop_eligibility_step(
                        lv["eps_plain"], None, p, dynamics.StateJacobian(w.params.alpha, None,
                                                                         None, None), w.params)
                    lv["eps_plain"] = eps
                    item["eps"], item["dz_dv"] = eps, derivatives.dz_dv[:, :n0]
                if layer.units > n0:
                    previous = dynamics.SpikeDerivatives(lv["dz_dv"], lv["dz_db"])
                    jac = dynamics.eprop_state_jacobian(state.z[:, n0:], previous,
                                                        adaptive_params[i])
                    jac = dynamics.StateJacobian(*[j[:, None, :] for j in jac])
                    eps_v, eps_b = dynamics.eprop_eligibility_step(
                        lv["eps_v"], lv["eps_b"], p[:, :, None], jac, w.params)
                    lv["eps_v"], lv["eps_b"] = eps_v, eps_b
                    current = dynamics.SpikeDerivatives(derivatives.dz_dv[:, n0:],
                                                        derivatives.dz_db[:, n0:])
                    lv["dz_dv"], lv["dz_db"] = current
                    item["e"] = dynamics.eligibility_trace(
                        eps_v, eps_b, dynamics.SpikeDerivatives(current.dz_dv[:, None, :],
                                                                current.dz_db[:, None, :]))
                new_states.append(new_state)
                new_vars.append(lv)
                local.append(item)
                inputs = new_state.z
            # 2. The output error of this step.
            carry = dict(carry)
            if stream is None:
                sig_t = signals.read(t)
            else:
                carry["counts"] = [c + tf.reduce_sum(s.z, axis=0)
                                   for c, s in zip(carry["counts"], new_states)]
                y_t, carry["filtered"] = readout_layer.step(inputs, carry["filtered"])
                value, sig_t = stream.step(t, y_t)
                carry["loss"] = carry["loss"] + value
                carry["bias_grad"] = carry["bias_grad"] + tf.reduce_sum(sig_t, axis=0)
                carry["ys"] = carry["ys"].write(t, y_t)
            # 3. Learning signals and gradient terms.
            for i, (layer, lv, item, new_state) in enumerate(zip(plan.layers, new_vars, local,
                                                                 new_states)):
                learning = tf.matmul(sig_t, feedback[i])            # (B, n)
                reg = reg_signals[i]
                n0 = layer.n_plain
                parts, sums = [], []
                if n0:
                    eps, dz_dv = item["eps"], item["dz_dv"]
                    if online:
                        e = eps[:, :, None] * dz_dv[:, None, :]
                        ebar = kappa * lv["ebar_plain"] + (1.0 - kappa) * e
                        lv["ebar_plain"] = ebar
                        g = tf.reduce_sum(ebar * learning[:, None, :n0], axis=0)
                        if reg is not None:
                            g = g + tf.matmul(eps, reg[:n0] * dz_dv, transpose_a=True)
                    else:
                        # A plain LIF neuron's trace factorises: e_ji = dz_j/dv_j eps_i, so the
                        # batch sum is one matmul.
                        post = learning[:, :n0] if reg is None else learning[:, :n0] + reg[:n0]
                        g = tf.matmul(eps, post * dz_dv, transpose_a=True)
                    parts.append(g)
                    if sum_traces:
                        sums.append(tf.matmul(eps, dz_dv, transpose_a=True))
                if layer.units > n0:
                    e = item["e"]
                    post = learning[:, n0:]
                    if online:
                        ebar = kappa * lv["ebar_a"] + (1.0 - kappa) * e
                        lv["ebar_a"] = ebar
                        g = tf.reduce_sum(ebar * post[:, None, :], axis=0)
                        if reg is not None:
                            g = g + reg[n0:] * tf.reduce_sum(e, axis=0)
                    else:
                        if reg is not None:
                            post = post + reg[n0:]
                        g = tf.reduce_sum(e * post[:, None, :], axis=0)
                    parts.append(g)
                    if sum_traces:
                        sums.append(tf.reduce_sum(e, axis=0))
                lv["grad"] = lv["grad"] + (parts[0] if len(parts) == 1
                                           else tf.concat(parts, axis=1))
                if sum_traces:
                    lv["trace_sum"] = lv["trace_sum"] + (sums[0] if len(sums) == 1
                                                         else tf.concat(sums, axis=1))
                if online:
                    zhat = kappa * lv["zhat"] + (1.0 - kappa) * new_state.z
                    lv["zhat"] = zhat
                    if i == n_layers - 1 or adaptive_feedback:
                        # dE/dW_out = sum_t zhat_t^T err_t (adaptive B: its transpose).
                        lv["feedback_grad"] = lv["feedback_grad"] + tf.matmul(
                            sig_t, zhat, transpose_a=True)
                elif i == n_layers - 1 or adaptive_feedback:
                    # The same sum with the filter moved onto the error: sum_t z_t^T Etilde_t.
                    lv["feedback_grad"] = lv["feedback_grad"] + tf.matmul(
                        sig_t, new_state.z, transpose_a=True)
            return t + 1, online_rules.flat_state(plan, new_states), new_vars, carry

        _, _, layer_vars, carry = tf.while_loop(
            lambda t, *_: t < steps, body,
            (0, online_rules.flat_state(plan, states), layer_vars, carry))
        out = {"grads": [lv["grad"] for lv in layer_vars],
               "readout_grad": tf.transpose(layer_vars[-1]["feedback_grad"]),
               "feedback_grads": ([lv["feedback_grad"] for lv in layer_vars]
                                  if adaptive_feedback else [])}
        if sum_traces:
            out["trace_sums"] = [lv["trace_sum"] for lv in layer_vars]
        if stream is not None:
            out.update(loss=carry["loss"], bias_grad=carry["bias_grad"], counts=carry["counts"],
                       predictions=tf.transpose(carry["ys"].stack(), (1, 0, 2)))
        return out
