"""Data of ``kspike.Trainer``: arrays as batches, resumable iteration over an epoch
(docs/training.md).

``fit`` and ``evaluate`` take a ``tf.data.Dataset``, a re-iterable of batches, or arrays as
``model.fit`` does (``x, y``, ``(x, y)``, ``batch_size``, ``shuffle``, ``validation_split``):
arrays become an ``ArrayData`` whose order in each epoch is a permutation drawn from
``(seed, epoch)``, so a resumed run sees the same batches in the same order.

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

from kspike.training.arguments import FitPlan, check_flag, describe, positive_int

__all__ = ["DataPosition", "iterate", "cardinality", "first_batch", "ArrayData", "is_array",
           "fit_inputs", "plan_fit", "evaluation_inputs", "prediction_inputs", "check_global_batch",
           "first_checked_batch"]


def is_array(value):
    """True for NumPy arrays and tensors (what ``model.fit`` takes as ``x`` or ``y``)."""
    return isinstance(value, (np.ndarray, tf.Tensor)) or (
        hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"))


def _array_tuple(value):
    """True for ``(x, y)`` or ``(x, y, sample_weight)`` of arrays."""
    return (isinstance(value, tuple) and len(value) in (2, 3)
            and all(v is None or is_array(v) for v in value) and is_array(value[0]))


class ArrayData:
    """Arrays ``x``, ``y`` (and ``sample_weight``) as batches of ``batch_size``, like the arrays
    ``model.fit`` takes. Each epoch's order is a permutation drawn from ``(seed, epoch)``
    (``shuffle``), so it is reproducible and a resumed epoch continues exactly.

    >>> data = ArrayData(np.arange(5.0)[:, None], np.arange(5), batch_size=2, shuffle=False)
    >>> len(data), [int(b[1][0]) for b in data.dataset(0)]
    (3, [0, 2, 4])
    """

    def __init__(self, x, y, sample_weight=None, batch_size=32, shuffle=True, seed=None):
        self.arrays = tuple(np.asarray(a) for a in (x, y, sample_weight) if a is not None)
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle = check_flag("shuffle", shuffle)
        sizes = [len(a) for a in self.arrays]
        if len(set(sizes)) != 1:
            names = ("x", "y", "sample_weight")
            raise ValueError("x, y (and sample_weight) must have the same number of samples, "
                             "received " + ", ".join(f"{n} with {k}"
                                                     for n, k in zip(names, sizes)) + ".")
        if sizes[0] == 0:
            raise ValueError("The arrays hold no sample.")
        self.size = sizes[0]
        # Without a seed the order still differs between epochs, but not between runs.
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def batch_sizes(self):
        """The distinct batch sizes of an epoch (the last batch may be partial)."""
        return sorted({self.batch_size, self.size - (len(self) - 1) * self.batch_size})

    def dataset(self, epoch):
        """The batches of ``epoch`` as a ``tf.data.Dataset``."""
        arrays = self.arrays
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.size)
            arrays = tuple(a[order] for a in arrays)
        return tf.data.Dataset.from_tensor_slices(arrays).batch(self.batch_size)

    def split(self, fraction):
        """``(training, validation)``: the last ``fraction`` of the samples (taken before any
        shuffling, as ``model.fit`` does) for validation, unshuffled."""
        count = int(self.size * fraction)
        if count < 1 or count >= self.size:
            raise ValueError(f"`validation_split`={fraction} of {self.size} samples leaves "
                             f"{count} for validation and {self.size - count} for training; "
                             "both need at least one.")
        head = ArrayData(*[a[:-count] for a in self.arrays], batch_size=self.batch_size,
                         shuffle=self.shuffle, seed=self.seed)
        tail = ArrayData(*[a[-count:] for a in self.arrays], batch_size=self.batch_size,
                         shuffle=False)
        return head, tail

    def __iter__(self):
        return iter(self.dataset(0))


def _arrays(name, x, y, sample_weight, batch_size, shuffle, seed):
    """An ``ArrayData`` of ``x`` (an array or a tuple of arrays) or None when ``x`` is a
    dataset; errors for array-only arguments given with a dataset."""
    if _array_tuple(x):
        if y is not None or sample_weight is not None:
            raise ValueError(f"`{name}` is a tuple of arrays (x, y[, sample_weight]): do not "
                             "pass `y` or `sample_weight` as well.")
        x, y, sample_weight = (tuple(x) + (None,))[:3]
    if is_array(x):
        if y is None:
            raise ValueError(f"`{name}` is an array ({describe(x)}): pass its targets `y` "
                             f"too, e.g. fit(x, y), or a tf.data.Dataset of (x, y) batches.")
        if not is_array(y) and not isinstance(y, (list, tuple)):
            raise TypeError(f"`y` must be an array, received {describe(y)}.")
        return ArrayData(x, y, sample_weight, 32 if batch_size is None else batch_size,
                         shuffle, seed)
    for arg, value in (("y", y), ("sample_weight", sample_weight),
                       ("batch_size", batch_size)):
        if value is not None:
            raise ValueError(f"`{arg}` is only for array inputs; `{name}` is a "
                             f"{type(x).__name__}, whose batches carry their targets "
                             "(a dataset of (x, y) batches is batched already).")
    return None


def fit_inputs(x, steps=None, y=None, sample_weight=None, batch_size=None, shuffle=True,
               validation_split=0.0, validation_data=None, seed=None):
    """What ``Trainer.fit`` trains and validates on: ``(train, validation, steps)``. Arrays
    become ``ArrayData``; in ``fit(x, y)`` the labels arrive as the second positional
    argument ``steps``, which is then None."""
    if (is_array(x) or _array_tuple(x)) and y is None and steps is not None and (
            is_array(steps) or isinstance(steps, (list, tuple))):
        y, steps = steps, None
    if is_array(steps) or isinstance(steps, (list, tuple)):
        raise ValueError(f"`steps` must be an integer >= 1 or None, received {describe(steps)}"
                         f"; targets `y` go with array inputs x, while the batches of a "
                         f"{type(x).__name__} carry their own.")
    arrays = _arrays("x", x, y, sample_weight, batch_size, shuffle, seed)
    if isinstance(validation_split, bool) or not isinstance(
            validation_split, (int, float, np.floating)) or not 0 <= validation_split < 1:
        raise ValueError("`validation_split` must be a number in [0, 1), received "
                         f"{describe(validation_split)}.")
    if validation_split:
        if arrays is None:
            raise ValueError("`validation_split` needs array inputs; with a dataset pass "
                             "`validation_data`.")
        if validation_data is not None:
            raise ValueError("Pass `validation_split` or `validation_data`, not both.")
        arrays, validation_data = arrays.split(float(validation_split))
    elif validation_data is not None and _array_tuple(validation_data):
        validation_data = ArrayData(*validation_data, batch_size=(
            arrays.batch_size if arrays is not None else 32), shuffle=False)
    return (x if arrays is None else arrays), validation_data, steps


def plan_fit(x, steps, epochs, steps_per_epoch, validation_data, validation_freq,
             validation_steps, y, sample_weight, batch_size, shuffle, validation_split, seed,
             strategy):
    """``(train, plan, first batch)`` of a ``Trainer.fit`` call: ``fit_inputs``, the checked
    ``FitPlan`` with its steps per epoch, and the global batches checked against
    ``strategy`` (before any step runs)."""
    train, validation_data, steps = fit_inputs(x, steps, y, sample_weight, batch_size,
                                               shuffle, validation_split, validation_data,
                                               seed)
    plan = FitPlan(steps, epochs, steps_per_epoch, validation_data, validation_freq,
                   validation_steps)
    plan.set_steps_per_epoch(cardinality(train))
    batch = first_checked_batch(train, strategy, "train_ds")
    if isinstance(validation_data, ArrayData):
        check_global_batch(validation_data, strategy, "validation_data")
    return train, plan, batch


def evaluation_inputs(x, steps, y=None, sample_weight=None, batch_size=None):
    """What ``Trainer.evaluate`` (or ``predict``, with ``y`` None allowed) runs on:
    ``(data, steps)``; arrays become an unshuffled ``ArrayData``."""
    if (is_array(x) or _array_tuple(x)) and y is None and steps is not None and (
            is_array(steps) or isinstance(steps, (list, tuple))):
        y, steps = steps, None
    data = _arrays("ds", x, y, sample_weight, batch_size, False, 0)
    return (x if data is None else data), steps


def prediction_inputs(x, batch_size=None):
    """The inputs of ``Trainer.predict`` as a ``tf.data.Dataset`` of input batches: arrays (or
    a tuple ``(x, y[, sample_weight])``, whose targets are dropped) batched by ``batch_size``
    (default 32), or a dataset of inputs or of ``(x, y[, sample_weight])`` batches."""
    if _array_tuple(x):
        x = x[0]
    if is_array(x):
        size = 32 if batch_size is None else positive_int("batch_size", batch_size)
        return tf.data.Dataset.from_tensor_slices(np.asarray(x)).batch(size)
    if batch_size is not None:
        raise ValueError(f"`batch_size` is only for array inputs; `x` is a "
                         f"{type(x).__name__}.")
    if not isinstance(x, tf.data.Dataset):
        raise TypeError("`x` must be an array, a tensor or a tf.data.Dataset, received "
                        f"{describe(x)}.")
    if isinstance(x.element_spec, tuple) and len(x.element_spec) in (2, 3):
        x = x.map(lambda *batch: batch[0])
    return x


def first_checked_batch(data, strategy, name):
    """The first batch of ``data`` (named ``name`` in errors), after ``check_global_batch``."""
    batch = first_batch(data)
    check_global_batch(data if isinstance(data, ArrayData) else batch, strategy, name)
    return batch


def check_global_batch(batch, strategy, name):
    """ValueError (before any step runs) when the size of ``batch`` (a batch of ``name``) or,
    for ``ArrayData``, of any of its batches is not divisible by ``strategy``'s number of
    replicas: each replica's regularisers and batch statistics see its share, which must be
    the same for every replica."""
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas < 2:
        return
    if isinstance(batch, ArrayData):
        sizes = batch.batch_sizes()
    else:
        x = tf.nest.flatten(batch[0] if isinstance(batch, (tuple, list)) else batch)[0]
        sizes = [int(x.shape[0])] if x.shape[0] is not None else []
    bad = [size for size in sizes if size % replicas]
    if bad:
        raise ValueError(f"The global batch of {bad[0]} samples of `{name}` is not divisible "
                         f"by the {replicas} replicas of the strategy: use a batch size that "
                         f"is a multiple of {replicas} (and drop_remainder=True, or a number "
                         "of samples that the batch size divides).")


def iterate(data, skip, strategy=None, epoch=0):
    """Iterator over ``data`` (a ``tf.data.Dataset``, an ``ArrayData`` or a re-iterable of
    batches) after its first ``skip`` batches of ``epoch``, distributed over ``strategy``'s
    replicas if given."""
    if isinstance(data, ArrayData):
        data = data.dataset(epoch)
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
    if isinstance(data, ArrayData):
        return len(data)
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
    if isinstance(data, ArrayData):
        data = data.dataset(0)
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
        return iterate(data, self.position if skip else 0, self.strategy, epoch)

    def advance(self, epoch, batch_index, steps_per_epoch):
        """Counts batch ``batch_index`` of ``epoch`` as consumed; True when it ended the epoch
        (``steps_per_epoch`` reached), which then rolls over to the next one, so a checkpoint
        written now never makes a resumed run skip a whole finished epoch of data."""
        done = steps_per_epoch is not None and batch_index + 1 >= steps_per_epoch
        self.epoch, self.position = (epoch + 1, 0) if done else (epoch, batch_index + 1)
        return done

    def finish(self, epoch):
        """Ends ``epoch`` when the data ran out before ``steps_per_epoch`` rolled it over."""
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def keep_open(self, data, iterator):
        """Keeps ``iterator`` for the next fit call (an epoch cut short by ``steps``)."""
        self._open_epoch = (data, self.epoch, self.position, iterator)

    def close(self):
        self._open_epoch = None
