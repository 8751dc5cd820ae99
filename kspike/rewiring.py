"""DEEP R rewiring (Bellec et al. 2018, docs/deep_r.md): sparse, sign-fixed kernels whose
total number of active connections stays constant during training.

A rewired kernel W (n_pre, n_post) is held as three variables of its layer:

- ``magnitude`` theta >= 0 (trainable),
- ``sign`` S = +-1 (fixed; one sign per presynaptic neuron, i.e. per row, under Dale's law),
- ``mask`` 1 on active entries, 0 on dormant ones (changed only by rewiring),

and the effective weight is ``W = S * theta`` on active entries and exactly 0 elsewhere. The
gradient reaching theta is ``S * dE/dW`` on ALL entries (as in the published implementation:
dormant entries keep meaningful optimizer moments for when they are reborn).

``DeepR`` wraps any Keras 3 optimizer. After the wrapped update it performs, for every rewired
kernel of the model, the rewiring step of ``rewiring_step``::

    entries dormant before the step stay 0; on active entries:
        theta <- theta - lr * l1 + sqrt(2 lr T) * N(0, 1)
    active entries with theta <= 0 die; as many dormant entries, drawn uniformly among the dormant
    entries of ALL rewired kernels (the paper's Algorithm 1), are reborn with theta = 1e-12.

Example:

>>> import keras, kspike
>>> cell = kspike.ALIF(100, connectivity=0.12, seed=0)
>>> model = keras.Sequential([keras.Input((784, 80)),
...                           keras.layers.RNN(cell, return_sequences=True),
...                           kspike.LeakyReadout(10)])
>>> model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(1e-2), l1=1e-2, seed=0),
...               loss="mse")
>>> kspike.rewiring.active_connections(model)    # int(80*100*0.12) + int(100*100*0.12)
2160
"""
import math
import warnings
from typing import List, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from kspike import compat

__all__ = ["DeepR", "RewiredKernel", "RewiringResult", "active_connections",
           "active_connections_per_matrix", "initial_connectivity", "rewired_kernels",
           "rewiring_draws", "rewiring_step", "to_dense"]

#: Magnitude given to a reborn connection: tiny but positive, so it counts as active.
REBIRTH_MAGNITUDE = 1e-12

# Attribute set on a magnitude variable so that DeepR finds the kernel it belongs to.
_KERNEL_ATTRIBUTE = "_kspike_rewired_kernel"


def _check_fraction(name, value, low_open, high_closed):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, received {value!r} of type "
                        f"{type(value).__name__}.")
    value = float(value)
    upper_ok = value <= 1.0 if high_closed else value < 1.0
    if not (math.isfinite(value) and value > 0.0 and upper_ok):
        bound = "(0, 1]" if high_closed else "(0, 1)"
        raise ValueError(f"`{name}` must be in {bound}, received {value!r}.")
    return value


def _check_non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number >= 0, received {value!r} of type "
                        f"{type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"`{name}` must be a finite number >= 0, received {value!r}.")
    return value


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"`seed` must be an integer >= 0 or None, received {seed!r}.")
    return int(seed)


