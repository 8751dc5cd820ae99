"""Spike functions with surrogate pseudo-derivatives (docs/surrogates.md).

A spike function maps the normalised distance to threshold ``x = (v - A) / A`` to a spike:
forward ``H(x) = 1[x > 0]`` (strictly greater, exactly 0/1 in the compute dtype); backward the
pseudo-derivative ``psi(x)``. Every ``psi`` here has peak ``dampening`` (gamma) at ``x = 0`` and
area ``dampening / sharpness`` (gamma / s).

The backward pass is written as a forward-exact stop-gradient expression rather than with
``tf.custom_gradient``::

    z = H(x) + (x * stop_gradient(psi(x)) - stop_gradient(x * psi(x)))

The bracket is exactly zero in the forward pass (the same product minus itself), so ``z`` is
exactly ``H(x)``; its derivative with respect to ``x`` is exactly ``psi(x)``. Unlike
``tf.custom_gradient``, this survives ``tf.saved_model`` export: gradients can be taken
through a reloaded SavedModel.

Example:

>>> import keras, kspike
>>> f = kspike.surrogates.get("ntail", dampening=0.3, sharpness=1.0, tail=1.56)
>>> x = keras.ops.convert_to_tensor([-1.0, 0.0, 0.5])
>>> keras.ops.convert_to_numpy(f(x))                         # spikes: 1 where x > 0
array([0., 0., 1.], dtype=float32)
>>> keras.ops.convert_to_numpy(f.pseudo_derivative(x)).round(4)   # dz/dx, peak gamma at 0
array([0.028 , 0.3   , 0.0607], dtype=float32)
>>> kspike.surrogates.get(f.get_config()["name"], **f.get_config()) == f   # round trip
True

Your own spike function: subclass ``SpikeFunction`` and register it under a name, so cells
using it save to ``.keras`` files and load again (the file stores the name and parameters;
the module defining the class must be imported before ``keras.models.load_model``)::

    @kspike.surrogates.register("my_spike", aliases=("mine",))
    class MySpike(kspike.surrogates.SpikeFunction):
        def pseudo_derivative(self, x):
            return self.dampening * keras.ops.exp(-abs(self.sharpness * x))

    cell = kspike.ALIF(100, surrogate="my_spike")     # or surrogate=MySpike(0.3, 2.0)
"""
import inspect
import math
import re
import warnings

import keras
from keras import ops

__all__ = ["SpikeFunction", "available", "aliases", "get", "register", "is_registered",
           "serialize", "heaviside", "Rectangular", "Triangular",
           "Exponential", "Gaussian", "Sigmoid", "FastSigmoid", "NTail", "Cauchy",
           "MultiGaussian"]

_REGISTRY = {}


def heaviside(x, inclusive=False):
    """Forward spike: ``1[x > 0]`` (``1[x >= 0]`` if ``inclusive``, the test of SpikingJelly's
    nodes) in the dtype of ``x`` (no gradient)."""
    compare = ops.greater_equal if inclusive else ops.greater
    return ops.cast(compare(x, 0), x.dtype)


def _check_positive_finite(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, received {value!r} "
                        f"of type {type(value).__name__}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, received {value!r}.")
    return value


_BUILT_IN = set()


def _register(cls):
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _REGISTRY[alias] = cls
    _BUILT_IN.add(cls)
    return keras.saving.register_keras_serializable(package="kspike")(cls)


def _check_name(what, value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"`{what}` must be a non-empty identifier string (letters, digits, "
                         f"underscores), received {value!r}.")
    return value.lower()


def register(name=None, *, aliases=()):
    """Register a ``SpikeFunction`` subclass under ``name`` (and ``aliases``), so that
    ``get(name)``, ``surrogate="name"`` in the cells and ``.keras`` saving/loading work for it.

    Use as a class decorator, ``@kspike.surrogates.register("my_spike")``, or call it on a
    class that sets its own ``name`` (and ``aliases``) attributes:
    ``kspike.surrogates.register(MySpike)``. The name is stored lowercase in the class's
    ``name`` attribute, which ``get_config()`` writes to saved models. Registering a new class
    under a name it already holds (re-running a notebook cell) replaces the old class;
    the catalogue's names cannot be taken.

    Args:
        name: the identifier (str) or, for the direct form, the class itself.
        aliases: further names (tuple of str) accepted by ``get``.

    Returns:
        The class (for the direct form) or a decorator returning it.

    Raises:
        TypeError: ``name`` or the decorated object is not a ``SpikeFunction`` subclass.
        ValueError: bad name, or a name already used by another spike function.
    """
    if isinstance(name, type):
        return _register_class(name, name.name, name.aliases)
    _check_name("name", name)

    def decorator(cls):
        return _register_class(cls, name, aliases)

    return decorator


