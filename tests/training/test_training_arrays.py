"""kspike.Trainer with arrays, as model.fit takes them: fit(x, y), (x, y) tuples, batch_size,
seeded shuffling, validation_split and validation_data arrays; messages never print arrays."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike.training import Trainer, data

from small_lif import LOSS, N_IN, T  # noqa: F401  (shared with the other array tests)
from small_lif import model as _model
import small_lif


def _arrays(n=20):
    return small_lif.arrays(n)


def _weights(model):
    return [w.numpy() for w in model.trainable_variables]


def test_fit_on_shuffled_arrays_trains_on_the_seeded_permutation():
    """fit(x, y) with batch_size and shuffle equals fit on a dataset of the batches it should
    make: epoch e's order is the permutation np.random.default_rng([seed, e])."""
    x, y = _arrays()
    by_arrays = _model()
    trainer = Trainer(by_arrays, keras.optimizers.SGD(0.5), LOSS, seed=5, verbose=0)
    history = trainer.fit(x, y, batch_size=8, epochs=1)
    assert trainer.step == 3 and len(history.history["loss"]) == 1  # ceil(20 / 8) batches
    order = np.random.default_rng([5, 0]).permutation(len(y))
    by_dataset = _model()
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(8)
    Trainer(by_dataset, keras.optimizers.SGD(0.5), LOSS, seed=5, verbose=0).fit(ds)
    for a, b in zip(_weights(by_arrays), _weights(by_dataset)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(_weights(by_arrays),
                                                           _weights(_model())))


def test_array_data_orders_and_forms():
    x, y = _arrays()
    arrays = data.ArrayData(x, y, batch_size=8, shuffle=True, seed=3)
    labels = [np.concatenate([b[1].numpy() for b in arrays.dataset(e)]) for e in (0, 1)]
    for epoch, seen in enumerate(labels):
        np.testing.assert_array_equal(seen, y[np.random.default_rng([3, epoch]).permutation(20)])
    assert not np.array_equal(labels[0], labels[1])
    plain = data.ArrayData(x, y, batch_size=8, shuffle=False)
    assert len(plain) == 3 and plain.batch_sizes() == [4, 8]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in plain.dataset(4)]), y)
    # fit(x, y), fit((x, y)) and fit(x, y=y) are the same call.
    for args, kwargs in (((x, y), {}), (((x, y),), {}), ((x,), {"y": y})):
        train, _, steps = data.fit_inputs(*args, **kwargs, batch_size=8)
        assert isinstance(train, data.ArrayData) and steps is None
        np.testing.assert_array_equal(train.arrays[1], y)


def test_validation_split_and_validation_arrays():
    x, y = _arrays()
    trainer = Trainer(_model(), "adam", LOSS, metrics=["accuracy"], verbose=0)
    history = trainer.fit(x, y, batch_size=4, validation_split=0.25, shuffle=False)
    assert trainer.step == 4  # 15 training samples, the last 5 held out
    held_out = trainer.evaluate(x[15:], y[15:], batch_size=4)
    np.testing.assert_allclose(history.history["val_loss"][0], held_out["loss"], rtol=1e-6)
    history = trainer.fit(x, y, batch_size=4, epochs=2, validation_data=(x[:6], y[:6]))
    assert trainer.step == 9  # epoch 2 only (5 batches): the first fit trained epoch 1
    np.testing.assert_allclose(history.history["val_accuracy"][-1],
                               trainer.evaluate((x[:6], y[:6]))["accuracy"], rtol=1e-6)


def test_array_errors_are_clear_and_short():
    x, y = _arrays(200)
    trainer = Trainer(_model(), "adam", LOSS, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(ValueError, match="`steps` must be an integer") as error:
        trainer.fit(ds, y)  # labels where `steps` goes
    assert "shape (200,)" in str(error.value) and len(str(error.value)) < 300
    with pytest.raises(ValueError, match="pass its targets `y`"):
        trainer.fit(x)
    with pytest.raises(ValueError, match="x with 200, y with 199"):
        trainer.fit(x, y[:-1])
    with pytest.raises(ValueError, match="`batch_size` is only for array inputs"):
        trainer.fit(ds, batch_size=4)
    with pytest.raises(ValueError, match="`validation_split` must be a number in"):
        trainer.fit(x, y, validation_split=1.5)
    with pytest.raises(ValueError, match="`validation_split` needs array inputs"):
        trainer.fit(ds, validation_split=0.2)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        trainer.fit(x, y, batch_size=0)
    for message in (str(e.value) for e in [error]):
        assert "[" not in message  # no array printed
