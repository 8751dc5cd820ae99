"""kspike.training.step: train/evaluate step functions and the non-finite guard."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike.learning.base import LearningRule, RuleResult
from kspike.losses import UnscaledLoss, get_loss
from kspike.training import step


def _model():
    inputs = keras.Input((4, 2))
    outputs = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)(inputs)
    return keras.Model(inputs, keras.layers.Lambda(lambda t: t[:, -1])(outputs))


class _FixedGradient(LearningRule):
    """A rule whose loss and gradient are given numbers (to test the guard alone)."""

    def __init__(self, loss, gradient):
        self.loss_value, self.gradient = loss, gradient

    def compute(self, model, x, y, loss, sample_weight=None, regularizers=(), training=True):
        grads = [tf.fill(v.shape, self.gradient) for v in model.trainable_variables]
        return RuleResult(loss=tf.constant(self.loss_value), gradients=grads,
                          predictions=model(x), logs={})


@pytest.mark.parametrize("loss_value, gradient, applied", [
    (1.0, 0.5, True), (float("nan"), 0.5, False), (1.0, float("inf"), False)])
def test_update_is_applied_only_when_loss_and_gradients_are_finite(loss_value, gradient,
                                                                   applied):
    model = _model()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    loss = UnscaledLoss(get_loss("mse"))
    x, y = np.ones((2, 4, 2), "float32"), np.zeros((2, 1), "float32")
    fn = step.make_step_function(
        lambda x, y, w: step.train_step(model, _FixedGradient(loss_value, gradient), loss, [],
                                        [], optimizer, None, x, y, w), None, [])
    logs = {k: float(v) for k, v in fn((x, y)).items()}
    assert step.is_finite_step(logs) is applied
    kernel = model.trainable_variables[0].numpy()
    np.testing.assert_allclose(kernel, 1.0 - 0.1 * 0.5 if applied else 1.0, rtol=1e-6)


def test_evaluate_step_loss_and_firing_rate():
    inputs = keras.Input((10, 3))
    spikes = keras.layers.RNN(kspike.LIF(5, seed=0), return_sequences=True,
                              name="hidden")(inputs)
    model = keras.Model(inputs, kspike.LeakyReadout(2, seed=1)(spikes))
    x = np.random.default_rng(0).random((3, 10, 3)).astype("float32") * 3.0
    y = np.zeros((3, 10, 2), "float32")
    loss = UnscaledLoss(get_loss("mse"))
    logs = step.evaluate_step(model, loss, [], [], x, y, None)
    np.testing.assert_allclose(float(logs["loss"]), float(np.mean(model(x).numpy() ** 2)),
                               rtol=1e-5)
    assert set(logs) == {"loss", "firing_rate", "firing_rate/hidden"}
    np.testing.assert_allclose(float(logs["firing_rate"]), float(logs["firing_rate/hidden"]))


def test_unpack_and_error_names_the_batch():
    assert step.unpack((1, 2, 3)) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"tuple \(x, y\).*received ndarray"):
        step.unpack(np.zeros((2, 3, 4)))


def test_non_finite_error_names_step_and_checkpoint():
    error = step.non_finite_error(7, {"loss": float("nan")}, "/runs/ckpt-0000000006")
    assert isinstance(error, step.NonFiniteLossError)
    assert "step 7" in str(error) and "ckpt-0000000006" in str(error)
    assert "No checkpoint" in str(step.non_finite_error(1, {}, None))


def test_run_evaluation_means_logs_and_keeps_final_metric_values():
    metric = keras.metrics.Mean(name="m")
    values = iter([(1.0, 0.5), (3.0, 0.7)])

    def function(batch):
        loss, m = next(values)
        return {"loss": loss, "m": m, "numerics": 1.0}

    seen = []
    result = step.run_evaluation(function, [0, 1, 2], 2, [metric],
                                 check=lambda count, logs, b: seen.append((count, b)))
    assert result == {"loss": 2.0, "m": 0.7} and seen == [(1, 0), (2, 1)]
    with pytest.raises(ValueError, match="no batch"):
        step.run_evaluation(function, [], None, [])


def test_first_non_finite_layer_and_the_error_naming_it():
    inputs = keras.Input((4, 2))
    h = keras.layers.Dense(3, name="first")(inputs)
    out = keras.layers.Lambda(lambda t: tf.math.log(t), name="log")(h)
    model = keras.Model(inputs, out, name="net")
    x = -np.ones((2, 4, 2), "float32")  # finite, but log of a negative value is NaN
    model.get_layer("first").kernel.assign(np.ones((2, 3), "float32"))
    assert step.first_non_finite_layer(model, x) == "log"
    error = step.non_finite_input_error("batch 1 of evaluate", model, (x, np.zeros(2)))
    assert isinstance(error, ValueError)
    assert str(error).startswith("check_numerics: non-finite values at batch 1 of evaluate: "
                                 "the batch is finite but the model's output is not; the "
                                 "first layer with a non-finite output is 'log' (model 'net')")
    x[0, 0, 0] = np.nan
    assert step.first_non_finite_layer(model, x) == "first"
    assert bool(step.all_finite(np.ones(3, "float32"), None)) and \
        not bool(step.all_finite(x))
    assert float(step.batch_share(x, None)) == 1.0
