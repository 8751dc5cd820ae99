"""kspike.Trainer with rules whose loss takes another form of the outputs (RateBP): evaluation
and validation see what training sees (``LearningRule.loss_outputs``)."""
import keras
import numpy as np
import tensorflow as tf

import kspike
from kspike.training import Trainer

T, N_IN = 8, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(pool=False):
    inputs = keras.Input((T, N_IN))
    h = keras.layers.RNN(kspike.LIF(10, thr=0.05, seed=0), return_sequences=True,
                         name="hidden")(inputs)
    outputs = kspike.LeakyReadout(3, seed=1)(h)
    if pool:
        outputs = keras.layers.GlobalAveragePooling1D()(outputs)
    return keras.Model(inputs, outputs)


def _data(n=16, batch=8):
    rng = np.random.default_rng(0)
    x = (rng.random((n, T, N_IN)) < 0.4).astype("float32")
    y = rng.integers(0, 3, n).astype("int32")
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_ratebp_trains_validates_and_evaluates_in_the_trainer():
    """The issue's reproduction: validation and evaluate failed with "Argument output must
    have rank target.ndim - 1"; now their loss is the loss of the time-averaged outputs."""
    x, y, ds = _data()
    model = _model()
    trainer = Trainer(model, "adam", LOSS, rule=kspike.learning.RateBP(),
                      metrics=["accuracy"], verbose=0)
    history = trainer.fit(ds, steps=2, validation_data=ds)
    assert np.isfinite(history.history["val_loss"]).all()
    result = trainer.evaluate(ds)
    # Independent value: the loss of the time average of model(x), computed in NumPy.
    logits = model(x, training=False).numpy().mean(axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
    np.testing.assert_allclose(result["loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"],
                               np.mean(logits.argmax(axis=1) == y), rtol=1e-6)
    # What training's loss sees for the same weights: the rule's own forward pass.
    trained = trainer.rule.compute(model, x, y, LOSS)
    np.testing.assert_allclose(float(trained.loss), nll.mean(), rtol=1e-4)


def test_loss_outputs_of_the_rules():
    x, _, _ = _data(4)
    sequence, pooled = _model(), _model(pool=True)
    rate = kspike.learning.RateBP()
    out = sequence(x)
    np.testing.assert_allclose(rate.loss_outputs(sequence, out).numpy(),
                               out.numpy().mean(axis=1), rtol=1e-6)
    out = pooled(x)
    assert rate.loss_outputs(pooled, out) is out  # averaged by the model already
    assert kspike.learning.BPTT().loss_outputs(sequence, out) is out
