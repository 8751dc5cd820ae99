"""Keras 3 RNN cells of spiking neurons: ``kspike.LIF`` and ``kspike.ALIF`` (LSNN).

The cells are thin shells: they hold the parameters and weights and call
``kspike.dynamics.neuron_step`` once per time step. Use them inside ``keras.layers.RNN`` (or the
faster ``kspike.SpikingRNN``) like any Keras cell.
"""
import contextlib
import math
import types

import keras
import numpy as np
import tensorflow as tf
from keras import constraints, initializers, regularizers

from kspike import dynamics, surrogates

__all__ = ["ALIF", "LIF", "SpikingCell", "ZeroDiagonal", "split_outputs"]

_OUTPUTS = ("spikes", "all")


@keras.saving.register_keras_serializable(package="kspike")
class ZeroDiagonal(keras.constraints.Constraint):
    """Keeps the diagonal of a square kernel at 0 (no self-connection), after an optional
    inner constraint."""

    def __init__(self, inner=None):
        self.inner = constraints.get(inner)

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        n = w.shape[0]
        return w * tf.cast(1.0 - tf.eye(n), w.dtype)

    def get_config(self):
        return {"inner": constraints.serialize(self.inner)}


def check_positive(name, value, integer=False, allow_zero=False):
    """``value`` as a float (an int with ``integer=True``), or TypeError/ValueError naming the
    argument ``name``, the value received and what is expected (> 0, or >= 0 with
    ``allow_zero``)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be {kind}, received {value!r} of type "
                        f"{type(value).__name__}.")
    if integer and float(value) != int(value):
        raise ValueError(f"`{name}` must be an integer, received {value!r}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite, received {value!r}.")
    bound = ">= 0" if allow_zero else "> 0"
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {kind} {bound}, received {value!r}.")
    return int(value) if integer else float(value)


def split_outputs(y):
    """Split the output of a cell built with ``output="all"``.

    Args:
        y: (..., 3 * units) tensor or array, ``concat([z, v, A])`` along the last axis.

    Returns:
        (z, v, A): spikes, membrane potentials and adaptive thresholds, each (..., units).
    """
    size = y.shape[-1]
    if size is None or size % 3:
        raise ValueError("`y` must have a last dimension of 3 * units (the output of a cell "
                         f"with output='all'), received shape {tuple(y.shape)}.")
    units = size // 3
    return y[..., :units], y[..., units:2 * units], y[..., 2 * units:]


def _cell_spike_function(surrogate, dampening_factor):
    """The ``kspike.surrogates.SpikeFunction`` of a cell's ``surrogate`` argument: an object
    as given (it carries its own dampening and sharpness), a config dict, or a registered
    name built with ``dampening_factor``."""
    if isinstance(surrogate, surrogates.SpikeFunction):
        return surrogate
    if isinstance(surrogate, dict):
        return surrogates.get(dict(surrogate))
    return surrogates.get(surrogate, dampening=dampening_factor)


def _check_sparsity(connectivity, dale, **dense_only):
    """A cell's ``connectivity`` (in (0, 1] or None) and ``dale`` (in (0, 1) or None), checked;
    ``dense_only`` are the initializer/constraint arguments that rewired kernels refuse."""
    if connectivity is not None:
        connectivity = check_positive("connectivity", connectivity)
        if connectivity > 1.0:
            raise ValueError("`connectivity` must be in (0, 1] (the fraction of active "
                             f"connections), received {connectivity!r}.")
    if dale is not None:
        dale = check_positive("dale", dale)
        if not 0.0 < dale < 1.0:
            raise ValueError("`dale` must be in (0, 1) (the fraction of excitatory "
                             f"presynaptic neurons), received {dale!r}.")
    if connectivity is not None or dale is not None:
        # Rewired/sign-constrained kernels are initialised by kspike.rewiring (magnitudes
        # |N(0, 1)| / sqrt(n_in) on the active entries) and kept by DEEP R, so these
        # arguments would be silently ignored.
        for name, value in dense_only.items():
            if value is not None:
                raise ValueError(f"`{name}` cannot be used with connectivity="
                                 f"{connectivity!r} / dale={dale!r}: rewired kernels are "
                                 f"initialised and constrained by kspike.rewiring; received "
                                 f"{name}={value!r}.")
    return connectivity, dale


def _step_input_dim(cell_name, input_shape):
    """The feature size of the step shape (batch, features) an RNN layer builds a cell with,
    or ValueError saying which axis is missing."""
    if len(input_shape) == 1:
        # keras.layers.RNN builds its cell with (batch,) + shape[2:]: rank 1 means the
        # sequence had rank 2, so either its time or its feature axis is missing.
        raise ValueError(f"{cell_name} received a sequence of rank 2 (its RNN "
                         f"layer built it with step shape {tuple(input_shape)}): the "
                         "time or the feature axis is missing. RNN inputs must be (batch, "
                         "time, features): use x[..., None] for one input channel per "
                         "step, or x[:, None, :] for a single time step.")
    if len(input_shape) != 2:
        # An RNN layer builds its cell with the shape of one step, (batch, features).
        raise ValueError(f"{cell_name} expects step inputs of shape (batch, "
                         "features), i.e. sequences of shape (batch, time, features) in "
                         f"an RNN layer; received step shape {tuple(input_shape)}.")
    input_dim = input_shape[-1]
    if input_dim is None:
        raise ValueError(f"{cell_name} needs a known input feature size, "
                         f"received input shape {tuple(input_shape)}.")
    return int(input_dim)


class _CellWeights:
    """The weights half of ``SpikingCell``: ``build`` (dense or rewired kernels, synaptic
    delays, bias) and the kernels as ``call`` uses them.

    Reads the cell's arguments (``units``, ``recurrent``, ``connectivity``, ``dale``,
    ``n_delay``, ``seed``, initializers, regularizers, constraints) set by
    ``SpikingCell.__init__``.
    """

    @property
    def input_kernel(self):
        """Effective input weights (n_in, units): a variable, or a tensor for rewired cells."""
        if "input" in self._rewired:
            return self._rewired["input"].effective()
        return self._input_kernel

    @property
    def recurrent_kernel(self):
        """Effective recurrent weights (units, units) with zero diagonal, or None."""
        if "recurrent" in self._rewired:
            return self._rewired["recurrent"].effective()
        return self._recurrent_kernel

    @property
    def input_delays(self):
        """Read-only (n_in, units) int32 NumPy array of the input synapses' delay indices in
        {0, ..., n_delay - 1} (all 0 for ``n_delay=1``); None before ``build``."""
        return self._delays(self._input_delays, getattr(self, "input_dim", None))

    @property
    def recurrent_delays(self):
        """Read-only (units, units) int32 NumPy array of the recurrent synapses' delay indices
        (all 0 for ``n_delay=1``); None before ``build`` or without recurrence."""
        if not self.recurrent:
            return None
        return self._delays(self._recurrent_delays, self.units if self.built else None)

    def _delays(self, variable, n_pre):
        if n_pre is None:
            return None
        if variable is None:
            values = np.zeros((n_pre, self.units), np.int32)
        else:
            values = np.array(keras.ops.convert_to_numpy(variable), np.int32)
        values.setflags(write=False)
        return values

    # ----------------------------------------------------------------- weights
    def build(self, input_shape):
        self.input_dim = _step_input_dim(type(self).__name__, input_shape)
        sparse = self.connectivity is not None or self.dale is not None
        if sparse:
            from kspike import rewiring  # sign-constrained, rewirable kernels live there
            self._rewired["input"] = rewiring.RewiredKernel(
                self, "input_kernel", (self.input_dim, self.units), self.connectivity,
                self.dale, zero_diagonal=False, seed=self.seed, regularizer=self.input_regularizer)
        else:
            self._input_kernel = self.add_weight(
                name="input_kernel", shape=(self.input_dim, self.units),
                initializer=self.input_initializer, regularizer=self.input_regularizer,
                constraint=self.input_constraint)
        if self.recurrent:
            if sparse:
                self._rewired["recurrent"] = rewiring.RewiredKernel(
                    self, "recurrent_kernel", (self.units, self.units), self.connectivity,
                    self.dale, zero_diagonal=True,
                    seed=None if self.seed is None else self.seed + 1,
                    regularizer=self.recurrent_regularizer)
            else:
                self._recurrent_kernel = self.add_weight(
                    name="recurrent_kernel", shape=(self.units, self.units),
                    initializer=self._zero_diagonal_initializer,
                    regularizer=self.recurrent_regularizer,
                    constraint=ZeroDiagonal(self.recurrent_constraint))
        if self.delayed:
            # LSNN: one fixed, uniformly drawn delay index per synapse (non-trainable weights,
            # so they are saved with the cell and restored by a .keras round trip).
            self._input_delays = self.add_weight(
                name="input_delays", shape=(self.input_dim, self.units), dtype="int32",
                initializer=self._delay_initializer(5), trainable=False)
            if self.recurrent:
                self._recurrent_delays = self.add_weight(
                    name="recurrent_delays", shape=(self.units, self.units), dtype="int32",
                    initializer=self._delay_initializer(6), trainable=False)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        self.built = True

    def _delay_initializer(self, offset):
        """Initializer drawing delay indices uniformly in {0, ..., n_delay - 1}: from
        ``seed + offset`` when the cell has a seed, else from NumPy's global generator (seeded
        by ``keras.utils.set_random_seed``)."""
        def draw(shape, dtype=None):
            rng = np.random if self.seed is None else np.random.RandomState(self.seed + offset)
            values = rng.randint(0, self.n_delay, size=tuple(shape))
            return tf.constant(values, dtype=dtype or "int32")
        return draw

    def _zero_diagonal_initializer(self, shape, dtype=None):
        w = self.recurrent_initializer(shape, dtype=dtype)
        return w * tf.cast(1.0 - tf.eye(shape[0]), w.dtype)

    def effective_kernels(self, dtype=None):
        """(W_in, W_rec, bias) as tensors in ``dtype`` (default the state dtype), with the
        recurrent diagonal forced to 0; W_rec and bias are None when absent."""
        dtype = dtype or self.state_dtype
        w_in = tf.cast(self.input_kernel, dtype)
        w_rec = None
        if self.recurrent:
            w_rec = tf.cast(self.recurrent_kernel, dtype)
            if "recurrent" not in self._rewired:
                # set_diag builds nothing of size units x units: a (units, units) mask
                # constant would be stored in every traced graph (a SavedModel of 2048 units
                # held ~9 copies of it), and a tf.eye mask would be rebuilt each time step.
                w_rec = tf.linalg.set_diag(w_rec, tf.zeros((self.units,), dtype))
        bias = None if self.bias is None else tf.cast(self.bias, dtype)
        return w_in, w_rec, bias

    def step_kernels(self, dtype=None):
        """(W_in, W_rec, bias) as ``call`` uses them in ``dtype`` (default the compute dtype):
        ``effective_kernels``, widened by ``kspike.dynamics.delay_kernel`` to (n_pre,
        n_delay * units) for a delayed cell."""
        dtype = dtype or keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        w_in, w_rec, bias = self.effective_kernels(dtype)
        if self.delayed:
            w_in = dynamics.delay_kernel(w_in, self._input_delays, self.n_delay)
            if w_rec is not None:
                w_rec = dynamics.delay_kernel(w_rec, self._recurrent_delays, self.n_delay)
        return w_in, w_rec, bias

    @contextlib.contextmanager
    def fixed_kernels(self):
        """Within this context ``call`` reuses the kernels of ``step_kernels`` computed once
        on entering it, instead of recomputing them at every step (the same values and
        gradients). ``kspike.SpikingRNN`` runs the time loop of a delayed cell in it."""
        previous = self._fixed_kernels
        self._fixed_kernels = self.step_kernels()
        try:
            yield self._fixed_kernels
        finally:
            self._fixed_kernels = previous


class SpikingCell(_CellWeights, keras.layers.Layer):
    """Shared shell of ``kspike.LIF`` and ``kspike.ALIF`` (weights, state handling, config).

    Not used directly: build a ``LIF`` or an ``ALIF``. ``isinstance(obj, SpikingCell)`` (or
    ``kspike.graph.is_spiking_cell(obj)``) tells whether an object is a kspike cell; the
    arguments are those of ``kspike.LIF`` (docs/neurons.md).
    """

    _adaptive = False

    def __init__(self, units, tau=20.0, thr=0.01, dt=1.0, n_refractory=0, dampening_factor=0.3,
                 surrogate="triangular", recurrent=True, connectivity=None, dale=None,
                 output="spikes", seed=None, n_delay=1, use_bias=False,
                 input_initializer=None, recurrent_initializer=None, bias_initializer="zeros",
                 input_regularizer=None, recurrent_regularizer=None, bias_regularizer=None,
                 input_constraint=None, recurrent_constraint=None, bias_constraint=None,
                 **kwargs):
        kwargs.pop("autocast", None)
        # States stay in float32 under mixed precision: the cell handles casts itself.
        super().__init__(autocast=False, **kwargs)
        self.units = check_positive("units", units, integer=True)
        self.tau = check_positive("tau", tau)
        self.thr = check_positive("thr", thr)
        self.dt = check_positive("dt", dt)
        self.n_refractory = check_positive("n_refractory", n_refractory, integer=True,
                                           allow_zero=True)
        self.dampening_factor = check_positive("dampening_factor", dampening_factor)
        self.spike_function = _cell_spike_function(surrogate, self.dampening_factor)
        if not isinstance(recurrent, (bool, np.bool_)):
            raise TypeError(f"`recurrent` must be True or False, received {recurrent!r}.")
        self.recurrent = bool(recurrent)
        self.connectivity, self.dale = _check_sparsity(
            connectivity, dale, input_initializer=input_initializer,
            recurrent_initializer=recurrent_initializer, input_constraint=input_constraint,
            recurrent_constraint=recurrent_constraint)
        if output not in _OUTPUTS:
            raise ValueError(f"`output` must be one of {_OUTPUTS}, received {output!r}.")
        self.output_mode = output
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"`seed` must be an integer or None, received {seed!r}.")
        self.seed = None if seed is None else int(seed)
        self.n_delay = check_positive("n_delay", n_delay, integer=True)
        self.use_bias = bool(use_bias)
        self.input_initializer = self._initializer(input_initializer, 0)
        self.recurrent_initializer = self._initializer(recurrent_initializer, 1)
        self.bias_initializer = initializers.get(bias_initializer)
        self.input_regularizer = regularizers.get(input_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.input_constraint = constraints.get(input_constraint)
        self.recurrent_constraint = constraints.get(recurrent_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.alpha = dynamics.decay(self.tau, self.dt)
        self._input_kernel = None
        self._recurrent_kernel = None
        self.bias = None
        self._rewired = {}
        self._input_delays = None
        self._recurrent_delays = None
        self._fixed_kernels = None

    def _initializer(self, identifier, offset):
        if identifier is None:
            # LSNN: weights N(0, 1) / sqrt(fan_in).
            seed = None if self.seed is None else self.seed + offset
            return initializers.VarianceScaling(1.0, "fan_in", "untruncated_normal", seed=seed)
        return initializers.get(identifier)

    # ----------------------------------------------------------------- properties
    @property
    def state_dtype(self):
        """dtype of the states: float32 under 16-bit mixed precision, else the compute dtype."""
        dtype = keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        return "float32" if dtype in ("float16", "bfloat16") else dtype

    @property
    def compute_dtype(self):
        """The state dtype: ``keras.layers.RNN`` casts the initial states to the cell's
        ``compute_dtype`` and its while-loop needs the states to keep one dtype, so under
        mixed precision the cell reports float32 here. The matmuls and the output still use
        the policy's 16-bit compute dtype (``dtype_policy.compute_dtype``)."""
        return self.state_dtype

    @property
    def adaptive(self):
        """True if the cell carries a threshold-adaptation state b (ALIF, even with
        ``n_adaptive=0``), False for LIF."""
        return self._adaptive

    @property
    def rewired(self):
        """True if the kernels are sparse and sign-constrained (``connectivity`` or ``dale``
        set), i.e. held by ``kspike.rewiring`` rather than plain variables."""
        return bool(self._rewired) or self.connectivity is not None or self.dale is not None

    @property
    def rewired_kernels(self):
        """Read-only {"input"|"recurrent": ``kspike.rewiring.RewiredKernel``} of a built rewired
        cell (empty for dense kernels or before ``build``)."""
        return types.MappingProxyType(self._rewired)

    @property
    def delayed(self):
        """True if the synapses have delays (``n_delay`` > 1): the state then ends with the
        future-current buffer ``i_future``."""
        return self.n_delay > 1

    @property
    def state_names(self):
        names = ("v", "b", "z", "r") if self._adaptive else ("v", "z", "r")
        return names + ("i_future",) if self.delayed else names

    @property
    def state_size(self):
        return [self.units * self.n_delay if name == "i_future" else self.units
                for name in self.state_names]

    @property
    def output_size(self):
        return self.units * (3 if self.output_mode == "all" else 1)

    @property
    def beta_vector(self):
        """Per-neuron adaptation strength, (units,) NumPy array (0 for LIF neurons)."""
        return np.zeros(self.units, np.float64)

    def parameters(self, dtype=None):
        """``kspike.dynamics.NeuronParameters`` of this cell (beta as a constant tensor)."""
        return dynamics.NeuronParameters(alpha=self.alpha, rho=0.0, thr=self.thr, beta=None,
                                         n_refractory=self.n_refractory,
                                         spike_function=self.spike_function)

    # ----------------------------------------------------------------- states
    def get_initial_state(self, batch_size=None):
        """Zero states (v, [b,] z, r[, i_future]), each (batch_size, units) in the state dtype
        (the future-current buffer of a delayed cell (batch_size, n_delay * units))."""
        return [tf.zeros((batch_size, size), dtype=self.state_dtype)
                for size in self.state_size]

    def pack_state(self, states):
        """List of state tensors (Keras order) -> ``dynamics.NeuronState`` (the buffer
        ``i_future`` of a delayed cell, the last state, is not part of it)."""
        states = list(states)[:4 if self._adaptive else 3]
        if self._adaptive:
            v, b, z, r = states
        else:
            (v, z, r), b = states, None
        return dynamics.NeuronState(v=v, b=b, z=z, r=r)

    def unpack_state(self, state):
        """``dynamics.NeuronState`` -> list of state tensors in Keras order."""
        if self._adaptive:
            return [state.v, state.b, state.z, state.r]
        return [state.v, state.z, state.r]

    def check_states(self, states):
        """Raise ValueError unless ``states`` is a list of (B, units) tensors, one per
        ``state_names``."""
        if len(states) != len(self.state_names):
            raise ValueError(f"{type(self).__name__} expects {len(self.state_names)} states "
                             f"{self.state_names}, each (batch, size) with sizes "
                             f"{self.state_size}; received {len(states)}.")
        for name, size, s in zip(self.state_names, self.state_size, states):
            if s.shape.rank != 2 or (s.shape[-1] is not None and s.shape[-1] != size):
                raise ValueError(f"State `{name}` of {type(self).__name__} must have shape "
                                 f"(batch, {size}), received {tuple(s.shape)}.")

    # The fused engine (kspike.engine) still calls the old private name.
    _check_states = check_states

    # ----------------------------------------------------------------- step
    def call(self, inputs, states, training=None):
        """One time step.

        Args:
            inputs: (B, n_in) input of this step.
            states: list of (B, units) tensors, see ``state_names``.

        Returns:
            (output, new_states): output (B, units) spikes, or (B, 3 units) ``[z, v, A]`` with
            ``output="all"``; new_states in the same layout as ``states``.
        """
        states = list(states) if isinstance(states, (list, tuple)) else [states]
        self.check_states(states)
        dtype = self.state_dtype
        state = self.pack_state([tf.cast(s, dtype) for s in states])
        x = tf.convert_to_tensor(inputs)
        if x.shape.rank != 2:
            raise ValueError(f"{type(self).__name__} expects step inputs of shape (batch, "
                             f"{self.input_dim}) (sequences (batch, time, {self.input_dim}) "
                             f"in an RNN layer), received shape {tuple(x.shape)}.")
        if x.shape[-1] is not None and x.shape[-1] != self.input_dim:
            raise ValueError(f"{type(self).__name__} was built for {self.input_dim} input "
                             f"features, received inputs of shape {tuple(x.shape)}.")
        compute = keras.backend.standardize_dtype(self.dtype_policy.compute_dtype)
        if self._fixed_kernels is not None:
            w_in, w_rec, bias = self._fixed_kernels
        else:
            # LSNN's future-current buffer for a delayed cell (docs/neurons.md, "Synaptic
            # delays"): the kernels are widened to (n_pre, n_delay * units).
            w_in, w_rec, bias = self.step_kernels(compute)
        current = tf.matmul(tf.cast(x, compute), w_in)
        if w_rec is not None:
            current = current + tf.matmul(tf.cast(state.z, compute), w_rec)
        current = tf.cast(current, dtype)
        if self.delayed:
            current, buffer = dynamics.delayed_current(tf.cast(states[-1], dtype), current,
                                                       self.units)
        if bias is not None:
            current = current + tf.cast(bias, dtype)
        new_state, A = dynamics.neuron_step(current, state, self.parameters(dtype))
        output = new_state.z
        if self.output_mode == "all":
            # convert_to_tensor, not cast: a Python float thr (LIF) would pass through float32.
            A = tf.broadcast_to(tf.convert_to_tensor(A, dtype=dtype), tf.shape(new_state.v))
            output = tf.concat([new_state.z, new_state.v, A], axis=-1)
        new_states = self.unpack_state(new_state)
        if self.delayed:
            new_states.append(buffer)
        return tf.cast(output, compute), new_states

    # ----------------------------------------------------------------- config
    def get_config(self):
        config = {
            "units": self.units,
            "tau": self.tau,
            "thr": self.thr,
            "dt": self.dt,
            "n_refractory": self.n_refractory,
            "dampening_factor": self.dampening_factor,
            "surrogate": surrogates.serialize(self.spike_function),
            "recurrent": self.recurrent,
            "connectivity": self.connectivity,
            "dale": self.dale,
            "output": self.output_mode,
            "seed": self.seed,
            "n_delay": self.n_delay,
            "use_bias": self.use_bias,
            "input_initializer": initializers.serialize(self.input_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "input_regularizer": regularizers.serialize(self.input_regularizer),
            "recurrent_regularizer": regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "input_constraint": constraints.serialize(self.input_constraint),
            "recurrent_constraint": constraints.serialize(self.recurrent_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }
        if self.connectivity is not None or self.dale is not None:
            for name in ("input_initializer", "recurrent_initializer", "input_constraint",
                         "recurrent_constraint"):
                config[name] = None
        base = super().get_config()
        base.pop("autocast", None)
        return {**base, **config}


@keras.saving.register_keras_serializable(package="kspike")
class LIF(SpikingCell):
    """Leaky integrate-and-fire cell with reset by subtraction (docs/neurons.md, beta=0).

    Args:
        units: number of neurons n (int >= 1).
        tau: membrane time constant in ms (> 0); alpha = exp(-dt / tau).
        thr: firing threshold (> 0), in units of the input current.
        dt: time step in ms (> 0).
        n_refractory: refractory period in time steps (int >= 0).
        dampening_factor: gamma, the peak of the pseudo-derivative (> 0).
        surrogate: a name from ``kspike.surrogates.available()`` (built with
            ``dampening=dampening_factor``) or a ``SpikeFunction`` (used as is).
        recurrent: False makes a feed-forward spiking layer (no recurrent kernel).
        connectivity: fraction p in (0, 1] of active connections; makes both kernels sparse
            and rewirable by ``kspike.DeepR``. None for dense kernels.
        dale: fraction in (0, 1) of excitatory presynaptic neurons (fixed sign per presynaptic
            neuron); None for free signs.
        output: "spikes" emits z (B, units); "all" emits concat([z, v, A]) (B, 3 units), split
            with ``kspike.split_outputs``.
        seed: integer seed of the weight initialisers (and signs/masks of sparse kernels).
        n_delay: synaptic delays as in LSNN (int >= 1): every input and recurrent synapse gets
            a fixed random delay index in {0, ..., n_delay - 1} (``input_delays``,
            ``recurrent_delays``) and its current arrives that many steps later, through a
            future-current buffer state ``i_future`` (B, n_delay * units). 1: no delays
            (docs/neurons.md, "Synaptic delays").
        use_bias: add a trainable bias to the input current.
        input_initializer, recurrent_initializer, bias_initializer: Keras initialisers
            (default N(0, 1) / sqrt(fan_in) for kernels, as in LSNN).
        input_regularizer, recurrent_regularizer, bias_regularizer: Keras regularisers.
        input_constraint, recurrent_constraint, bias_constraint: Keras constraints (the
            recurrent diagonal is always kept at 0 on top of them).

    Call arguments:
        inputs: (B, n_in) input of one time step.
        states: [v, z, r], each (B, units): voltage, last spikes, refractory counter.

    Scale and masking (docs/coming_from_other_libraries.md): the input current enters the
    voltage as (1 - alpha) I_t and a neuron spikes when (v - A) / A > 0, so ``thr`` is on a
    smaller scale than snnTorch's ``threshold``. Never put ``keras.layers.Masking(0.0)`` before
    a spiking RNN: it masks every silent step, whose state is then frozen (no leak). Pad with -1
    and use ``Masking(mask_value=-1.0)``, or pass ``mask=`` (B, T) to the RNN layer.

    Example:

    >>> import keras, kspike
    >>> layer = keras.layers.RNN(kspike.LIF(64), return_sequences=True)
    >>> spikes = layer(keras.random.uniform((8, 100, 20)))   # (8, 100, 64) of 0/1
    """

    def __init__(self, units, tau=20.0, thr=0.03, dt=1.0, n_refractory=0, dampening_factor=0.3,
                 surrogate="triangular", recurrent=True, connectivity=None, dale=None,
                 output="spikes", seed=None, n_delay=1, **kwargs):
        super().__init__(units, tau=tau, thr=thr, dt=dt, n_refractory=n_refractory,
                         dampening_factor=dampening_factor, surrogate=surrogate,
                         recurrent=recurrent, connectivity=connectivity, dale=dale,
                         output=output, seed=seed, n_delay=n_delay, **kwargs)


@keras.saving.register_keras_serializable(package="kspike")
class ALIF(SpikingCell):
    """Adaptive LIF cell of LSNN (docs/neurons.md), optionally mixed with plain LIF.

    Args:
        units: number of neurons n (int >= 1).
        n_adaptive: None makes every neuron adaptive; k makes the LAST k neurons adaptive and
            the first units - k plain LIF (beta = 0), as in LSNN.
        tau: membrane time constant in ms (> 0).
        tau_adaptation: threshold-adaptation time constant in ms (> 0); rho = exp(-dt/tau_a).
        beta: adaptation strength (>= 0) of the adaptive neurons; A_t = thr + beta * b_t.
        thr: baseline threshold (> 0).
        Other arguments as in ``kspike.LIF``.

    Call arguments:
        inputs: (B, n_in) input of one time step.
        states: [v, b, z, r], each (B, units): voltage, adaptation, last spikes, refractory
            counter.

    Scale and masking as in ``kspike.LIF`` (docs/coming_from_other_libraries.md): inputs enter
    as (1 - alpha) I_t; never ``keras.layers.Masking(0.0)`` on spike trains (silent steps would
    be masked and frozen), pad with -1 and ``Masking(mask_value=-1.0)`` or pass ``mask=``.

    Example:

    >>> import keras, kspike
    >>> cell = kspike.ALIF(100, n_adaptive=40, tau_adaptation=700.0, n_refractory=5)
    >>> model = keras.Sequential([keras.Input((784, 80)),
    ...                           keras.layers.RNN(cell, return_sequences=True),
    ...                           kspike.LeakyReadout(10)])
    """

    _adaptive = True

    def __init__(self, units, n_adaptive=None, tau=20.0, tau_adaptation=700.0, beta=1.8,
                 thr=0.01, dt=1.0, n_refractory=0, dampening_factor=0.3,
                 surrogate="triangular", recurrent=True, connectivity=None, dale=None,
                 output="spikes", seed=None, n_delay=1, **kwargs):
        super().__init__(units, tau=tau, thr=thr, dt=dt, n_refractory=n_refractory,
                         dampening_factor=dampening_factor, surrogate=surrogate,
                         recurrent=recurrent, connectivity=connectivity, dale=dale,
                         output=output, seed=seed, n_delay=n_delay, **kwargs)
        if n_adaptive is not None:
            n_adaptive = check_positive("n_adaptive", n_adaptive, integer=True, allow_zero=True)
            if n_adaptive > self.units:
                raise ValueError(f"`n_adaptive` must be between 0 and units={self.units}, "
                                 f"received {n_adaptive!r}.")
        self.n_adaptive = n_adaptive
        self.tau_adaptation = check_positive("tau_adaptation", tau_adaptation)
        self.beta = check_positive("beta", beta, allow_zero=True)
        self.rho = dynamics.decay(self.tau_adaptation, self.dt)

    @property
    def beta_vector(self):
        k = self.units if self.n_adaptive is None else self.n_adaptive
        beta = np.zeros(self.units, np.float64)
        if k:
            beta[self.units - k:] = self.beta
        return beta

    def parameters(self, dtype=None):
        dtype = dtype or self.state_dtype
        if self.n_adaptive is None:
            beta = self.beta
        else:
            beta = tf.constant(self.beta_vector, dtype=dtype)
        return dynamics.NeuronParameters(alpha=self.alpha, rho=self.rho, thr=self.thr,
                                         beta=beta, n_refractory=self.n_refractory,
                                         spike_function=self.spike_function)

    def get_config(self):
        config = super().get_config()
        config.update(n_adaptive=self.n_adaptive, tau_adaptation=self.tau_adaptation,
                      beta=self.beta)
        return config