def _register_class(cls, name, names):
    if not (isinstance(cls, type) and issubclass(cls, SpikeFunction)):
        raise TypeError("kspike.surrogates.register expects a subclass of "
                        f"kspike.surrogates.SpikeFunction, received {cls!r}.")
    if name is None:
        raise ValueError(f"{cls.__name__} has no `name`: register it with "
                         f"@kspike.surrogates.register('some_name') or set the class attribute "
                         "`name` first.")
    name = _check_name("name", name)
    if isinstance(names, str):
        names = (names,)
    names = tuple(_check_name("aliases", a) for a in names)
    for key in (name,) + names:
        holder = _REGISTRY.get(key)
        if holder is not None and holder is not cls and (
                holder in _BUILT_IN or holder.__qualname__ != cls.__qualname__):
            raise ValueError(f"Surrogate name {key!r} is already registered to "
                             f"{holder.__module__}.{holder.__qualname__}; choose another name. "
                             f"Taken: {available()} (aliases {aliases()}).")
    cls.name = name
    cls.aliases = names
    for key in (name,) + names:
        _REGISTRY[key] = cls
    return cls


def is_registered(spike_function):
    """True when ``get(spike_function.name)`` rebuilds an object of the same class, i.e. when a
    model using it can be saved and loaded again (``spike_function``: object or class)."""
    cls = spike_function if isinstance(spike_function, type) else type(spike_function)
    name = getattr(cls, "name", None)
    return isinstance(name, str) and _REGISTRY.get(name.lower()) is cls


def serialize(spike_function):
    """The config dict (``get_config()``) stored for ``spike_function`` in saved models;
    ``get(config)`` rebuilds it. Warns when its class is not registered, because the saved
    model would not load."""
    if not is_registered(spike_function):
        warnings.warn(
            f"The spike function {type(spike_function).__qualname__} is not registered, so a "
            "model saved with it will not load (`surrogate` would have no known name). "
            "Decorate its class with @kspike.surrogates.register('some_name').", stacklevel=3)
    return spike_function.get_config()


class SpikeFunction:
    """Base class: Heaviside forward pass, pseudo-derivative ``psi`` backward.

    Args:
        dampening: gamma, the peak of ``psi`` at ``x = 0`` (LSNN's dampening factor).
        sharpness: s; the support/width of ``psi`` scales as ``1 / s`` and its area is gamma / s.

    Subclasses implement ``pseudo_derivative(x)`` (a tensor function of ``x``); extra
    constructor parameters also go into ``get_config``. Register a subclass with
    ``@kspike.surrogates.register("name")`` so that models using it save and load.
    """

    name = None
    aliases = ()

    def __init__(self, dampening=0.3, sharpness=1.0):
        self.dampening = _check_positive_finite("dampening", dampening)
        self.sharpness = _check_positive_finite("sharpness", sharpness)

    def pseudo_derivative(self, x):
        """psi(x): the surrogate of dH/dx, same shape and dtype as ``x``."""
        raise NotImplementedError

    def __call__(self, x, inclusive=False):
        """Spikes ``H(x)`` whose gradient with respect to ``x`` is ``psi(x)``; ``inclusive``
        fires at ``x == 0`` too (``1[x >= 0]``, the IF/LIF node layers' test)."""
        x = ops.convert_to_tensor(x)
        psi = self.pseudo_derivative(x)
        surrogate = x * ops.stop_gradient(psi) - ops.stop_gradient(x * psi)
        return ops.stop_gradient(heaviside(x, inclusive)) + surrogate

    def get_config(self):
        return {"name": self.name, "dampening": self.dampening, "sharpness": self.sharpness}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("name", None)
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"kspike.surrogates.get({self.name!r}, {args})"