# --------------------------------------------------------------------------- functional core
def initial_connectivity(shape, connectivity=None, dale=None, zero_diagonal=False, seed=None):
    """Initial magnitudes, signs and mask of a rewired kernel (docs/deep_r.md).

    ``int(n_pre * n_post * connectivity)`` entries are active, drawn uniformly without replacement
    (never on the diagonal when ``zero_diagonal``); active magnitudes are
    ``abs(N(0, 1)) / sqrt(n_pre)``, dormant ones 0. Signs are +-1 with probability 1/2 per entry,
    or with ``dale`` one sign per presynaptic neuron (row): ``round(dale * n_pre)`` randomly chosen
    rows are excitatory (+1), the others inhibitory (-1).

    Args:
        shape: (n_pre, n_post) of the kernel.
        connectivity: fraction in (0, 1] of active entries; None makes every allowed entry active.
        dale: fraction in (0, 1) of excitatory presynaptic neurons; None for free signs.
        zero_diagonal: the diagonal is never active (square recurrent kernels).
        seed: integer seed; None draws one from NumPy's global generator.

    Returns:
        (magnitude, sign, mask): float64 NumPy arrays of ``shape``.
    """
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                       for s in shape)):
        raise ValueError(f"`shape` must be (n_pre, n_post) with positive integers, received "
                         f"{shape!r}.")
    n_pre, n_post = int(shape[0]), int(shape[1])
    if connectivity is not None:
        connectivity = _check_fraction("connectivity", connectivity, True, True)
    if dale is not None:
        dale = _check_fraction("dale", dale, True, False)
    if zero_diagonal and n_pre != n_post:
        raise ValueError(f"`zero_diagonal` needs a square kernel, received shape {tuple(shape)}.")
    seed = _check_seed(seed)
    if seed is None:
        seed = int(np.random.randint(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)

    if dale is None:
        sign = np.where(rng.random((n_pre, n_post)) < 0.5, -1.0, 1.0)
    else:
        n_excitatory = int(math.floor(dale * n_pre + 0.5))
        row_sign = -np.ones(n_pre)
        row_sign[rng.permutation(n_pre)[:n_excitatory]] = 1.0
        sign = np.repeat(row_sign[:, None], n_post, axis=1)

    allowed = np.ones((n_pre, n_post), bool)
    if zero_diagonal:
        np.fill_diagonal(allowed, False)
    candidates = np.flatnonzero(allowed)
    if connectivity is None:
        n_active = candidates.size
    else:
        # The epsilon absorbs float error in n_pre * n_post * p (e.g. 100 * 100 * 0.07).
        n_active = min(int(math.floor(n_pre * n_post * connectivity + 1e-9)), candidates.size)
        if n_active == 0:
            raise ValueError(f"`connectivity`={connectivity!r} leaves no active connection in a "
                             f"kernel of shape {(n_pre, n_post)}; use a larger connectivity.")
    mask = np.zeros(n_pre * n_post)
    mask[rng.choice(candidates, size=n_active, replace=False)] = 1.0
    mask = mask.reshape(n_pre, n_post)
    magnitude = np.abs(rng.standard_normal((n_pre, n_post))) / math.sqrt(n_pre) * mask
    return magnitude, sign, mask


def rewiring_draws(seed, shapes, dtype=tf.float32, noise=True, keys=True):
    """The random numbers of one rewiring step, drawn statelessly from ``seed``.

    The same seed gives the same numbers on every device and replica, so distributed replicas
    rewire identically; each part is drawn from its own sub-seed, so asking only for the keys
    gives the same keys.

    Args:
        seed: int tensor or sequence of shape (2,), e.g. (DeepR seed, iteration).
        shapes: list of kernel shapes.
        dtype: dtype of the normal noise.
        noise, keys: which parts to draw (the other is returned as None).

    Returns:
        (noise, keys): a list of N(0, 1) tensors, one per shape, and a (sum of sizes,) float32
        tensor of uniform [0, 1) keys that order the dormant entries for rebirth.
    """
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=len(shapes) + 1)
    normal = None
    if noise:
        normal = [tf.random.stateless_normal(shape, seed=seeds[i], dtype=dtype)
                  for i, shape in enumerate(shapes)]
    uniform = None
    if keys:
        total = int(sum(int(np.prod(s)) for s in shapes))
        uniform = tf.random.stateless_uniform((total,), seed=seeds[len(shapes)],
                                              dtype=tf.float32)
    return normal, uniform


class RewiringResult(NamedTuple):
    """Output of ``rewiring_step``.

    Attributes:
        magnitudes: list of new magnitude tensors (0 on dormant entries).
        masks: list of new 0/1 masks, same dtype as the magnitudes.
        rewired: int32 scalar, the number of connections that died (= number reborn).
    """
    magnitudes: List[tf.Tensor]
    masks: List[tf.Tensor]
    rewired: tf.Tensor


