"""Data position of ``kspike.Trainer``: resumable iteration over an epoch (docs/training.md).

The Trainer counts the batches consumed in the current epoch (``position``); a resumed run
skips that many batches of its epoch, and a ``fit`` call that follows another in the same
process reuses the still-open iterator instead.

Example:

>>> data = DataPosition()
>>> batches = [1, 2, 3]
>>> data.position = 2
>>> list(data.open_iterator(batches, epoch=0, skip=True))
[3]
"""
import math

import numpy as np
import tensorflow as tf

__all__ = ["DataPosition", "iterate", "cardinality", "first_batch"]


def iterate(data, skip, strategy=None):
    """Iterator over ``data`` (a ``tf.data.Dataset`` or a re-iterable of batches) after its
    first ``skip`` batches, distributed over ``strategy``'s replicas if given."""
    if isinstance(data, tf.data.Dataset):
        if skip:
            data = data.skip(skip)
        if strategy is not None:
            data = strategy.experimental_distribute_dataset(data)
        return iter(data)
    if strategy is not None:
        raise TypeError("With `strategy`, the data must be a tf.data.Dataset, received "
                        f"{type(data).__name__}.")
    if isinstance(data, (tf.Tensor, np.ndarray)) or not hasattr(data, "__iter__"):
        raise TypeError("The data must be a tf.data.Dataset or an iterable of (x, y) "
                        f"batches, received {type(data).__name__}.")
    iterator = iter(data)
    for _ in range(skip):
        next(iterator, None)
    return iterator


def cardinality(data):
    """Number of batches of ``data``: an int, ``math.inf`` or None when unknown.

    >>> cardinality([1, 2]), cardinality(iter([]))
    (2, None)
    """
    if isinstance(data, tf.data.Dataset):
        n = int(data.cardinality())
        if n == tf.data.INFINITE_CARDINALITY:
            return math.inf
        return None if n < 0 else n
    try:
        return len(data)
    except TypeError:
        return None


def first_batch(data):
    """The first batch of ``data``; rejects one-shot iterators and empty data."""
    if isinstance(data, tf.data.Dataset):
        for batch in data.take(1):
            return batch
    else:
        if iter(data) is data:
            raise TypeError("Pass a re-iterable dataset (a tf.data.Dataset or a list), not "
                            "a one-shot iterator: each epoch iterates the data again.")
        for batch in data:
            return batch
    raise ValueError("The dataset is empty.")


class DataPosition:
    """Where training stands in its data: ``epoch`` (0-based), ``position`` (batches consumed in
    that epoch) and the iterator an unfinished epoch left open.

    Args:
        strategy: a ``tf.distribute.Strategy`` or None.
    """

    def __init__(self, strategy=None):
        self.strategy = strategy
        self.epoch = 0
        self.position = 0
        self._open_epoch = None

    def open_iterator(self, data, epoch, skip):
        """Iterator of ``epoch`` at the saved position: the still-open iterator of a previous
        fit call, or a new one that skips the batches consumed before a resume (``skip``
        False: the epoch's data starts afresh)."""
        if self._open_epoch is not None:
            previous, open_epoch, position, iterator = self._open_epoch
            self._open_epoch = None
            if previous is data and open_epoch == epoch and position == self.position:
                return iterator
        return iterate(data, self.position if skip else 0, self.strategy)

    def keep_open(self, data, iterator):
        """Keeps ``iterator`` for the next fit call (an epoch cut short by ``steps``)."""
        self._open_epoch = (data, self.epoch, self.position, iterator)

    def close(self):
        self._open_epoch = None
