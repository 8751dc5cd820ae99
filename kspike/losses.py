"""Loss wrappers shared by ``kspike.Trainer`` and the learning rules (see docs/training.md).

``get_loss`` turns what a user passes as ``loss`` (a Keras loss, its name, or a plain
``fn(y_true, y_pred)``) into a Keras loss; ``UnscaledLoss`` wraps it so that its value is the
mean over the replica's own batch under ``tf.distribute``; ``model_losses`` sums the model's own
Keras losses (weight regularisers, ``add_loss``). The learning rules recognise these wrappers
to look inside them (e.g. to find an elementwise loss function).

Example:

>>> import keras
>>> import numpy as np
>>> loss = UnscaledLoss(get_loss("mse"))
>>> float(loss(np.zeros((2, 3)), np.ones((2, 3))))
1.0
"""
import keras
import tensorflow as tf

from kspike.compat import loss_function_wrapper, unscale_loss_for_distribution

# Keras' own wrapper of function losses (not exported by keras.losses; see kspike.compat).
LossFunctionWrapper = loss_function_wrapper()

__all__ = ["UnscaledLoss", "FunctionLoss", "LossFunctionWrapper", "get_loss", "model_losses"]

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class UnscaledLoss:
    """A Keras loss that returns the mean over the replica's own batch.

    Keras losses divide their value by the number of replicas when called under a
    ``tf.distribute`` strategy; the Trainer scales gradients itself (so the same holds for
    regularisers and plain callables) and logs true loss values, so it undoes that here.

    Args:
        loss: a ``keras.losses.Loss``; kept as ``.loss``.
    """

    def __init__(self, loss):
        self.loss = loss
        self.name = getattr(loss, "name", "loss")

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = self.loss(y_true, y_pred, sample_weight=sample_weight)
        if getattr(self.loss, "reduction", None) in _MEAN_REDUCTIONS:
            value = unscale_loss_for_distribution(value)
        return value


class FunctionLoss(keras.losses.Loss):
    """A plain ``loss(y_true, y_pred)`` function as a Keras loss (per-sample values are
    averaged over the batch, sample weights applied by Keras); the function is ``.fn``."""

    def __init__(self, fn, name=None):
        super().__init__(name=name or getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def get_loss(loss):
    """A Keras loss object from a Keras loss, a Keras loss name or a callable
    ``fn(y_true, y_pred)`` (wrapped in ``FunctionLoss``).

    Raises:
        ValueError: an unknown loss name.
        TypeError: anything else.
    """
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError as error:
            raise ValueError(f"`loss` {loss!r} is not a Keras loss name ({error}).") from None
        if isinstance(fn, keras.losses.Loss):
            return fn
        return FunctionLoss(fn, name=loss)
    if callable(loss):
        return FunctionLoss(loss)
    raise TypeError(f"`loss` must be a Keras loss, a loss name or a callable, received "
                    f"{loss!r}.")


def model_losses(model):
    """Sum of the model's own Keras losses (weight regularisers, ``add_loss``), float32 scalar."""
    losses = [tf.cast(l, tf.float32) for l in model.losses]
    return tf.add_n(losses) if losses else tf.constant(0.0)