@_register
class Rectangular(SpikeFunction):
    """psi(x) = gamma * 1[|2 s x| < 1]."""
    name = "rectangular"

    def pseudo_derivative(self, x):
        inside = ops.less(ops.abs(2.0 * self.sharpness * x), 1.0)
        return self.dampening * ops.cast(inside, x.dtype)


@_register
class Triangular(SpikeFunction):
    """psi(x) = gamma * max(0, 1 - |s x|)  (LSNN's default)."""
    name = "triangular"

    def pseudo_derivative(self, x):
        return self.dampening * ops.relu(1.0 - ops.abs(self.sharpness * x))


@_register
class Exponential(SpikeFunction):
    """psi(x) = gamma * exp(-2 |s x|)."""
    name = "exponential"

    def pseudo_derivative(self, x):
        return self.dampening * ops.exp(-2.0 * ops.abs(self.sharpness * x))


@_register
class Gaussian(SpikeFunction):
    """psi(x) = gamma * exp(-pi (s x)^2)."""
    name = "gaussian"

    def pseudo_derivative(self, x):
        sx = self.sharpness * x
        return self.dampening * ops.exp(-math.pi * sx * sx)


@_register
class Sigmoid(SpikeFunction):
    """psi(x) = 4 gamma sig(4 s x) (1 - sig(4 s x))."""
    name = "sigmoid"

    def pseudo_derivative(self, x):
        sig = ops.sigmoid(4.0 * self.sharpness * x)
        return 4.0 * self.dampening * sig * (1.0 - sig)


@_register
class FastSigmoid(SpikeFunction):
    """psi(x) = gamma / (1 + 2 |s x|)^2  (SuperSpike)."""
    name = "fast_sigmoid"
    aliases = ("superspike",)

    def pseudo_derivative(self, x):
        denominator = 1.0 + 2.0 * ops.abs(self.sharpness * x)
        return self.dampening / (denominator * denominator)


@_register
class NTail(SpikeFunction):
    """psi(x) = gamma * (1 + 2 |s x| / (q - 1))^(-q)  (q-PseudoSpike, tail q > 1).

    Args:
        tail: q > 1; small q gives heavy tails, q -> infinity tends to the exponential.
    """
    name = "ntail"
    aliases = ("q_pseudospike",)

    def __init__(self, dampening=0.3, sharpness=1.0, tail=1.56):
        super().__init__(dampening, sharpness)
        tail = _check_positive_finite("tail", tail)
        if tail <= 1.0:
            raise ValueError(f"`tail` (q) must be > 1, received {tail!r}.")
        self.tail = tail

    def pseudo_derivative(self, x):
        base = 1.0 + 2.0 * ops.abs(self.sharpness * x) / (self.tail - 1.0)
        return self.dampening * ops.power(base, -self.tail)

    def get_config(self):
        return {**super().get_config(), "tail": self.tail}


@_register
class Cauchy(SpikeFunction):
    """psi(x) = gamma / (1 + (pi s x)^2)  (also known as the arctan surrogate)."""
    name = "cauchy"
    aliases = ("arctan",)

    def pseudo_derivative(self, x):
        psx = math.pi * self.sharpness * x
        return self.dampening / (1.0 + psx * psx)


@_register
class MultiGaussian(SpikeFunction):
    """Multi-Gaussian of Yin et al. (2021), rescaled so the peak at 0 is gamma.

    psi(x) proportional to (1 + h) N(x; 0, sigma) - h N(x; sigma, 6 sigma) - h N(x; -sigma, 6 sigma)
    with h = 0.15, sigma = 0.5 / s, N(x; mu, sd) the normal density.
    """
    name = "multi_gaussian"
    height = 0.15
    scale = 6.0

    def unnormalised(self, x, pdf_exp):
        """The bracket of the formula above before the rescaling to peak gamma, with ``pdf_exp``
        the exponential to use (``math.exp`` for Python floats, ``ops.exp`` for tensors); the
        native loops read its peak to form the same constants."""
        sigma = 0.5 / self.sharpness
        wide = self.scale * sigma

        def normal(mu, sd):
            d = (x - mu) / sd
            return pdf_exp(-0.5 * d * d) / (sd * math.sqrt(2.0 * math.pi))

        h = self.height
        return (1.0 + h) * normal(0.0, sigma) - h * normal(sigma, wide) - h * normal(-sigma, wide)

    def pseudo_derivative(self, x):
        peak = self.unnormalised(0.0, math.exp)
        return (self.dampening / peak) * self.unnormalised(x, ops.exp)


