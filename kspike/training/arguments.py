"""Argument checks and metric resolution of ``kspike.Trainer`` (docs/training.md)."""
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

__all__ = ["positive_int", "check_model", "check_optimizer", "check_directory",
           "check_flag", "resolve_metrics"]


def positive_int(name, value, allow_none=False):
    """``value`` as an int >= 1 (or None when ``allow_none``); ValueError naming ``name``.

    >>> positive_int("steps", 3), positive_int("steps", None, allow_none=True)
    (3, None)
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1{' or None' if allow_none else ''}"
                         f", received {value!r}.")
    return int(value)


def check_model(model, strategy):
    """Checks that ``model`` is a built Keras model, built in ``strategy``'s scope."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, received {type(model).__name__}.")
    if not model.built or not model.variables:
        raise ValueError(f"`model` '{model.name}' must be built (create it from "
                         "keras.Input(...) or call it once) before training.")
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError("`strategy` must be a tf.distribute.Strategy or None, received "
                        f"{type(strategy).__name__}.")
    if strategy is not None:
        first = model.variables[0]
        first = getattr(first, "value", first)
        if not strategy.extended.variable_created_in_scope(first):
            raise ValueError("With `strategy`, build the model (and its optimizer) inside "
                             "`with strategy.scope():`; the model's variables were created "
                             "outside it.")


def check_optimizer(optimizer, given):
    """Checks the resolved ``optimizer`` (``given`` is what the user passed)."""
    if not hasattr(optimizer, "apply_gradients"):
        raise TypeError("`optimizer` must be a Keras optimizer (or a name such as 'adam'), "
                        f"received {given!r}.")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Learning rules return unscaled gradients, which a LossScaleOptimizer would divide
        # by its scale. kspike cells keep their states in float32 under mixed precision.
        raise ValueError("`optimizer` is a LossScaleOptimizer, which kspike.Trainer does not "
                         "support: pass the inner optimizer "
                         f"({type(optimizer.inner_optimizer).__name__}); under "
                         "'mixed_bfloat16' no loss scaling is needed.")


def check_directory(name, path, expected):
    """``path`` as a string (None stays None). ValueError if it is a file, lies below a
    regular file, or cannot be created or written to (checked now, not hours later at the
    first save); nothing is created."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"`{name}` {path!r} is a file; expected {expected}.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"`{name}` {path!r} lies below the regular file {existing!r}; "
                         f"expected {expected}.")
    try:
        # A real probe: os.access says yes to root even where nothing can be created.
        with tempfile.TemporaryFile(dir=existing, prefix=".kspike-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"`{name}` {path!r} is not writable: {existing!r} takes no new "
                         f"files ({error.strerror}); expected {expected}.") from None
    return path


def check_flag(name, value):
    """``value`` as a bool; TypeError naming ``name`` unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, received {value!r}.")
    return bool(value)


def _accuracy(loss, y, predictions):
    loss_name = type(loss).__name__.lower() + str(getattr(loss, "name", "")).lower()
    if "sparse" in loss_name or len(y.shape) == len(predictions.shape) - 1:
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    if "binary" in loss_name or predictions.shape[-1] == 1:
        return keras.metrics.BinaryAccuracy(name="accuracy")
    return keras.metrics.CategoricalAccuracy(name="accuracy")


def resolve_metrics(identifiers, loss, y, predictions):
    """Keras metric objects for ``identifiers`` ("accuracy" picks the sparse, categorical or
    binary accuracy that fits ``loss``, labels ``y`` and ``predictions``)."""
    metrics = []
    for identifier in identifiers:
        if isinstance(identifier, str) and identifier in ("accuracy", "acc"):
            metric = _accuracy(loss, y, predictions)
        elif isinstance(identifier, keras.metrics.Metric):
            metric = identifier
        else:
            try:
                metric = keras.metrics.get(identifier)
            except (ValueError, TypeError) as error:
                raise ValueError(f"`metrics` entry {identifier!r} is not a Keras metric "
                                 f"({error}).") from None
            if not isinstance(metric, keras.metrics.Metric):
                name = identifier if isinstance(identifier, str) else metric.__name__
                metric = keras.metrics.MeanMetricWrapper(metric, name=name)
        metrics.append(metric)
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"`metrics` have duplicate names {names}.")
    return metrics
