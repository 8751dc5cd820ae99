"""e-prop (Bellec et al. 2020): eligibility traces forward in time times learning signals.

REFERENCE.md section 4. The eligibility traces are derived from kspike's own step
(``kspike.dynamics``: ``spike_derivatives``, ``eprop_state_jacobian``,
``eprop_eligibility_step``, ``eligibility_trace``), so the (1 - alpha), (1 - rho) factors and the
reset by A_t z_{t-1} of kspike's convention are part of them.
"""
import keras
import numpy as np
import tensorflow as tf

from kspike import dynamics
from kspike.learning import _online
from kspike.learning.base import LearningRule, RuleResult

__all__ = ["EProp"]

_FEEDBACKS = ("symmetric", "random", "adaptive")


class _FunctionCache:
    def __init__(self):
        self.functions = {}


class _FeedbackRule(LearningRule, tf.Module):
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
        values = _online.random_feedback(self._feedback_seed(), shapes, dtype)
        with tf.init_scope():
            for i, value in enumerate(values):
                self.feedback_weights.append(tf.Variable(value, trainable=trainable,
                                                         name=f"feedback_{i}"))
        return self.feedback_weights

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        plan = self.check_model(model)
        self._check_inputs(plan, x)
        regularizers = _online.check_regularizers(regularizers, type(self).__name__)
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
        return _online.check_chain(model, type(self).__name__)

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
class EProp(_FeedbackRule):
    """e-prop: online eligibility propagation for LIF/ALIF networks with a leaky readout.

    The gradient of every input, recurrent and bias weight of the spiking layers is
    ``sum_{batch, t} L_j(t) ebar_ji(t)`` (REFERENCE.md section 4), with eligibility traces
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

    How it runs: a first pass runs the network and keeps only the readout output y (B, T, n_out)
    and spike counts; the user's loss then gives dE/dy_t for every step (so any loss of the output
    sequence works: MSE per step, cross-entropy per step or on a window average with a mask or
    ``sample_weight``); a second pass recomputes the network step by step with the eligibility
    traces and accumulates the gradient. Memory: O(B n_pre n) for the traces plus the inputs and
    outputs; nothing scales with T otherwise.

    Args:
        feedback: "symmetric" (B = W_out^T), "random" (fixed random B, seeded) or "adaptive"
            (B starts random and receives the readout's own gradient, transposed, plus
            ``weight_decay * B``, applied by ``feedback_optimizer``).
        seed: integer seed of the random feedback matrices (None: drawn from NumPy's global
            generator, fixed by ``keras.utils.set_random_seed``).
        online: False (default) applies the readout filter kappa to the learning signal
            (``sum_t L_t ebar_t = sum_t Ltilde_t e_t``, identical gradient, one trace fewer);
            True filters the eligibility traces (ebar) as in the paper, each step using only
            L(t).
        weight_decay: decay of the adaptive feedback matrices (the paper's option), >= 0.
        feedback_optimizer: Keras optimizer for adaptive feedback (default Adam(1e-3)).

    The feedback matrices are variables of the rule (``rule.feedback_weights``, saved by
    ``tf.train.Checkpoint(rule=rule)``; random ones are also reproducible from ``seed``).

    Example:

    >>> rule = kspike.learning.EProp(feedback="random", seed=1)
    >>> grads = rule.gradients(model, x, y, keras.losses.MeanSquaredError())
    >>> optimizer.apply(grads, model.trainable_variables)
    """

    name = "eprop"

    def __init__(self, feedback="symmetric", seed=None, online=False, weight_decay=0.0,
                 feedback_optimizer=None):
        super().__init__(seed)
        if feedback not in _FEEDBACKS:
            raise ValueError(f"`feedback` must be one of {_FEEDBACKS}, received {feedback!r}.")
        self.feedback = feedback
        if not isinstance(online, (bool, np.bool_)):
            raise TypeError(f"`online` must be True or False, received {online!r}.")
        self.online = bool(online)
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
                  "weight_decay": self.weight_decay}
        if self.feedback_optimizer is not None:
            config["feedback_optimizer"] = keras.optimizers.serialize(self.feedback_optimizer)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

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
        tape, weights, readout, weight_loss = _online.watched_weights(plan, model)
        feedback = self._feedback_matrices(plan, readout[0])
        x = tf.cast(x, dtype)
        sequence = _online.time_major(x, dtype)
        predictions, counts = _online.inference_pass(plan, weights, readout, x, sequence)
        task_loss, error = _online.output_errors(loss, y, predictions, sample_weight)
        batch, steps = tf.shape(x)[0], tf.shape(x)[1]
        reg_loss, reg_signals = _online.regularizer_signals(regularizers, plan, counts, batch,
                                                            steps, dtype)
        grads, readout_grads, feedback_grads = self._trace_pass(
            plan, weights, readout, feedback, x, sequence, error, reg_signals)
        gradients, total = _online.model_gradients(tape, model, weights, grads, readout,
                                                   readout_grads, error, task_loss + reg_loss,
                                                   weight_loss, dtype)
        del tape
        if self.feedback == "adaptive" and training:
            updates = [g + self.weight_decay * tf.cast(v, dtype)
                       for g, v in zip(feedback_grads, self.feedback_weights)]
            self.feedback_optimizer.apply(
                [tf.cast(u, v.dtype) for u, v in zip(updates, self.feedback_weights)],
                self.feedback_weights)
        rates = {f"firing_rate/{layer.layer.name}":
                 tf.reduce_mean(c) / tf.cast(batch * steps, dtype) * (1000.0 / layer.cell.dt)
                 for layer, c in zip(plan.layers, counts)}
        return RuleResult(loss=total, gradients=gradients, predictions=predictions, logs=rates)

    def _trace_pass(self, plan, weights, readout, feedback, x, sequence, error, reg_signals):
        """Second pass: the network again, with eligibility traces, accumulating gradients.

        Returns (per layer (g_in, g_rec, g_bias), readout kernel gradient, per feedback variable
        its adaptive gradient (or [])).
        """
        dtype = plan.dtype
        kappa = plan.readout.kappa
        online = self.online
        xs, steps = sequence
        signal = error if online else _online.backward_filter(error, kappa)
        signals = tf.TensorArray(dtype, size=steps).unstack(tf.transpose(signal, (1, 0, 2)))
        batch = tf.shape(x)[0]
        n_layers = len(plan.layers)
        adaptive_feedback = self.feedback == "adaptive"
        states = _online.initial_states(plan, batch)

        # Loop variables per layer: traces and gradient accumulators.
        sizes = [_online.presynaptic_size(layer, w) for layer, w in zip(plan.layers, weights)]
        layer_vars = []
        for layer, w, size in zip(plan.layers, weights, sizes):
            k = layer.units - layer.n_plain
            lv = {"grad": tf.zeros((size, layer.units), dtype)}
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
            lv["feedback_grad"] = tf.zeros((plan.readout.units, layer.units), dtype)
            layer_vars.append(lv)
        adaptive_params = []
        for layer, w in zip(plan.layers, weights):
            p = w.params
            if layer.units > layer.n_plain:
                beta = tf.constant(layer.cell.beta_vector[layer.n_plain:], dtype)
                p = p._replace(beta=beta)
            adaptive_params.append(p)

        def body(t, flat, layer_vars):
            states = _online.nested_state(plan, flat)
            inputs = xs.read(t)
            sig_t = signals.read(t)
            new_states, new_vars = [], []
            for i, (layer, w, state, lv) in enumerate(zip(plan.layers, weights, states,
                                                          layer_vars)):
                lv = dict(lv)
                p = _online.presynaptic(inputs, state.z, w)
                new_state, A, allowed = _online.layer_step(inputs, state, w)
                derivatives = dynamics.spike_derivatives(new_state, A, w.params, allowed)
                b_matrix = feedback[i]
                learning = tf.matmul(sig_t, b_matrix)            # (B, n)
                reg = reg_signals[i]
                n0 = layer.n_plain
                if n0:
                    eps, _ = dynamics.eprop_eligibility_step(
                        lv["eps_plain"], None, p, dynamics.StateJacobian(w.params.alpha, None,
                                                                         None, None), w.params)
                    lv["eps_plain"] = eps
                    dz_dv = derivatives.dz_dv[:, :n0]
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
                    grad_plain = g
                else:
                    grad_plain = None
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
                    e = dynamics.eligibility_trace(
                        eps_v, eps_b, dynamics.SpikeDerivatives(current.dz_dv[:, None, :],
                                                                current.dz_db[:, None, :]))
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
                    grad = g if grad_plain is None else tf.concat([grad_plain, g], axis=1)
                else:
                    grad = grad_plain
                lv["grad"] = lv["grad"] + grad
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
                new_states.append(new_state)
                new_vars.append(lv)
                inputs = new_state.z
            return t + 1, _online.flat_state(plan, new_states), new_vars

        _, _, layer_vars = tf.while_loop(
            lambda t, *_: t < steps, body, (0, _online.flat_state(plan, states), layer_vars))
        grads = [_online.split_stacked(lv["grad"], layer, w)
                 for lv, layer, w in zip(layer_vars, plan.layers, weights)]
        readout_grad = tf.transpose(layer_vars[-1]["feedback_grad"])
        feedback_grads = []
        if adaptive_feedback:
            feedback_grads = [lv["feedback_grad"] for lv in layer_vars]
        return grads, readout_grad, feedback_grads
