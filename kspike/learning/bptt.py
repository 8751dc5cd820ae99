"""Backpropagation through time: exact gradients of the unrolled network with GradientTape."""
import tensorflow as tf

from kspike import regularizers as _regularizers
from kspike.learning.base import LearningRule, RuleResult
from kspike.losses import model_losses
# Re-exported: the name other rules and users imported from here before it moved.
from kspike.regularizers import firing_rate_logs

__all__ = ["BPTT", "model_losses", "firing_rate_logs"]


class BPTT(LearningRule):
    """Backpropagation through time with ``tf.GradientTape`` over the unrolled network.

    The loss is ``loss(y, model(x))`` plus every kspike regulariser term (computed on the
    spike sequences of the same forward pass, see ``kspike.regularizers.record_activity``)
    plus the model's own Keras losses (weight regularisers). Spikes pass gradients through
    their surrogate pseudo-derivative, including through the reset and the recurrent spikes.

    Logs: ``firing_rate`` (Hz, mean over every spiking neuron), ``firing_rate/<layer>`` per
    spiking layer, and ``regularization`` when regularisers are given. Other rules can log the
    same with ``kspike.regularizers.firing_rate_logs(activities)``.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 4)),
    ...     keras.layers.RNN(kspike.LIF(8, thr=0.5), return_sequences=True),
    ...     kspike.LeakyReadout(2)])
    >>> x = np.random.default_rng(0).random((3, 20, 4)).astype("float32")
    >>> y = np.zeros((3, 20), "int32")
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> grads = kspike.learning.BPTT().gradients(model, x, y, loss)
    >>> len(grads) == len(model.trainable_variables)
    True
    >>> optimizer = keras.optimizers.Adam(1e-3)
    >>> _ = optimizer.apply_gradients(zip(grads, model.trainable_variables))
    """

    name = "bptt"

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        regularizers = _regularizers.check_regularizers(regularizers)
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            try:
                predictions, activities = _regularizers.record_activity(model, x,
                                                                        training=training)
            except ValueError:
                if regularizers:
                    raise
                # A model kspike cannot look into still trains; it just logs no firing rate.
                predictions, activities = model(x, training=training), []
            task = tf.cast(loss(y, predictions, sample_weight=sample_weight), tf.float32)
            penalty = _regularizers.total_penalty(regularizers, activities)
            total = task + penalty + model_losses(model)
        gradients = tape.gradient(total, variables)
        logs = firing_rate_logs(activities)
        if regularizers:
            logs["regularization"] = penalty
        return RuleResult(loss=total, gradients=list(gradients), predictions=predictions,
                          logs=logs)
