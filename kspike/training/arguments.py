"""Argument checks, metric resolution and the plan of a ``fit`` call of ``kspike.Trainer``
(docs/training.md). Messages never print a whole array: ``describe`` shortens what they show.
"""
import math
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

__all__ = ["describe", "positive_int", "check_model", "check_strategy", "SUPPORTED_STRATEGIES",
           "check_optimizer", "get_optimizer", "get_trainer_loss", "check_directory", "check_flag", "check_seed", "check_verbose",
           "check_rule", "check_list", "check_options", "resolve_metrics", "build_metrics", "FitPlan"]


def describe(value, limit=80):
    """A short description of ``value`` for error messages: arrays and tensors by type, shape
    and dtype, anything else by its ``repr`` cut to ``limit`` characters.

    >>> describe(np.zeros((100, 3), "int32"))
    'ndarray of shape (100, 3) and dtype int32'
    >>> describe(3)
    '3'
    """
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        try:
            shape = tuple(shape)
        except TypeError:
            shape = "unknown"
        dtype = getattr(value.dtype, "name", value.dtype)
        return f"{type(value).__name__} of shape {shape} and dtype {dtype}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def positive_int(name, value, allow_none=False):
    """``value`` as an int >= 1 (or None when ``allow_none``); ValueError naming ``name``.

    >>> positive_int("steps", 3), positive_int("steps", None, allow_none=True)
    (3, None)
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1{' or None' if allow_none else ''}"
                         f", received {describe(value)}.")
    return int(value)


# The strategies whose replicas hold mirrored copies of every variable: the Trainer's step
# (all-reduced gradients, one decision on finiteness) is written for them.
SUPPORTED_STRATEGIES = ("MirroredStrategy", "MultiWorkerMirroredStrategy", "OneDeviceStrategy",
                        "the default strategy")


def _supported(strategy):
    distribute = tf.distribute
    types = (distribute.MirroredStrategy, distribute.MultiWorkerMirroredStrategy,
             distribute.OneDeviceStrategy)
    experimental = getattr(distribute.experimental, "MultiWorkerMirroredStrategy", None)
    if experimental is not None:
        types += (experimental,)
    # The default strategy (what tf.distribute.get_strategy() gives outside any scope) has
    # no public class.
    return isinstance(strategy, types) or type(strategy).__name__ == "_DefaultDistributionStrategy"


def check_strategy(strategy):
    """TypeError unless ``strategy`` is None or one of ``SUPPORTED_STRATEGIES`` (TPU,
    parameter-server and central-storage strategies place variables in ways the Trainer's step
    does not handle)."""
    if strategy is None:
        return
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError("`strategy` must be a tf.distribute.Strategy or None, received "
                        f"{type(strategy).__name__}.")
    if not _supported(strategy):
        raise TypeError(f"`strategy` {type(strategy).__name__} is not supported by "
                        f"kspike.Trainer; use one of {', '.join(SUPPORTED_STRATEGIES)}.")


def check_model(model, strategy):
    """Checks that ``model`` is a built Keras model, built in ``strategy``'s scope."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, received {type(model).__name__}.")
    if not model.built or not model.variables:
        raise ValueError(f"`model` '{model.name}' must be built (create it from "
                         "keras.Input(...) or call it once) before training.")
    check_strategy(strategy)
    if strategy is not None:
        outside = [v for v in model.variables
                   if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))]
        if outside:
            raise ValueError("With `strategy`, build the model (and its optimizer) inside "
                             "`with strategy.scope():`; the model's variables "
                             f"{[getattr(v, 'path', v.name) for v in outside[:3]]}"
                             f"{' ...' if len(outside) > 3 else ''} were created outside it.")