def rewiring_step(magnitudes, masks, learning_rate, l1=0.0, temperature=0.0, allowed=None,
                  seed=None, noise=None, keys=None):
    """One DEEP R rewiring step over a group of kernels (after the optimizer update).

    On entries active before the step: ``theta - lr * l1 + sqrt(2 lr T) * noise``; entries
    dormant before the step become 0. Active entries with theta <= 0 die; the same number of
    dormant, allowed entries (over all kernels together) are reborn with theta = 1e-12: those
    with the smallest ``keys`` (uniform keys make a uniform draw without replacement).

    Args:
        magnitudes: list of theta tensors (after the optimizer update), any shapes.
        masks: list of 0/1 tensors of the same shapes (active before the step).
        learning_rate: scalar, the optimizer's learning rate of this step.
        l1: L1 strength (>= 0).
        temperature: T (>= 0) of the exploration noise.
        allowed: optional list (bool arrays or None) of entries that may ever be active
            (False on the diagonal of recurrent kernels); None allows all.
        seed: (2,) int seed of ``rewiring_draws`` (needed unless ``noise`` and ``keys`` given).
        noise: optional list of N(0, 1) tensors (used only when temperature > 0).
        keys: optional (total size,) tensor of rebirth keys.

    Returns:
        ``RewiringResult``.
    """
    l1 = _check_non_negative("l1", l1)
    temperature = _check_non_negative("temperature", temperature)
    magnitudes, masks, allowed = _check_rewiring_group(magnitudes, masks, allowed)
    dtype = magnitudes[0].dtype
    shapes = [tuple(m.shape) for m in magnitudes]
    if ((noise is None and temperature > 0) or keys is None) and seed is None:
        raise ValueError("rewiring_step needs `seed` unless `noise` and `keys` are given.")
    if noise is None and temperature > 0:
        noise, _ = rewiring_draws(seed, shapes, dtype, keys=False)
    learning_rate = tf.cast(learning_rate, dtype)

    new_magnitudes, alive, died = _prune(magnitudes, masks, learning_rate, l1, temperature, noise)
    sizes = [int(np.prod(s)) for s in shapes]
    candidates = _rebirth_candidates(alive, allowed)

    def reborn():
        if keys is None:
            _, uniform = rewiring_draws(seed, shapes, dtype, noise=False)
        else:
            uniform = tf.reshape(tf.cast(keys, tf.float32), (-1,))
        # Non-candidates sort last; a stable sort breaks ties between equal keys by position.
        ordered = tf.where(candidates, uniform, tf.fill(tf.shape(uniform), np.float32(np.inf)))
        rank = tf.math.invert_permutation(tf.argsort(ordered, stable=True))
        return tf.logical_and(rank < died, candidates)

    born = tf.cond(died > 0, reborn, lambda: tf.zeros_like(candidates))
    born = tf.split(born, sizes)
    out_magnitudes, out_masks = [], []
    for theta, still, new, shape in zip(new_magnitudes, alive, born, shapes):
        new = tf.reshape(new, shape)
        out_magnitudes.append(tf.where(new, tf.constant(REBIRTH_MAGNITUDE, dtype), theta))
        out_masks.append(tf.cast(tf.logical_or(still, new), dtype))
    return RewiringResult(out_magnitudes, out_masks, died)


def _check_rewiring_group(magnitudes, masks, allowed):
    """``rewiring_step``'s checks of its kernel group; returns (magnitudes, masks, allowed).

    The magnitudes become tensors, the masks tensors of their dtype, and ``allowed=None`` a
    list of None (every entry allowed).
    """
    magnitudes = [tf.convert_to_tensor(m) for m in magnitudes]
    if not magnitudes:
        raise ValueError("`magnitudes` must hold at least one kernel, received an empty list.")
    dtype = magnitudes[0].dtype
    masks = [tf.cast(m, dtype) for m in masks]
    if allowed is None:
        allowed = [None] * len(magnitudes)
    if len(masks) != len(magnitudes) or len(allowed) != len(magnitudes):
        raise ValueError(f"`magnitudes`, `masks` and `allowed` must have the same length, "
                         f"received {len(magnitudes)}, {len(masks)} and {len(allowed)}.")
    for theta, mask in zip(magnitudes, masks):
        if theta.shape != mask.shape:
            raise ValueError(f"Each mask must have the shape of its magnitude, received "
                             f"{tuple(mask.shape)} for {tuple(theta.shape)}.")
    return magnitudes, masks, allowed


