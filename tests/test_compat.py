"""kspike.compat: each wrapper around a Keras/TensorFlow internal answers as documented."""
import keras
import numpy as np
import tensorflow as tf

from kspike import compat


def test_graph_queries():
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["xla"] = compat.in_xla_context()
        return x + 1.0

    @tf.function
    def plain(x):
        seen["plain"] = compat.in_xla_context()
        return x + 1.0

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    assert seen == {"xla": True, "plain": False} and not compat.in_xla_context()
    with tf.GradientTape() as tape:
        tape.watch(tf.constant(1.0))
        assert compat.tape_may_record()


def test_layer_walks_and_losses():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="d")
    model = keras.Model(inputs, dense(inputs))
    assert compat.call_count(dense) == 1
    assert compat.inbound_input_tensors(dense)[0][0] is inputs
    assert "d" in [layer.name for layer in compat.nested_layers(model)]
    trainable, frozen = compat.own_variables(dense)
    assert len(trainable) == 2 and frozen == [] and compat.own_variables(model) == ([], [])
    assert compat.output_structure(model) is model.outputs[0]
    mse = compat.wrap_loss_function(keras.losses.mean_squared_error, name="mse")
    fn, kwargs = compat.wrapped_loss_function(mse)
    assert fn is keras.losses.mean_squared_error and kwargs == {}
    assert compat.wrapped_loss_function(keras.losses.Loss()) is None
    np.testing.assert_allclose(float(compat.unscale_loss_for_distribution(tf.constant(2.0))), 2.0)
    state = compat.keras_seed_state()
    assert state is None or hasattr(state, "assign")
