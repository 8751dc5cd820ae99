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