def _prune(magnitudes, masks, learning_rate, l1, temperature, noise):
    """The L1 shrinkage, noise and pruning half of ``rewiring_step``.

    Returns:
        (new_magnitudes, alive, died): the magnitudes with dead and dormant entries at 0, the
        bool masks of entries still active, and the int32 number of entries that died.
    """
    dtype = learning_rate.dtype
    new_magnitudes, alive = [], []
    n_before = tf.constant(0, tf.int32)
    n_after = tf.constant(0, tf.int32)
    for i, (theta, mask) in enumerate(zip(magnitudes, masks)):
        was_active = mask > 0
        if l1 > 0:
            theta = theta - learning_rate * tf.cast(l1, dtype)
        if temperature > 0:
            scale = tf.sqrt(2.0 * learning_rate * tf.cast(temperature, dtype))
            theta = theta + scale * tf.cast(noise[i], dtype)
        still = tf.logical_and(was_active, theta > 0)
        new_magnitudes.append(tf.where(still, theta, tf.zeros_like(theta)))
        alive.append(still)
        n_before += tf.reduce_sum(tf.cast(was_active, tf.int32))
        n_after += tf.reduce_sum(tf.cast(still, tf.int32))
    return new_magnitudes, alive, n_before - n_after


def _rebirth_candidates(alive, allowed):
    """(total size,) bool: the entries, over all kernels flattened, that may be reborn."""
    candidates = []
    for still, allow in zip(alive, allowed):
        free = tf.logical_not(tf.reshape(still, (-1,)))
        if allow is not None:
            free = tf.logical_and(free, tf.reshape(tf.constant(np.asarray(allow, bool)), (-1,)))
        candidates.append(free)
    return tf.concat(candidates, axis=0)