def check_seed(seed):
    """``seed`` as an int or None; TypeError otherwise."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"`seed` must be an integer or None, received {describe(seed)}.")
    return None if seed is None else int(seed)


def check_verbose(verbose):
    """``verbose`` if it is 0, 1 or 2; ValueError otherwise."""
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2, received {describe(verbose)}.")
    return int(verbose)


def check_rule(rule, model, default):
    """``rule`` (``default`` when None), checked to be a LearningRule supporting ``model``."""
    from kspike.learning.base import LearningRule
    rule = default if rule is None else rule
    if not isinstance(rule, LearningRule):
        raise TypeError("`rule` must be a kspike.learning.LearningRule (e.g. "
                        f"kspike.learning.BPTT()), received {describe(rule)}.")
    rule.check_model(model)
    return rule


def check_list(name, value):
    """``value`` (None, a list or a tuple) as a list; TypeError naming ``name`` otherwise."""
    if value is not None and not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list, received {describe(value)}.")
    return list(value or [])


def check_optimizer(optimizer, given):
    """Checks the resolved ``optimizer`` (``given`` is what the user passed)."""
    if not hasattr(optimizer, "apply_gradients"):
        raise TypeError("`optimizer` must be a Keras optimizer (or a name such as 'adam'), "
                        f"received {describe(given)}.")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Learning rules return unscaled gradients, which a LossScaleOptimizer would divide
        # by its scale. kspike cells keep their states in float32 under mixed precision.
        raise ValueError("`optimizer` is a LossScaleOptimizer, which kspike.Trainer does not "
                         "support: pass the inner optimizer "
                         f"({type(optimizer.inner_optimizer).__name__}); under "
                         "'mixed_bfloat16' no loss scaling is needed.")


def get_optimizer(optimizer):
    """``optimizer`` (an optimizer object or a name such as "adam"), checked."""
    resolved = keras.optimizers.get(optimizer) if isinstance(optimizer, str) else optimizer
    check_optimizer(resolved, optimizer)
    return resolved


def get_trainer_loss(loss):
    """``loss`` (a Keras loss object, name or function) as the Trainer uses it: unscaled
    (``kspike.losses.UnscaledLoss``)."""
    from kspike.losses import UnscaledLoss, get_loss
    if loss is None:
        raise ValueError("`loss` is required, e.g. "
                         "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
    return UnscaledLoss(get_loss(loss))


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
        raise TypeError(f"`{name}` must be True or False, received {describe(value)}.")
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
                raise ValueError(f"`metrics` entry {describe(identifier)} is not a Keras metric "
                                 f"({error}).") from None
            if not isinstance(metric, keras.metrics.Metric):
                name = identifier if isinstance(identifier, str) else metric.__name__
                metric = keras.metrics.MeanMetricWrapper(metric, name=name)
        metrics.append(metric)
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"`metrics` have duplicate names {names}.")
    return metrics


def check_options(checkpoint_dir, log_dir, checkpoint_every, keep_checkpoints, seed, log_every,
                  skip_on_resume, verbose, override_learning_rate, check_numerics):
    """The Trainer's options checked, as a dict of attribute values (paths as strings)."""
    return {
        "checkpoint_dir": check_directory("checkpoint_dir", checkpoint_dir,
                                          "a directory (it is created if missing)"),
        "log_dir": check_directory("log_dir", log_dir, "a directory"),
        "checkpoint_every": positive_int("checkpoint_every", checkpoint_every, True),
        "keep_checkpoints": positive_int("keep_checkpoints", keep_checkpoints),
        "log_every": positive_int("log_every", log_every),
        "seed": check_seed(seed),
        "verbose": check_verbose(verbose),
        "skip_on_resume": check_flag("skip_on_resume", skip_on_resume),
        "override_learning_rate": check_flag("override_learning_rate", override_learning_rate),
        "check_numerics": check_flag("check_numerics", check_numerics)}


def build_metrics(identifiers, loss, model, x, y, outputs):
    """``resolve_metrics`` for the predictions the loss receives: the model's output for
    inputs like ``x`` (its spec, not a call, so stateful layers keep their states) mapped by
    ``outputs`` (the rule's ``loss_outputs``)."""
    try:
        spec = model.compute_output_spec(tf.nest.map_structure(
            lambda t: keras.KerasTensor(tuple(t.shape), t.dtype), x))
        spec = tf.nest.flatten(spec)[0]
        predictions = tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)
    except Exception:  # noqa: BLE001 - e.g. a subclassed model: run one sample
        predictions = tf.nest.flatten(model(tf.nest.map_structure(lambda t: t[:1], x)))[0]
    predictions = tf.nest.flatten(outputs(predictions))[0]
    return resolve_metrics(identifiers, loss, tf.convert_to_tensor(y), predictions)


class FitPlan:
    """The targets of one ``fit`` call (steps, epochs, steps per epoch, validation), checked,
    and the callbacks and model proxy the loop uses."""

    def __init__(self, steps, epochs, steps_per_epoch, validation_data, validation_freq,
                 validation_steps):
        self.steps = positive_int("steps", steps, True)
        self.epochs = positive_int("epochs", epochs, True)
        self.steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch, True)
        self.validation_freq = positive_int("validation_freq", validation_freq)
        self.validation_steps = positive_int("validation_steps", validation_steps, True)
        self.validation_data = validation_data
        if self.steps is None and self.epochs is None:
            self.epochs = 1
        self.proxy = self.callbacks = None

    def set_steps_per_epoch(self, length):
        """Fills in ``steps_per_epoch`` from the data's length (None when unknown: an epoch
        then ends with the data)."""
        if self.steps_per_epoch is not None:
            return
        if length == math.inf:
            if self.steps is None:
                raise ValueError("`train_ds` is infinite: pass `steps` or `steps_per_epoch`.")
            self.steps_per_epoch = self.steps
        else:
            self.steps_per_epoch = length

    def total_epochs(self, epoch):
        """Number of epochs shown by the progress bar, from the current ``epoch``."""
        if self.epochs is not None:
            return self.epochs
        if self.steps_per_epoch is not None:
            return max(1, math.ceil(self.steps / self.steps_per_epoch))
        return max(epoch + 1, 1)

    def done(self, trainer):
        return ((self.steps is not None and trainer.step >= self.steps)
                or (self.epochs is not None and trainer.epoch >= self.epochs)
                or self.proxy.stop_training)
