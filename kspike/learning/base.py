"""The interface every learning rule implements, so the Trainer never special-cases a rule."""
from typing import Any, Dict, List, NamedTuple, Optional

import tensorflow as tf

__all__ = ["LearningRule", "RuleResult"]


class RuleResult(NamedTuple):
    """What one batch of a learning rule produces.

    Attributes:
        loss: scalar tensor, the task loss plus every regulariser term.
        gradients: list aligned with ``model.trainable_variables`` (None where the rule leaves
            a variable alone); an optimizer applies them as it would BPTT gradients.
        predictions: the model's output for the batch (for metrics), e.g. (B, T, n_out).
        logs: extra scalars to show and log; rules that see spikes report
            ``kspike.regularizers.firing_rate_logs``: ``firing_rate`` (Hz, all spiking neurons)
            and ``firing_rate/<layer>`` (Hz, per layer).
    """
    loss: tf.Tensor
    gradients: List[Optional[tf.Tensor]]
    predictions: Any
    logs: Dict[str, tf.Tensor]


class LearningRule:
    """Base class of kspike's learning rules (BPTT, e-prop, S-TLLR, STDP, rate-based BP).

    A rule turns one batch into gradients. ``compute`` is what the Trainer calls inside its
    ``tf.function`` train step; ``gradients`` is the one-batch convenience for users.
    Subclasses implement ``compute`` and may override ``check_model`` to reject model shapes
    they do not support with a clear error.
    """

    name = "rule"

    def check_model(self, model):
        """Raise ValueError if ``model`` has a shape this rule does not support."""

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        """One batch -> ``RuleResult``.

        Args:
            model: a built Keras model.
            x: inputs (B, T, n_in).
            y: targets, in whatever form ``loss`` takes.
            loss: callable ``loss(y_true, y_pred, sample_weight=None) -> scalar``
                (a Keras loss object works).
            sample_weight: optional weights forwarded to ``loss``.
            regularizers: kspike regularisers whose terms join the loss.
            training: forwarded to the model call.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute().")

    def loss_outputs(self, model, predictions):
        """What the loss and metrics receive in training, from what ``model(x)`` returns.

        ``kspike.Trainer`` applies it in ``evaluate`` and validation, so that evaluation sees
        what training sees. The default is ``predictions`` unchanged; a rule whose loss takes
        another form of the outputs (``RateBP``: their time average) overrides it.
        """
        return predictions

    def gradients(self, model, x, y, loss, sample_weight=None, regularizers=()):
        """Gradients of one batch, a list aligned with ``model.trainable_variables``."""
        return self.compute(model, x, y, loss, sample_weight=sample_weight,
                            regularizers=regularizers).gradients

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"kspike.learning.{type(self).__name__}({args})"
