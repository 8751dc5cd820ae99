"""kspike.losses: the loss wrappers shared by the Trainer and the learning rules."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kspike import losses


def test_get_loss_accepts_objects_names_and_functions():
    mse = keras.losses.MeanSquaredError()
    assert losses.get_loss(mse) is mse
    by_name = losses.get_loss("mse")
    assert isinstance(by_name, keras.losses.Loss)
    by_function = losses.get_loss(lambda y_true, y_pred: tf.abs(y_true - y_pred))
    assert isinstance(by_function, losses.FunctionLoss)
    y_true, y_pred = np.zeros((2, 3), "float32"), np.full((2, 3), 2.0, "float32")
    np.testing.assert_allclose(float(by_name(y_true, y_pred)), 4.0)
    np.testing.assert_allclose(float(by_function(y_true, y_pred)), 2.0)
    with pytest.raises(ValueError, match="not a Keras loss name"):
        losses.get_loss("no_such_loss")
    with pytest.raises(TypeError, match="`loss` must be"):
        losses.get_loss(3)


def test_unscaled_loss_undoes_the_replica_division_of_mean_reductions_only(monkeypatch):
    # Two replicas' worth of Keras' division, simulated: what UnscaledLoss multiplies back.
    monkeypatch.setattr(losses, "unscale_loss_for_distribution", lambda value: value * 2.0)
    y_true, y_pred = np.zeros((4, 1), "float32"), np.full((4, 1), 3.0, "float32")
    mean = losses.UnscaledLoss(keras.losses.MeanSquaredError())
    total = losses.UnscaledLoss(keras.losses.MeanSquaredError(reduction="sum"))
    np.testing.assert_allclose(float(mean(y_true, y_pred)), 2.0 * 9.0)
    np.testing.assert_allclose(float(total(y_true, y_pred)), 4 * 9.0)
    assert mean.name == "mean_squared_error"


def test_model_losses_sums_weight_regularisers():
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(1, kernel_initializer="ones",
                               kernel_regularizer=keras.regularizers.L2(0.5))
    model = keras.Model(inputs, dense(inputs))
    np.testing.assert_allclose(float(losses.model_losses(model)), 0.5 * 2.0)
    no_reg = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    assert float(losses.model_losses(no_reg)) == 0.0


def test_bptt_and_the_function_wrapper_share_this_module():
    from kspike.learning.bptt import model_losses
    assert model_losses is losses.model_losses
    wrapped = losses.LossFunctionWrapper(keras.losses.mean_squared_error, name="mse")
    y_true, y_pred = np.zeros((2, 3), "float32"), np.ones((2, 3), "float32")
    np.testing.assert_allclose(float(wrapped(y_true, y_pred)), 1.0)