def available():
    """Names of the catalogue's spike functions (docs/surrogates.md) and of those added with
    ``register``, sorted.

    >>> import kspike
    >>> kspike.surrogates.available()  # doctest: +NORMALIZE_WHITESPACE
    ['cauchy', 'exponential', 'fast_sigmoid', 'gaussian', 'multi_gaussian', 'ntail',
     'rectangular', 'sigmoid', 'triangular']
    """
    return sorted({cls.name for cls in _REGISTRY.values()})


def aliases():
    """Accepted alternative names, as a dict alias -> name.

    >>> import kspike
    >>> kspike.surrogates.aliases()
    {'arctan': 'cauchy', 'q_pseudospike': 'ntail', 'superspike': 'fast_sigmoid'}
    """
    return {key: cls.name for key, cls in sorted(_REGISTRY.items()) if key != cls.name}


def _accepted():
    return f"Available names: {available()}; accepted aliases: {aliases()}"


def _parameters(cls):
    """Keyword parameters of the constructor of ``cls`` (dampening, sharpness, ...)."""
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if p.name not in names:
                    names.append(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return names


def get(identifier=None, /, **params):
    """Return a spike function.

    Args:
        identifier: a name from ``available()`` or ``aliases()`` (``superspike``, ``arctan``,
            ``q_pseudospike``; names added with ``register``), a ``SpikeFunction`` (returned
            as is, ``params`` must be empty), or a config dict from ``get_config()``.
        **params: ``dampening``, ``sharpness`` and, for ``ntail``, ``tail`` (for a registered
            class: the keyword arguments of its constructor). A ``name`` key
            (as in ``get_config()``) is accepted and must agree with ``identifier``.

    Raises:
        ValueError: unknown name (the message lists the available names) or bad parameter.
    """
    if identifier is None:
        if "name" not in params:
            raise ValueError("kspike.surrogates.get() needs a name, e.g. get('triangular'). "
                             f"{_accepted()}.")
        identifier = params.pop("name")
    if isinstance(identifier, SpikeFunction):
        if params:
            raise ValueError(f"Parameters {sorted(params)} cannot be applied to the spike "
                             f"function object {identifier!r}; pass its name instead.")
        return identifier
    if isinstance(identifier, dict):
        if "name" in identifier and identifier["name"] is None:
            raise ValueError(
                f"The surrogate config {identifier!r} has no name: it comes from a "
                "SpikeFunction subclass that was not registered. Decorate the class with "
                "@kspike.surrogates.register('some_name') (before saving and before loading). "
                f"{_accepted()}.")
        return get(**{**identifier, **params})
    if not isinstance(identifier, str):
        raise TypeError("`surrogate` must be a name (str), a kspike.surrogates.SpikeFunction "
                        f"or a config dict, received {identifier!r} of type "
                        f"{type(identifier).__name__}.")
    key = identifier.lower()
    name = params.pop("name", None)
    if key not in _REGISTRY:
        raise ValueError(f"Unknown surrogate {identifier!r}. {_accepted()}. Your own "
                         "SpikeFunction subclasses are added with "
                         "@kspike.surrogates.register('name').")
    cls = _REGISTRY[key]
    if name is not None and _REGISTRY.get(str(name).lower()) is not cls:
        raise ValueError(f"Conflicting surrogate names: {identifier!r} and name={name!r}.")
    allowed = _parameters(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        # Checked here rather than by catching TypeError, so a bad parameter value keeps its
        # own message.
        raise ValueError(f"Surrogate {cls.name!r} accepts parameters {allowed}, "
                         f"received unknown {unknown}.")
    return cls(**params)