# --------------------------------------------------------------------------- Keras shell
class RewiredKernel:
    """A sparse, sign-fixed kernel of a Keras layer, rewirable by ``kspike.DeepR``.

    Creates three variables on ``layer`` with ``add_weight`` (so Keras tracks, saves and
    distributes them): ``{name}_magnitude`` (trainable theta >= 0), ``{name}_sign`` and
    ``{name}_mask`` (non-trainable). See ``initial_connectivity`` for the initial values.

    Args:
        layer: the Keras layer owning the variables (called from its ``build``).
        name: base name of the variables, e.g. "input_kernel".
        shape: (n_pre, n_post).
        connectivity: fraction in (0, 1] of active entries; None for all entries.
        dale: fraction in (0, 1) of excitatory presynaptic neurons (rows); None for free signs.
        zero_diagonal: never activate the diagonal (recurrent kernels).
        seed: integer seed of signs, mask and initial magnitudes.
        regularizer: optional Keras regulariser of the magnitudes (equal to regularising the
            effective weight for L1/L2, since |W| = theta on active entries).
    """

    def __init__(self, layer, name, shape, connectivity=None, dale=None, zero_diagonal=False,
                 seed=None, regularizer=None):
        magnitude, sign, mask = initial_connectivity(shape, connectivity, dale, zero_diagonal,
                                                     seed)
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        self.connectivity = connectivity
        self.dale = dale
        self.zero_diagonal = bool(zero_diagonal)

        def constant(value):
            def initializer(shape, dtype=None):
                return tf.constant(value, dtype=dtype)
            return initializer

        # Set by DeepR.build; until then an optimizer update of the magnitudes warns once.
        self.rewired_by_deepr = False
        self._warned_without_deepr = False
        self.magnitude = layer.add_weight(name=f"{name}_magnitude", shape=self.shape,
                                          initializer=constant(magnitude),
                                          regularizer=regularizer, trainable=True,
                                          constraint=_DeepRWatch(self))
        self.sign = layer.add_weight(name=f"{name}_sign", shape=self.shape,
                                     initializer=constant(sign), trainable=False,
                                     aggregation="only_first_replica")
        self.mask = layer.add_weight(name=f"{name}_mask", shape=self.shape,
                                     initializer=constant(mask), trainable=False,
                                     aggregation="only_first_replica")
        setattr(self.magnitude, _KERNEL_ATTRIBUTE, self)
        # TensorFlow tracks a Keras layer's variables through its attributes: without these,
        # tf.train.Checkpoint and SavedModel export would not see the sign and mask.
        for part in ("magnitude", "sign", "mask"):
            setattr(layer, f"_{name}_{part}", getattr(self, part))

    @property
    def path(self):
        """Unique name of this kernel in its model, e.g. "rnn/alif/input_kernel"."""
        path = getattr(self.magnitude, "path", None) or self.magnitude.name
        return path[:-len("_magnitude")] if path.endswith("_magnitude") else path

    @property
    def allowed(self):
        """(n_pre, n_post) bool NumPy array of entries that may ever be active."""
        allowed = np.ones(self.shape, bool)
        if self.zero_diagonal:
            np.fill_diagonal(allowed, False)
        return allowed

    def effective(self):
        """Effective weight (n_pre, n_post): sign * theta on active entries, exactly 0 elsewhere.

        The forward value is exact; the gradient reaching theta is sign * dE/dW on every entry
        (straight through the mask), as in the published DEEP R implementation.
        """
        theta = tf.convert_to_tensor(self.magnitude)
        active = tf.cast(self.mask, theta.dtype) * tf.nn.relu(theta)
        # theta + (active - theta) is exactly `active` in floating point (x + (0 - x) == 0).
        return tf.cast(self.sign, theta.dtype) * (theta + tf.stop_gradient(active - theta))

    def active_count(self):
        """Number of active entries (int64 scalar tensor): mask 1 AND theta > 0, i.e. the
        entries whose effective weight is not forced to 0. Under DeepR these are exactly the
        entries of the mask; a plain optimizer can push theta below 0 on entries the mask still
        holds, and those carry no weight."""
        live = tf.logical_and(tf.convert_to_tensor(self.mask) > 0,
                              tf.convert_to_tensor(self.magnitude) > 0)
        return tf.reduce_sum(tf.cast(live, tf.int64))

    def __repr__(self):
        return (f"RewiredKernel({self.path!r}, shape={self.shape}, "
                f"connectivity={self.connectivity}, dale={self.dale})")


