"""kspike.training.data: data position and resumable iteration."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kspike.training import data


def test_iterate_skips_the_consumed_batches_of_datasets_and_lists():
    ds = tf.data.Dataset.range(5)
    assert [int(b) for b in data.iterate(ds, 2)] == [2, 3, 4]
    assert list(data.iterate([0, 1, 2, 3], 3)) == [3]
    with pytest.raises(TypeError, match="tf.data.Dataset or an iterable"):
        data.iterate(np.zeros(3), 0)


def test_cardinality_and_first_batch():
    assert data.cardinality(tf.data.Dataset.range(4).batch(2)) == 2
    assert data.cardinality(tf.data.Dataset.range(4).repeat()) == math.inf
    assert data.cardinality(tf.data.Dataset.range(4).filter(lambda v: v > 1)) is None
    assert data.first_batch([7, 8]) == 7
    with pytest.raises(TypeError, match="re-iterable"):
        data.first_batch(iter([1]))
    with pytest.raises(ValueError, match="empty"):
        data.first_batch([])


def test_open_iterator_is_reused_only_at_the_same_data_epoch_and_position():
    position = data.DataPosition()
    batches = [0, 1, 2, 3]
    iterator = position.open_iterator(batches, 0, skip=True)
    assert next(iterator) == 0
    position.position = 1
    position.keep_open(batches, iterator)
    assert next(position.open_iterator(batches, 0, skip=True)) == 1  # the same iterator
    position.keep_open(batches, iterator)
    position.position = 3  # e.g. restored from a checkpoint: a new iterator skips to it
    assert list(position.open_iterator(batches, 0, skip=True)) == [3]
    assert list(position.open_iterator(batches, 0, skip=False)) == [0, 1, 2, 3]


def test_advance_rolls_over_at_the_end_of_an_epoch():
    position = data.DataPosition()
    assert position.advance(0, 0, 3) is False and (position.epoch, position.position) == (0, 1)
    assert position.advance(0, 2, 3) is True and (position.epoch, position.position) == (1, 0)
    position.finish(1)  # data ran out before steps_per_epoch
    assert (position.epoch, position.position) == (2, 0)
    position.finish(1)  # already rolled over: nothing changes
    assert position.epoch == 2
    assert position.advance(2, 5, None) is False and position.position == 6


def test_plan_fit_and_global_batch_checks():
    from types import SimpleNamespace
    x = np.zeros((10, 4, 2), "float32")
    y = np.zeros(10, "int32")
    train, plan, batch = data.plan_fit(x, None, None, None, None, 1, None, y, None, 4, False,
                                       0.2, 0, None)
    assert isinstance(train, data.ArrayData) and train.size == 8
    assert plan.steps_per_epoch == 2 and plan.epochs == 1 and batch[0].shape == (4, 4, 2)
    assert plan.validation_data.size == 2 and not plan.validation_data.shuffle
    two = SimpleNamespace(num_replicas_in_sync=2)
    data.check_global_batch((np.zeros((4, 1)),), two, "train_ds")
    data.check_global_batch(data.ArrayData(x, y, batch_size=4, shuffle=False), two, "a")
    with pytest.raises(ValueError, match="global batch of 3 samples of `a`.*2 replicas"):
        data.check_global_batch(data.ArrayData(x[:7], y[:7], batch_size=4), two, "a")
    data.check_global_batch((np.zeros((3, 1)),), None, "train_ds")  # one device: any size


def test_prediction_inputs_drop_targets():
    x = np.arange(12, dtype="float32").reshape(6, 2)
    assert [b.shape[0] for b in data.prediction_inputs(x, 4)] == [4, 2]
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(6))).batch(3)
    np.testing.assert_array_equal(np.concatenate(list(data.prediction_inputs(ds))), x)
    with pytest.raises(ValueError, match="`batch_size` is only for array inputs"):
        data.prediction_inputs(ds, 3)
