"""TensorBoard scalars, progress-bar logs, epoch means and callbacks of ``kspike.Trainer``
(docs/training.md).

Scalars go to ``log_dir/train`` (per step and ``epoch_*`` per epoch) and ``log_dir/validation``.
The progress bar shows the overall ``firing_rate`` (Hz) but not the per-layer rates, which are
in TensorBoard. Logs are never worth a run: when writing them fails (a full disk), a warning is
shown once and training goes on without them.

Example:

>>> progress_logs({"loss": 0.5, "firing_rate": 12.0, "firing_rate/alif0": 9.0,
...                "firing_rate/alif1": 15.0})
{'loss': 0.5, 'firing_rate': 12.0}
"""
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from kspike import compat, graph

__all__ = ["ScalarLogger", "progress_logs", "EpochMeans", "epoch_logs", "learning_rate", "active_connections",
           "CallbackModel", "callback_list"]


def _scalar_metadata():
    # TensorBoard's scalar-plugin metadata, built here so writing logs needs only TensorFlow
    # (the `tensorboard` package is needed to view them, not to write them).
    from tensorflow.core.framework import summary_pb2
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)


_SCALAR_METADATA = _scalar_metadata()


def progress_logs(logs):
    """``logs`` without per-layer firing rates (``firing_rate_<layer>`` or
    ``firing_rate/<layer>``): what the progress bar shows."""
    return {k: v for k, v in logs.items()
            if not (k.startswith("firing_rate_") or k.startswith("firing_rate/"))}


class ScalarLogger:
    """TensorBoard scalar writer, one ``tf.summary`` file writer per sub-directory.

    Args:
        log_dir: the TensorBoard directory, or None (nothing is written).
        enabled: callable returning False where this process must not write (the non-chief
            workers of a multi-worker strategy).
    """

    def __init__(self, log_dir, enabled=lambda: True):
        self.log_dir = log_dir
        self.enabled = enabled
        self._writers = None
        self.failure = None

    def writer(self, name):
        """The file writer of ``log_dir/name``, or None when nothing is written."""
        if self.log_dir is None or self.failure is not None or not self.enabled():
            return None
        if self._writers is None:
            self._writers = {}
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def write(self, name, logs, step):
        """Writes the scalars ``logs`` ({tag: float or None}) at ``step`` to ``log_dir/name``."""
        try:
            writer = self.writer(name)
            if writer is None:
                return
            with writer.as_default(step=step):
                for key, value in logs.items():
                    if value is not None:
                        tf.summary.write(key, tf.constant(float(value), tf.float32), step=step,
                                         metadata=_SCALAR_METADATA)
            writer.flush()
        except (tf.errors.OpError, OSError) as error:
            self._fail(error)

    def write_step(self, logs, optimizer, step):
        """The per-step scalars of ``log_dir/train``: ``logs`` and the learning rate."""
        if self.log_dir is not None:
            self.write("train", dict(logs, learning_rate=learning_rate(optimizer)), step)

    def write_epoch(self, epoch_logs, optimizer, step):
        """Adds the learning rate to ``epoch_logs`` (when the optimizer has one) and writes
        them, without the ``val_`` ones, as ``epoch_*`` scalars of ``log_dir/train``."""
        rate = epoch_logs.setdefault("learning_rate", learning_rate(optimizer))
        if rate is None:
            del epoch_logs["learning_rate"]
        self.write("train", {f"epoch_{k}": v for k, v in epoch_logs.items()
                             if not k.startswith("val_")}, step)

    def flush(self):
        """Flushes every writer (a failure is reported as in ``write``)."""
        try:
            for writer in (self._writers or {}).values():
                writer.flush()
        except (tf.errors.OpError, OSError) as error:
            self._fail(error)

    def _fail(self, error):
        if self.failure is None:
            self.failure = error
            warnings.warn(f"Writing TensorBoard logs to {self.log_dir} failed "
                          f"({type(error).__name__}: {getattr(error, 'message', error)}); "
                          "training and checkpoints go on without logs.", stacklevel=3)


class EpochMeans:
    """Running means of an epoch's step logs (metrics are running means already: their last
    value is kept).

    >>> means = EpochMeans(["accuracy"])
    >>> means.add({"loss": 1.0, "accuracy": 0.5}); means.add({"loss": 3.0, "accuracy": 0.7})
    >>> means.means()
    {'loss': 2.0, 'accuracy': 0.7}
    """

    def __init__(self, metric_names):
        self.metric_names = set(metric_names)
        self.sums, self.count = {}, 0

    def add(self, logs):
        self.count += 1
        for key, value in logs.items():
            if key in self.metric_names:
                self.sums[key] = value * self.count
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self):
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


def learning_rate(optimizer):
    """The optimizer's current learning rate as a float, or None when it has none."""
    try:
        return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    except (AttributeError, TypeError, ValueError):
        return None


def epoch_logs(means, model):
    """The logs of an epoch: the step logs' ``EpochMeans`` and, for rewired models, the number
    of active connections."""
    logs = means.means()
    active = active_connections(model)
    if active is not None:
        logs["active_connections"] = active
    return logs


def active_connections(model):
    """The number of active connections of ``model``'s rewired kernels (``kspike.DeepR``), or
    None when no spiking cell has rewired kernels."""
    rewired = any(graph.spiking_cell_of(layer) is not None
                  and graph.spiking_cell_of(layer).rewired_kernels
                  for layer in compat.nested_layers(model))
    if not rewired:
        return None
    from kspike import rewiring
    return int(rewiring.active_connections(model))


class CallbackModel:
    """What Keras callbacks see as ``self.model``: the model, with the Trainer's optimizer and
    a ``stop_training`` flag, without modifying the user's model object."""

    def __init__(self, model, optimizer):
        self.__dict__["_model"] = model
        self.__dict__["optimizer"] = optimizer
        self.__dict__["stop_training"] = False

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def __setattr__(self, name, value):
        if name in ("optimizer", "stop_training", "history"):
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["_model"], name, value)


def callback_list(callbacks, model, optimizer, verbose, epochs, steps):
    """``(CallbackList, History, CallbackModel)`` of a fit call: the user's ``callbacks``, a
    History and, unless ``verbose`` is 0, a progress bar, all seeing a ``CallbackModel``."""
    proxy = CallbackModel(model, optimizer)
    callbacks = keras.callbacks.CallbackList(
        list(callbacks or []), add_history=True, add_progbar=verbose != 0, model=proxy,
        verbose=verbose, epochs=epochs, steps=steps)
    history = next(cb for cb in callbacks.callbacks if isinstance(cb, keras.callbacks.History))
    return callbacks, history, proxy