class _DeepRWatch(keras.constraints.Constraint):
    """Identity constraint of a magnitude variable. Keras optimizers apply a variable's
    constraint after every update, so this is the one place that sees a rewired kernel trained
    by an optimizer that is not DeepR, whatever runs the training (model.fit, Trainer, a custom
    loop). It warns once per kernel, at trace time: no cost in the compiled step beyond the
    identity assignment."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, w):
        kernel = self.kernel
        if not kernel.rewired_by_deepr and not kernel._warned_without_deepr:
            kernel._warned_without_deepr = True
            warnings.warn(
                f"The rewired kernel {kernel.path!r} (connectivity={kernel.connectivity}, "
                f"dale={kernel.dale}) is being updated by an optimizer that is not wrapped in "
                "kspike.DeepR: magnitudes that cross 0 silence their connection for good (the "
                "effective weight is sign * max(theta, 0) and nothing rewires it), so the number "
                "of active connections only falls. Train rewired models with "
                "optimizer=kspike.DeepR(keras.optimizers.Adam(...)) (docs/deep_r.md).",
                UserWarning, stacklevel=2)
        return w

    def get_config(self):
        return {}


def _variables_of(obj):
    if isinstance(obj, RewiredKernel):
        return [obj.magnitude]
    if isinstance(obj, (list, tuple)):
        out = []
        for item in obj:
            out.extend(_variables_of(item))
        return out
    if isinstance(obj, keras.layers.Layer):
        if not obj.built:
            raise ValueError(f"{type(obj).__name__} {obj.name!r} is not built yet, so it has no "
                             "connections to count: call it on data (or build it) first.")
        return list(obj.weights)
    if isinstance(obj, keras.Variable) or isinstance(obj, tf.Variable):
        return [obj]
    raise TypeError("Expected a Keras model or layer, a list of them, or a list of variables; "
                    f"received {obj!r} of type {type(obj).__name__}.")


def rewired_kernels(obj):
    """The ``RewiredKernel`` objects of a model, layer, or list of layers/variables (in weight
    order, without duplicates)."""
    seen, kernels = set(), []
    for variable in _variables_of(obj):
        kernel = getattr(variable, _KERNEL_ATTRIBUTE, None)
        if kernel is not None and id(kernel) not in seen:
            seen.add(id(kernel))
            kernels.append(kernel)
    return kernels


def _as_count(value):
    return int(value.numpy()) if tf.executing_eagerly() else value


def active_connections(model):
    """Total number of active connections of all rewired kernels of ``model``.

    Args:
        model: a built Keras model or layer (or a list of them).

    Returns:
        A Python int when executing eagerly; an int64 scalar tensor inside ``tf.function``.
        0 when the model has no rewired kernel.
    """
    total = tf.constant(0, tf.int64)
    for kernel in rewired_kernels(model):
        total += kernel.active_count()
    return _as_count(total)


def active_connections_per_matrix(model):
    """Active connections per rewired kernel: dict path -> count (int eagerly, tensor in graphs),
    e.g. ``{"rnn/alif/input_kernel": 2457, "rnn/alif/recurrent_kernel": 7864}``."""
    return {kernel.path: _as_count(kernel.active_count()) for kernel in rewired_kernels(model)}


# --------------------------------------------------------------------------- optimizer wrapper
@keras.saving.register_keras_serializable(package="kspike")
class DeepR(keras.optimizers.Optimizer):
    """DEEP R: wraps a Keras optimizer and rewires every sparse kernel after each update.

    The wrapped optimizer updates all variables as usual (rewired kernels through their
    magnitudes theta); then ``rewiring_step`` runs on the rewired kernels that received a
    gradient, with the wrapped optimizer's learning rate of that step (schedules included): L1
    shrinkage and exploration noise on active entries, death of entries with theta <= 0 and
    rebirth of as many dormant entries, drawn uniformly among the dormant entries of all rewired
    kernels together, so the TOTAL number of active connections never changes.

    The random draws are stateless, seeded from (seed, iteration): replicas of a distribution
    strategy draw the same numbers, and a restored model continues the same sequence. Under
    mixed precision Keras wraps DeepR in its ``LossScaleOptimizer``, so a step skipped for
    non-finite gradients skips the rewiring too. Gradient accumulation of the wrapped optimizer
    is refused (rewiring follows every applied update).

    Args:
        optimizer: the Keras optimizer to wrap (instance or identifier such as "adam"), e.g.
            SGD, Adam, AdamW, with or without a learning-rate schedule.
        l1: L1 strength alpha (>= 0) of the shrinkage ``lr * l1`` per step.
        temperature: T (>= 0) of the noise ``sqrt(2 lr T) N(0, 1)``; 0 for none (sMNIST setting).
        seed: integer seed of the rewiring draws; None draws one from NumPy's global generator.
        name: optimizer name.

    Differences from LSNN-official (its code, not its paper): there, the number of new
    connections is split across kernels in proportion to their initial budgets and the noise is
    applied only to entries still positive after the optimizer update; here rebirths are uniform
    over all dormant entries and the noise applies to all entries active before the step.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((10, 5)),
    ...     keras.layers.RNN(kspike.ALIF(20, connectivity=0.2, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> opt = kspike.DeepR(keras.optimizers.Adam(1e-2), l1=1e-2, temperature=0.0, seed=0)
    >>> model.compile(optimizer=opt, loss="mse")
    >>> kspike.rewiring.active_connections(model)    # int(5*20*0.2) + int(20*20*0.2)
    100
    >>> x = (np.random.default_rng(0).random((4, 10, 5)) < 0.3).astype("float32")
    >>> history = model.fit(x, np.ones((4, 10, 2)), epochs=2, verbose=0)
    >>> kspike.rewiring.active_connections(model)    # constant under rewiring
    100
    """

    def __init__(self, optimizer="adam", l1=1e-2, temperature=0.0, seed=None, name=None,
                 **kwargs):
        if kwargs:
            raise ValueError(f"DeepR does not accept the arguments {sorted(kwargs)}; set them on "
                             "the wrapped `optimizer` instead.")
        if isinstance(optimizer, DeepR):
            raise TypeError("`optimizer` is already a DeepR optimizer; wrap the inner optimizer "
                            "only once.")
        if isinstance(optimizer, (str, dict)):
            try:
                optimizer = keras.optimizers.get(optimizer)
            except ValueError as error:
                raise ValueError(f"`optimizer` {optimizer!r} is not a known Keras optimizer: "
                                 f"{error}") from None
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError("`optimizer` must be a Keras 3 optimizer (e.g. "
                            f"keras.optimizers.Adam(1e-3)), received {optimizer!r} of type "
                            f"{type(optimizer).__name__}.")
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError("DeepR cannot wrap an optimizer with `gradient_accumulation_steps` "
                             f"(received {optimizer.gradient_accumulation_steps}): rewiring "
                             "follows every applied update.")
        l1 = _check_non_negative("l1", l1)
        temperature = _check_non_negative("temperature", temperature)
        seed = _check_seed(seed)
        if seed is None:
            seed = int(np.random.randint(0, 2 ** 31 - 1))
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self._warned_no_kernels = False
        self.l1 = l1
        self.temperature = temperature
        self.seed = seed

    # ----------------------------------------------------------------- delegation
    def build(self, var_list):
        if self.built:
            return
        kernels = rewired_kernels(list(var_list))
        for kernel in kernels:
            kernel.rewired_by_deepr = True
        self._rewired_connections = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", aggregation="only_first_replica",
            name="rewired_connections")
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def rewired_connections(self):
        """Total number of connections that died (and as many were reborn) since the start,
        an int64 variable (0 before the first step)."""
        if not self.built:
            return tf.constant(0, tf.int64)
        return self._rewired_connections

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("DeepR supports the TensorFlow backend only (stateful apply).")

    def apply_gradients(self, grads_and_vars):
        grads, variables = zip(*grads_and_vars)
        self.apply(grads, variables)
        return self.iterations

    # ----------------------------------------------------------------- the step
    def apply(self, grads, trainable_variables=None):
        """Apply the wrapped optimizer, then rewire (see the class docstring)."""
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError("When passing `grads` without `trainable_variables`, DeepR must "
                                 "already be built: call `optimizer.build(variables)` first.")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(f"DeepR.apply received {len(grads)} gradients for "
                             f"{len(trainable_variables)} variables; they must match one to one.")
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        kernels = rewired_kernels([v for g, v in zip(grads, trainable_variables)
                                   if g is not None])
        if not kernels:
            if not self._warned_no_kernels and not rewired_kernels(trainable_variables):
                # At the first update, not in build: Keras also builds the optimizer of a
                # compiled model that is only saved (e.g. the dense copy of to_dense).
                self._warned_no_kernels = True
                warnings.warn(
                    f"DeepR is training {len(trainable_variables)} variables without any "
                    f"rewired kernel, so it only applies the wrapped "
                    f"{type(self.inner_optimizer).__name__}: nothing is sparse and nothing is "
                    "rewired. Rewired kernels come from cells created with connectivity=... "
                    "(or dale=...), e.g. kspike.ALIF(100, connectivity=0.1).",
                    UserWarning, stacklevel=2)
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        # Read before the wrapped update increments the iteration (and moves a schedule).
        learning_rate = tf.identity(tf.cast(self.inner_optimizer.learning_rate, tf.float32))
        iteration = tf.identity(tf.cast(self.inner_optimizer.iterations, tf.int64))
        self.inner_optimizer.apply(grads, trainable_variables)

        def rewire(distribution, learning_rate, iteration):
            # Cross-replica context: computed once, then written to every replica's copy.
            learning_rate = distribution.experimental_local_results(learning_rate)[0]
            iteration = distribution.experimental_local_results(iteration)[0]
            magnitudes = [tf.convert_to_tensor(k.magnitude.value) for k in kernels]
            masks = [tf.convert_to_tensor(k.mask.value) for k in kernels]
            seed = tf.stack([tf.constant(self.seed, tf.int64), iteration])
            result = rewiring_step(magnitudes, masks, learning_rate, l1=self.l1,
                                   temperature=self.temperature,
                                   allowed=[k.allowed if k.zero_diagonal else None
                                            for k in kernels], seed=seed)

            def assign(variable, value):
                return variable.assign(tf.cast(value, variable.dtype))

            for kernel, theta, mask in zip(kernels, result.magnitudes, result.masks):
                distribution.extended.update(kernel.magnitude.value, assign, args=(theta,),
                                             group=False)
                distribution.extended.update(kernel.mask.value, assign, args=(mask,),
                                             group=False)
            counter = self._rewired_connections.value
            distribution.extended.update(
                counter, assign,
                args=(tf.convert_to_tensor(counter) + tf.cast(result.rewired, tf.int64),),
                group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            rewire, tf.distribute.get_strategy(), learning_rate, iteration)

    # ----------------------------------------------------------------- config
    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "l1": self.l1,
            "temperature": self.temperature,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                          custom_objects=custom_objects)
        return cls(optimizer, **config)


# --------------------------------------------------------------------------- dense export
def _dense_config(config):
    if isinstance(config, dict):
        out = {key: _dense_config(value) for key, value in config.items()}
        inner = out.get("config")
        if (isinstance(inner, dict) and str(out.get("module", "")).startswith("kspike")
                and "connectivity" in inner and "dale" in inner):
            inner["connectivity"] = None
            inner["dale"] = None
        return out
    if isinstance(config, list):
        return [_dense_config(value) for value in config]
    return config


def to_dense(model):
    """A copy of ``model`` whose rewired kernels are ordinary dense kernels holding the effective
    weights (0 on dormant entries): same outputs, no rewiring, for inference and export.

    Args:
        model: a built Keras model (Sequential or functional) or layer with a ``get_config``.

    Returns:
        A new, built model of the same architecture with ``connectivity=None, dale=None`` in
        every kspike cell, e.g. to ``save("dense.keras")``.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer, received {model!r}.")
    if not model.built:
        raise ValueError(f"`model` {model.name!r} must be built (call it once) before to_dense.")
    try:
        serialized = keras.saving.serialize_keras_object(model)
    except NotImplementedError as error:
        raise TypeError(f"`model` {model.name!r} cannot be serialised (subclassed models need "
                        f"`get_config`): {error}") from None
    dense = keras.saving.deserialize_keras_object(_dense_config(serialized))
    if not dense.built:
        raise ValueError(f"The copy of `model` {model.name!r} could not be built from its "
                         "config; build the model with an Input before calling to_dense.")
    sources = compat.nested_layers(model, include_self=True)
    targets = compat.nested_layers(dense, include_self=True)
    if len(sources) != len(targets):
        raise ValueError(f"The dense copy of {model.name!r} does not have the same layers.")
    for source, target in zip(sources, targets):
        own = sum(compat.own_variables(source), [])
        kernels = rewired_kernels(own)
        if not kernels:
            store = {}
            source.save_own_variables(store)
            target.load_own_variables(store)
            continue
        values = {}
        for kernel in kernels:
            values[kernel.name] = kernel.effective()
        rewired_parts = set()
        for kernel in kernels:
            rewired_parts.update({id(kernel.magnitude), id(kernel.sign), id(kernel.mask)})
        by_name = {v.name: v for v in own if id(v) not in rewired_parts}
        for variable in sum(compat.own_variables(target), []):
            if variable.name in values:
                variable.assign(tf.cast(values[variable.name], variable.dtype))
            elif variable.name in by_name:
                variable.assign(by_name[variable.name])
            else:
                raise ValueError(f"No value for variable {variable.name!r} of layer "
                                 f"{target.name!r} in the dense copy.")
    return dense
