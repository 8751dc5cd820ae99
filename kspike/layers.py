"""Sequence layers around spiking cells: the leaky readout of LSNN."""
import keras
import numpy as np
import tensorflow as tf
from keras import constraints, initializers, regularizers

from kspike import dynamics

__all__ = ["LeakyReadout", "leaky_filter"]

# Up to this many steps the filter is one (T, T) matmul (fast, exact); beyond it a scan keeps
# memory linear in T.
_TOEPLITZ_MAX_STEPS = 2048


def leaky_filter(x, kappa, initial=None):
    """zhat_t = kappa zhat_{t-1} + (1 - kappa) x_t over the time axis.

    Args:
        x: (B, T, n) tensor.
        kappa: decay per step, a float in [0, 1).
        initial: optional (B, n) zhat_{-1} (default 0).

    Returns:
        (B, T, n) filtered sequence.
    """
    x = tf.convert_to_tensor(x)
    steps = x.shape[1]
    if steps is not None and steps <= _TOEPLITZ_MAX_STEPS:
        t = np.arange(steps)
        lag = t[:, None] - t[None, :]
        # kappa ** lag in float64, zero above the diagonal, then cast once.
        weights = np.where(lag >= 0, (1.0 - kappa) * np.power(kappa, np.maximum(lag, 0)), 0.0)
        y = tf.einsum("ts,bsn->btn", tf.constant(weights, x.dtype), x)
        if initial is not None:
            powers = tf.constant(np.power(kappa, t + 1.0), x.dtype)
            y = y + powers[None, :, None] * tf.cast(initial, x.dtype)[:, None, :]
        return y
    start = tf.zeros_like(x[:, 0]) if initial is None else tf.cast(initial, x.dtype)
    y = tf.scan(lambda prev, xt: kappa * prev + (1.0 - kappa) * xt,
                tf.transpose(x, (1, 0, 2)), initializer=start)
    return tf.transpose(y, (1, 0, 2))


@keras.saving.register_keras_serializable(package="kspike")
class LeakyReadout(keras.layers.Layer):
    """Leaky readout of LSNN: a low-pass filter of spikes followed by a dense projection.

    zhat_t = kappa zhat_{t-1} + (1 - kappa) z_t with kappa = exp(-dt / tau), then
    y_t = zhat_t W_out + b_out. (The filter is linear, so it is applied after the projection.)

    Args:
        units: number of outputs (int >= 1).
        tau: readout time constant in ms (> 0).
        dt: time step in ms (> 0).
        use_bias: add b_out.
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        kernel_constraint, bias_constraint: as in ``keras.layers.Dense`` (the default kernel
            initialiser is N(0, 1) / sqrt(fan_in), as in LSNN).

    Call arguments:
        inputs: (B, T, n) spike sequence.

    Returns:
        (B, T, units).

    Example:

    >>> import numpy as np, kspike
    >>> spikes = np.zeros((2, 50, 30), "float32")           # (B, T, n)
    >>> tuple(kspike.LeakyReadout(10, tau=20.0)(spikes).shape)
    (2, 50, 10)
    """

    def __init__(self, units, tau=20.0, dt=1.0, use_bias=True, kernel_initializer=None,
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        from kspike.cells import check_positive
        self.units = check_positive("units", units, integer=True)
        self.tau = check_positive("tau", tau)
        self.dt = check_positive("dt", dt)
        self.kappa = dynamics.decay(self.tau, self.dt)
        self.use_bias = bool(use_bias)
        self.seed = seed
        self.kernel_initializer = (
            initializers.VarianceScaling(1.0, "fan_in", "untruncated_normal", seed=seed)
            if kernel_initializer is None else initializers.get(kernel_initializer))
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError("LeakyReadout expects inputs of shape (batch, time, features) with "
                             f"known features, received {tuple(input_shape)}.")
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        self.built = True

    def call(self, inputs, mask=None):
        x = tf.convert_to_tensor(inputs)
        if x.shape.rank != 3:
            raise ValueError("LeakyReadout expects inputs of shape (batch, time, features), "
                             f"received {tuple(x.shape)}.")
        projected = tf.matmul(x, tf.cast(self.kernel, x.dtype))
        y = leaky_filter(projected, self.kappa)
        if self.bias is not None:
            y = y + tf.cast(self.bias, y.dtype)
        return y

    def step(self, z_t, zhat_previous):
        """One streaming step: (B, n) spikes and (B, units) filtered projection ->
        (y_t, new filtered projection). Used by ``kspike.export``."""
        projected = tf.matmul(z_t, tf.cast(self.kernel, z_t.dtype))
        filtered = self.kappa * zhat_previous + (1.0 - self.kappa) * projected
        y = filtered if self.bias is None else filtered + tf.cast(self.bias, filtered.dtype)
        return y, filtered

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {**super().get_config(), "units": self.units, "tau": self.tau, "dt": self.dt,
                "use_bias": self.use_bias, "seed": self.seed,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint)}
