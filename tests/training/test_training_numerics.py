"""kspike.Trainer(check_numerics=True): NaN/inf in a batch or a layer's output is an error
naming the batch, the counts and the first layer, before anything is updated."""
import keras
import numpy as np
import pytest

import kspike
from kspike.training import NonFiniteInputError, Trainer

from small_lif import LOSS, N_IN, T  # noqa: F401  (shared with the other array tests)
from small_lif import model as _model
import small_lif


def _arrays(n=8):
    return small_lif.arrays(n)


def test_without_the_option_nan_inputs_pass_silently():
    x, y = _arrays()
    x[5, 2, 1] = np.nan
    assert np.isnan(Trainer(_model(), "adam", LOSS, verbose=0).predict(x)).any()


def test_nan_and_inf_inputs_are_named_in_fit_evaluate_and_predict():
    x, y = _arrays()
    x[5, 2, 1], x[6, 0, 0] = np.nan, np.inf
    model = _model()
    before = [w.numpy() for w in model.trainable_variables]
    trainer = Trainer(model, "adam", LOSS, check_numerics=True, verbose=0)
    with pytest.raises(NonFiniteInputError,
                       match=r"step 2 of fit \(batch 2 of epoch 1\): inputs x hold 1 NaN and "
                             r"1 inf of 96 values; the first layer with a non-finite output "
                             r"is 'hidden'"):
        trainer.fit(x, y, batch_size=4, shuffle=False)
    assert trainer.step == 1  # the first, finite batch trained; the second changed nothing
    after_one = [w.numpy() for w in model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after_one))
    with pytest.raises(NonFiniteInputError, match="batch 2 of evaluate: inputs x hold 1 NaN"):
        trainer.evaluate(x, y, batch_size=4)
    with pytest.raises(NonFiniteInputError, match="batch 1 of predict.*'hidden'"):
        trainer.predict(x)
    for a, b in zip(after_one, model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
    targets = np.zeros((4, 2), "float32")
    targets[1, 0] = np.inf
    with pytest.raises(NonFiniteInputError, match="targets y hold 0 NaN and 1 inf of 8"):
        Trainer(model, "adam", keras.losses.MeanSquaredError(), check_numerics=True,
                verbose=0).evaluate(x[:4], targets)
