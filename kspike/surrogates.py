"""Spike functions with surrogate pseudo-derivatives (REFERENCE.md section 2).

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
    >>> f = kspike.surrogates.get("ntail", dampening=0.3, sharpness=1.0, tail=1.56)
    >>> z = f(x)                                   # spikes; dz/dx = f.pseudo_derivative(x)
    >>> g = kspike.surrogates.get(f.get_config()["name"], **f.get_config())   # round trip
"""
import math

import keras
from keras import ops

__all__ = ["SpikeFunction", "available", "get", "heaviside", "Rectangular", "Triangular",
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


def _register(cls):
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _REGISTRY[alias] = cls
    return keras.saving.register_keras_serializable(package="kspike")(cls)


class SpikeFunction:
    """Base class: Heaviside forward pass, pseudo-derivative ``psi`` backward.

    Args:
        dampening: gamma, the peak of ``psi`` at ``x = 0`` (LSNN's dampening factor).
        sharpness: s; the support/width of ``psi`` scales as ``1 / s`` and its area is gamma / s.

    Subclasses implement ``pseudo_derivative(x)`` (a tensor function of ``x``).
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

    def _bracket(self, x, pdf_exp):
        sigma = 0.5 / self.sharpness
        wide = self.scale * sigma

        def normal(mu, sd):
            d = (x - mu) / sd
            return pdf_exp(-0.5 * d * d) / (sd * math.sqrt(2.0 * math.pi))

        h = self.height
        return (1.0 + h) * normal(0.0, sigma) - h * normal(sigma, wide) - h * normal(-sigma, wide)

    def pseudo_derivative(self, x):
        peak = self._bracket(0.0, math.exp)
        return (self.dampening / peak) * self._bracket(x, ops.exp)


def available():
    """Names of the catalogue's spike functions (REFERENCE.md section 2), sorted."""
    return sorted({cls.name for cls in _REGISTRY.values()})


def get(identifier=None, /, **params):
    """Return a spike function.

    Args:
        identifier: a name from ``available()`` (aliases: ``superspike``, ``arctan``,
            ``q_pseudospike``), a ``SpikeFunction`` (returned as is, ``params`` must be empty),
            or a config dict from ``get_config()``.
        **params: ``dampening``, ``sharpness`` and, for ``ntail``, ``tail``. A ``name`` key
            (as in ``get_config()``) is accepted and must agree with ``identifier``.

    Raises:
        ValueError: unknown name (the message lists the available names) or bad parameter.
    """
    if identifier is None:
        if "name" not in params:
            raise ValueError("kspike.surrogates.get() needs a name, e.g. get('triangular'). "
                             f"Available: {available()}.")
        identifier = params.pop("name")
    if isinstance(identifier, SpikeFunction):
        if params:
            raise ValueError(f"Parameters {sorted(params)} cannot be applied to the spike "
                             f"function object {identifier!r}; pass its name instead.")
        return identifier
    if isinstance(identifier, dict):
        return get(**{**identifier, **params})
    if not isinstance(identifier, str):
        raise TypeError("`surrogate` must be a name (str), a kspike.surrogates.SpikeFunction "
                        f"or a config dict, received {identifier!r} of type "
                        f"{type(identifier).__name__}.")
    key = identifier.lower()
    name = params.pop("name", None)
    if key not in _REGISTRY:
        raise ValueError(f"Unknown surrogate {identifier!r}. Available: {available()}.")
    cls = _REGISTRY[key]
    if name is not None and _REGISTRY.get(str(name).lower()) is not cls:
        raise ValueError(f"Conflicting surrogate names: {identifier!r} and name={name!r}.")
    allowed = ["dampening", "sharpness"] + (["tail"] if cls is NTail else [])
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        # Checked here rather than by catching TypeError, so a bad parameter value keeps its
        # own message.
        raise ValueError(f"Surrogate {cls.name!r} accepts parameters {allowed}, "
                         f"received unknown {unknown}.")
    return cls(**params)

