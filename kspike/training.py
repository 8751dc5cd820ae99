"""``kspike.Trainer``: the training loop for long spiking-network runs.

The loop a researcher leaves running for days: one ``tf.function`` train step (traced once),
any ``kspike.learning`` rule, kspike regularisers, Keras metrics and callbacks, a progress bar
with the firing rate, TensorBoard scalars, atomic checkpoints that resume, a guard against
non-finite losses, and ``tf.distribute`` strategies.
"""
import json
import math
import os
import re
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from kspike import regularizers as _regularizers
from kspike.learning.base import LearningRule
from kspike.learning.bptt import BPTT, firing_rate_logs, model_losses

__all__ = ["Trainer", "NonFiniteLossError", "latest_checkpoint"]

_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{10})$")
_MARKER = "kspike_checkpoint.json"
_TMP_PREFIX = ".kspike-tmp-"


def _scalar_metadata():
    # TensorBoard's scalar-plugin metadata, built here so writing logs needs only TensorFlow
    # (the `tensorboard` package is needed to view them, not to write them).
    from tensorflow.core.framework import summary_pb2
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)


_SCALAR_METADATA = _scalar_metadata()


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient; the offending update was not applied."""


# --------------------------------------------------------------------------- checkpoints
def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoints(directory):
    """[(step, path)] of the complete kspike checkpoints in ``directory``, oldest first."""
    found = []
    if not os.path.isdir(directory):
        return found
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        path = os.path.join(directory, name)
        if match and os.path.isfile(os.path.join(path, _MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory):
    """Path of the newest complete kspike checkpoint in ``directory``, or None."""
    found = _checkpoints(directory)
    return found[-1][1] if found else None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _CheckpointWriter:
    """Writes ``ckpt-<step>`` directories atomically: everything goes to a temporary directory
    in the same folder, is fsync-ed, then renamed in one step, so a crash mid-write leaves the
    previous checkpoint as the latest. Only directories this class created are ever removed."""

    def __init__(self, directory, keep):
        self.directory = os.fspath(directory)
        self.keep = keep

    def remove_stale_temporaries(self):
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            match = re.match(re.escape(_TMP_PREFIX) + r"(\d+)-", name)
            path = os.path.join(self.directory, name)
            if match and os.path.isdir(path) and not _pid_alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, checkpoint, step, metadata):
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"ckpt-{step:010d}")
        if os.path.exists(final):
            # The same step was saved already (end of an epoch that is also a save step, or
            # a rerun of a finished run): the state is the same, keep the existing files.
            return final
        tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=self.directory)
        try:
            checkpoint.write(os.path.join(tmp, "state"))
            with open(os.path.join(tmp, _MARKER), "w") as handle:
                json.dump(metadata, handle, indent=1)
            for name in os.listdir(tmp):
                _fsync_path(os.path.join(tmp, name))
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in _checkpoints(self.directory)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# --------------------------------------------------------------------------- helpers
class _UnscaledLoss:
    """A Keras loss that returns the mean over the replica's own batch.

    Keras losses divide their value by the number of replicas when called under a
    ``tf.distribute`` strategy; the Trainer scales gradients itself (so the same holds for
    regularisers and plain callables) and logs true loss values, so it undoes that here."""

    def __init__(self, loss):
        self.loss = loss
        self.name = getattr(loss, "name", "loss")

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = self.loss(y_true, y_pred, sample_weight=sample_weight)
        if getattr(self.loss, "reduction", None) in ("sum_over_batch_size", "mean",
                                                      "mean_with_sample_weight"):
            from keras.src.losses.loss import unscale_loss_for_distribution
            value = unscale_loss_for_distribution(value)
        return value


class _FunctionLoss(keras.losses.Loss):
    """A plain ``loss(y_true, y_pred)`` function as a Keras loss (per-sample values are
    averaged over the batch, sample weights applied by Keras)."""

    def __init__(self, fn, name=None):
        super().__init__(name=name or getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


class _CallbackModel:
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


def _unpack(batch):
    if isinstance(batch, (list, tuple)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        return x, y, (batch[2] if len(batch) == 3 else None)
    raise ValueError("Each batch must be a tuple (x, y) or (x, y, sample_weight), with x "
                     f"shaped (batch, time, features); received {type(batch).__name__} "
                     f"{_describe(batch)}.")


def _describe(value):
    try:
        return str(tf.nest.map_structure(lambda t: tuple(getattr(t, "shape", ())), value))
    except (TypeError, ValueError):
        return repr(value)[:100]


def _float(value):
    return float(np.asarray(value))


class Trainer:
    """Trains a Keras model of kspike layers with any ``kspike.learning`` rule.

    Args:
        model: a built Keras model (functional or Sequential for firing-rate logging and
            regularisers); under a strategy, built inside ``strategy.scope()``.
        optimizer: a Keras optimizer, its name, or a wrapper such as ``kspike.DeepR`` (used as
            given: gradients go to its ``apply_gradients``).
        loss: a Keras loss (object, name or ``fn(y_true, y_pred)``), e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.
        rule: a ``kspike.learning.LearningRule``; default ``kspike.learning.BPTT()``.
        regularizers: list of kspike regularisers (``kspike.FiringRateRegularizer``, ...).
        metrics: list of Keras metrics or names ("accuracy" picks the sparse, categorical or
            binary accuracy that fits the loss and labels).
        checkpoint_dir: directory of the checkpoints (None: no checkpoints). ``fit`` resumes
            from its latest checkpoint.
        log_dir: TensorBoard directory (None: no logs); scalars go to ``log_dir/train`` (per
            step) and ``log_dir/validation`` (per epoch).
        strategy: a ``tf.distribute.Strategy`` (MirroredStrategy, MultiWorkerMirroredStrategy);
            each global batch is split across the replicas, and regularisers see each
            replica's share of the batch. In a multi-worker run only the chief writes to
            ``checkpoint_dir`` and ``log_dir``.
        checkpoint_every: save every this many steps (int > 0); None saves at the end of each
            epoch. A checkpoint is always written when ``fit`` ends.
        keep_checkpoints: number of checkpoints kept (int >= 1); older kspike checkpoints in
            ``checkpoint_dir`` are removed, nothing else is touched.
        seed: integer: ``fit`` calls ``keras.utils.set_random_seed(seed)`` before training
            (a resumed run then restores the random generators from its checkpoint).
        log_every: write per-step TensorBoard scalars every this many steps (int > 0).
        skip_on_resume: when resuming in the middle of an epoch, skip the batches that epoch
            had consumed (an exact continuation for datasets that repeat their order). False
            starts the epoch's data afresh: faster for long streams such as an infinite
            synthetic task, where skipping means regenerating every consumed batch.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Checkpoints hold the model's and the optimizer's variables, the step, epoch and position in
    the epoch, and the states of TensorFlow's and Keras' global random generators. On resume the
    data of the interrupted epoch is skipped up to the saved position, so a dataset that gives
    the same order each time it is iterated (unshuffled, or shuffled with a fixed seed and
    ``reshuffle_each_iteration=False``) continues exactly where it stopped. NumPy's and
    Python's random states and tf.data's internal shuffle buffers are not saved.

    Example:

    >>> trainer = kspike.Trainer(model, keras.optimizers.Adam(1e-3),
    ...                          keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...                          regularizers=[kspike.FiringRateRegularizer(0.01, 0.1)],
    ...                          metrics=["accuracy"], checkpoint_dir="runs/a/ckpt",
    ...                          log_dir="runs/a/logs")
    >>> history = trainer.fit(train_ds, steps=36000, validation_data=test_ds)
    """

    def __init__(self, model, optimizer="adam", loss=None, rule=None, regularizers=None,
                 metrics=None, checkpoint_dir=None, log_dir=None, strategy=None,
                 checkpoint_every=None, keep_checkpoints=2, seed=None, log_every=1,
                 skip_on_resume=True, verbose=1):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model, received {type(model).__name__}.")
        if not model.built or not model.variables:
            raise ValueError(f"`model` '{model.name}' must be built (create it from "
                             "keras.Input(...) or call it once) before training.")
        self.model = model
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError("`strategy` must be a tf.distribute.Strategy or None, received "
                            f"{type(strategy).__name__}.")
        self.strategy = strategy
        if strategy is not None:
            first = model.variables[0]
            first = getattr(first, "value", first)
            if not strategy.extended.variable_created_in_scope(first):
                raise ValueError("With `strategy`, build the model (and its optimizer) inside "
                                 "`with strategy.scope():`; the model's variables were created "
                                 "outside it.")
        with self._scope():
            self.optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) \
                else optimizer
        if not hasattr(self.optimizer, "apply_gradients"):
            raise TypeError("`optimizer` must be a Keras optimizer (or a name such as 'adam'), "
                            f"received {optimizer!r}.")
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Learning rules return unscaled gradients, which a LossScaleOptimizer would divide
            # by its scale. kspike cells keep their states in float32 under mixed precision.
            raise ValueError("`optimizer` is a LossScaleOptimizer, which kspike.Trainer does not "
                             "support: pass the inner optimizer "
                             f"({type(self.optimizer.inner_optimizer).__name__}); under "
                             "'mixed_bfloat16' no loss scaling is needed.")
        if loss is None:
            raise ValueError("`loss` is required, e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
        self.loss = _UnscaledLoss(self._get_loss(loss))
        rule = BPTT() if rule is None else rule
        if not isinstance(rule, LearningRule):
            raise TypeError("`rule` must be a kspike.learning.LearningRule (e.g. "
                            f"kspike.learning.BPTT()), received {rule!r}.")
        rule.check_model(model)
        self.rule = rule
        self.regularizers = _regularizers._check_regularizers(regularizers)
        if metrics is not None and not isinstance(metrics, (list, tuple)):
            raise TypeError(f"`metrics` must be a list, received {metrics!r}.")
        self._metric_identifiers = list(metrics or [])
        self.metrics = None
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        if self.checkpoint_dir is not None and os.path.isfile(self.checkpoint_dir):
            raise ValueError(f"`checkpoint_dir` {self.checkpoint_dir!r} is a file; expected a "
                             "directory (it is created if missing).")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        if self.log_dir is not None and os.path.isfile(self.log_dir):
            raise ValueError(f"`log_dir` {self.log_dir!r} is a file; expected a directory.")
        self.checkpoint_every = self._positive_int("checkpoint_every", checkpoint_every, True)
        self.keep_checkpoints = self._positive_int("keep_checkpoints", keep_checkpoints)
        self.log_every = self._positive_int("log_every", log_every)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int,
                                                                                 np.integer))):
            raise TypeError(f"`seed` must be an integer or None, received {seed!r}.")
        self.seed = seed
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, received {verbose!r}.")
        self.verbose = verbose
        if not isinstance(skip_on_resume, (bool, np.bool_)):
            raise TypeError(f"`skip_on_resume` must be True or False, received "
                            f"{skip_on_resume!r}.")
        self.skip_on_resume = bool(skip_on_resume)
        self._open_epoch = None
        self.step = 0
        self.epoch = 0
        self._position = 0
        self._train_function = None
        self._eval_function = None
        # How often the train and evaluate steps were traced: 1 each when every batch has the
        # same shape, 2 with a partial last batch, whatever the number of steps.
        self.trace_counts = {"train": 0, "evaluate": 0}
        self._writers = None
        self._last_saved_step = None
        self._restored = False
        # Values of the most recent step (not epoch means): loss, metrics so far, rates.
        self.last_step_logs = {}
        self._rewired = self._has_rewired_kernels()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _positive_int(name, value, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1{' or None' if allow_none else ''}"
                             f", received {value!r}.")
        return int(value)

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else _NullScope()

    @staticmethod
    def _get_loss(loss):
        if isinstance(loss, keras.losses.Loss):
            return loss
        if isinstance(loss, str):
            try:
                fn = keras.losses.get(loss)
            except ValueError as error:
                raise ValueError(f"`loss` {loss!r} is not a Keras loss name ({error}).") from None
            if isinstance(fn, keras.losses.Loss):
                return fn
            return _FunctionLoss(fn, name=loss)
        if callable(loss):
            return _FunctionLoss(loss)
        raise TypeError(f"`loss` must be a Keras loss, a loss name or a callable, received "
                        f"{loss!r}.")

    def _resolve_metrics(self, y, predictions):
        metrics = []
        loss_name = (type(self.loss.loss).__name__.lower()
                     + str(getattr(self.loss.loss, "name", "")).lower())
        for identifier in self._metric_identifiers:
            if isinstance(identifier, str) and identifier in ("accuracy", "acc"):
                y_rank = len(y.shape)
                p_rank = len(predictions.shape)
                if "sparse" in loss_name or y_rank == p_rank - 1:
                    metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
                elif "binary" in loss_name or predictions.shape[-1] == 1:
                    metric = keras.metrics.BinaryAccuracy(name="accuracy")
                else:
                    metric = keras.metrics.CategoricalAccuracy(name="accuracy")
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

    def _has_rewired_kernels(self):
        for layer in self.model._flatten_layers(include_self=False):
            if getattr(getattr(layer, "cell", None), "_rewired", None):
                return True
        return False

    def _active_connections(self):
        if not self._rewired:
            return None
        try:
            from kspike import rewiring
        except ImportError:
            return None
        count = getattr(rewiring, "active_connections", None)
        return None if count is None else int(count(self.model))

    def _learning_rate(self):
        try:
            return _float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            return None

    # ------------------------------------------------------------------ step functions
    def _replica_train(self, x, y, sample_weight):
        result = self.rule.compute(self.model, x, y, self.loss, sample_weight=sample_weight,
                                   regularizers=self.regularizers, training=True)
        variables = self.model.trainable_variables
        if len(result.gradients) != len(variables):
            raise ValueError(f"{self.rule!r} returned {len(result.gradients)} gradients for "
                             f"{len(variables)} trainable variables.")
        pairs = [(g, v) for g, v in zip(result.gradients, variables) if g is not None]
        replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        if replicas > 1:
            # The optimizer sums gradients over replicas; each replica's loss is the mean over
            # its share of the batch, so 1/replicas makes the sum the global-batch gradient.
            pairs = [(g / replicas, v) for g, v in pairs]
        loss = tf.cast(result.loss, tf.float32)
        # One sum per gradient: NaN or inf anywhere makes its sum non-finite (a sum above
        # 3e38 counts as non-finite too, which such a gradient is in practice).
        sums = [tf.reduce_sum(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g,
                                      tf.float32)) for g, _ in pairs]
        finite = tf.reduce_all(tf.math.is_finite(tf.stack([tf.reshape(loss, [])] + sums)))
        finite = self._apply_if_finite(pairs, finite)
        for metric in self.metrics:
            metric.update_state(y, result.predictions, sample_weight=sample_weight)
        logs = {"loss": loss}
        logs.update({k: tf.cast(v, tf.float32) for k, v in result.logs.items()})
        logs["finite"] = tf.cast(finite, tf.float32)
        return logs

    def _apply_if_finite(self, pairs, finite):
        """Applies the gradients only if every replica's loss and gradients are finite;
        returns that decision."""
        gradients = [g for g, _ in pairs]
        variables = [v for _, v in pairs]

        def apply():
            self.optimizer.apply_gradients(zip(gradients, variables))

        if self.strategy is None:
            tf.cond(finite, lambda: (apply(), tf.constant(True))[1], lambda: tf.constant(False))
            return finite
        context = tf.distribute.get_replica_context()
        failures = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      1.0 - tf.cast(finite, tf.float32))
        finite = failures < 0.5  # every replica takes the same decision

        def cross_replica(distribution, gradients, finite):
            # A cond whose branch applies gradients must run in cross-replica context: the
            # optimizer's update calls merge_call, which a replica-context cond cannot hold.
            flag = distribution.experimental_local_results(finite)[0]

            def apply_all():
                distribution.extended.call_for_each_replica(
                    lambda g: self.optimizer.apply_gradients(zip(g, variables)),
                    args=(gradients,))
                return tf.constant(True)

            tf.cond(flag, apply_all, lambda: tf.constant(False))

        context.merge_call(cross_replica, args=(gradients, finite))
        return finite

    def _replica_eval(self, x, y, sample_weight):
        try:
            predictions, activities = _regularizers.record_activity(self.model, x,
                                                                    training=False)
        except ValueError:
            if self.regularizers:
                raise
            predictions, activities = self.model(x, training=False), []
        loss = tf.cast(self.loss(y, predictions, sample_weight=sample_weight), tf.float32)
        loss = loss + _regularizers.total_penalty(self.regularizers, activities)
        loss = loss + model_losses(self.model)
        for metric in self.metrics:
            metric.update_state(y, predictions, sample_weight=sample_weight)
        logs = {"loss": loss}
        logs.update(firing_rate_logs(activities))
        return logs

    def _make_function(self, kind, replica_fn):
        def step(batch):
            # Counts traces (Python runs only while tracing): tests assert one trace per fit.
            self.trace_counts[kind] += 1
            if self.strategy is None:
                logs = replica_fn(*_unpack(batch))
            else:
                per_replica = self.strategy.run(lambda b: replica_fn(*_unpack(b)),
                                                args=(batch,))
                logs = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                        for k, v in per_replica.items()}
            for metric in self.metrics:
                logs[metric.name] = tf.cast(metric.result(), tf.float32)
            return logs
        # Traced for the shapes of the first batch (fully known shapes run measurably faster
        # than a signature with an unknown batch size); a batch of another shape (the last,
        # partial one) makes one more, shape-generic trace that every later shape reuses.
        return tf.function(step, reduce_retracing=True)

    def _prepare(self, batch):
        """Checks the first batch and builds metrics, optimizer variables and step functions."""
        x, y, _ = _unpack(batch)
        if isinstance(x, (tf.Tensor, np.ndarray)) and len(x.shape) != 3:
            raise ValueError("Inputs x must be shaped (batch, time, features), received shape "
                             f"{tuple(x.shape)}.")
        if self.metrics is None:
            with self._scope():
                try:
                    predictions = self.model.compute_output_spec(
                        tf.nest.map_structure(
                            lambda t: keras.KerasTensor(tuple(t.shape), t.dtype), x))
                except Exception:  # noqa: BLE001 - e.g. a subclassed model: run one sample
                    predictions = self.model(tf.nest.map_structure(lambda t: t[:1], x))
                self.metrics = self._resolve_metrics(tf.convert_to_tensor(y),
                                                     tf.nest.flatten(predictions)[0])
                if not getattr(self.optimizer, "built", True):
                    self.optimizer.build(self.model.trainable_variables)
            try:
                _regularizers.activity_probe(self.model)  # built once, outside tf.function
            except ValueError:
                if self.regularizers:
                    raise
        if self._train_function is None:
            self._train_function = self._make_function("train", self._replica_train)
            self._eval_function = self._make_function("evaluate", self._replica_eval)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_object(self):
        objects = {"model": self.model, "optimizer": self.optimizer,
                   "tf_rng": tf.random.get_global_generator()}
        if isinstance(self.rule, tf.Module):
            # Rules with state of their own (e.g. e-prop's adaptive feedback matrices).
            objects["rule"] = self.rule
        try:
            from keras.src.random import seed_generator
            generator = seed_generator.global_seed_generator()
            objects["keras_rng"] = generator.state.value
        except (ImportError, AttributeError):
            pass
        return tf.train.Checkpoint(**objects)

    def _is_chief(self):
        """False on the non-chief workers of a multi-worker strategy (they take part in
        saving, as tf.distribute requires, but write to a scratch directory)."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        task_type = getattr(resolver, "task_type", None)
        if not task_type:
            return True
        if task_type == "chief":
            return True
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        return task_type == "worker" and not has_chief and resolver.task_id == 0

    def _save(self, loss=None):
        if self.checkpoint_dir is None or self._last_saved_step == self.step:
            return None
        metadata = {"step": self.step, "epoch": self.epoch, "position": self._position,
                    "loss": loss, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "model": self.model.name}
        if self._is_chief():
            path = _CheckpointWriter(self.checkpoint_dir, self.keep_checkpoints).save(
                self._checkpoint_object(), self.step, metadata)
        else:
            scratch = tempfile.mkdtemp(prefix="kspike-worker-")
            try:
                path = _CheckpointWriter(scratch, 1).save(self._checkpoint_object(), self.step,
                                                          metadata)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self._last_saved_step = self.step
        return path

    def _restore(self):
        if self.checkpoint_dir is None:
            return None
        writer = _CheckpointWriter(self.checkpoint_dir, self.keep_checkpoints)
        writer.remove_stale_temporaries()
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None or self._restored:
            return None
        marker = os.path.join(path, _MARKER)
        try:
            with open(marker) as handle:
                metadata = json.load(handle)
            step, epoch, position = (int(metadata["step"]), int(metadata["epoch"]),
                                     int(metadata["position"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"Checkpoint {path!r} is unreadable: {marker} is not valid kspike "
                             f"checkpoint metadata ({error}).") from None
        with self._scope():
            if not getattr(self.optimizer, "built", True):
                self.optimizer.build(self.model.trainable_variables)
        try:
            status = self._checkpoint_object().read(os.path.join(path, "state"))
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(f"Checkpoint {path!r} does not match this model and optimizer "
                             f"(was it written by another model?): {error}") from None
        self.step, self.epoch, self._position = step, epoch, position
        self._last_saved_step = step
        self._restored = True
        return path

    # ------------------------------------------------------------------ data
    def _iterate(self, data, skip):
        if isinstance(data, tf.data.Dataset):
            if skip:
                data = data.skip(skip)
            if self.strategy is not None:
                data = self.strategy.experimental_distribute_dataset(data)
            return iter(data)
        if self.strategy is not None:
            raise TypeError("With `strategy`, the data must be a tf.data.Dataset, received "
                            f"{type(data).__name__}.")
        if isinstance(data, (tf.Tensor, np.ndarray)) or not hasattr(data, "__iter__"):
            raise TypeError("The data must be a tf.data.Dataset or an iterable of (x, y) "
                            f"batches, received {type(data).__name__}.")
        iterator = iter(data)
        for _ in range(skip):
            next(iterator, None)
        return iterator

    def _open_iterator(self, data, epoch):
        """Iterator of the current epoch at the saved position: the still-open iterator of a
        previous fit call, or a new one that skips the batches consumed before a resume."""
        if self._open_epoch is not None:
            previous, open_epoch, position, iterator = self._open_epoch
            self._open_epoch = None
            if previous is data and open_epoch == epoch and position == self._position:
                return iterator
        return self._iterate(data, self._position if self.skip_on_resume else 0)

    @staticmethod
    def _cardinality(data):
        if isinstance(data, tf.data.Dataset):
            n = int(data.cardinality())
            if n == tf.data.INFINITE_CARDINALITY:
                return math.inf
            return None if n < 0 else n
        try:
            return len(data)
        except TypeError:
            return None

    def _first_batch(self, data):
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

    # ------------------------------------------------------------------ logging
    def _writer(self, name):
        if self.log_dir is None or not self._is_chief():
            return None
        if self._writers is None:
            self._writers = {}
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def _write_scalars(self, name, logs, step):
        writer = self._writer(name)
        if writer is None:
            return
        with writer.as_default(step=step):
            for key, value in logs.items():
                if value is not None:
                    tf.summary.write(key, tf.constant(float(value), tf.float32), step=step,
                                     metadata=_SCALAR_METADATA)
        writer.flush()

    # ------------------------------------------------------------------ public
    def fit(self, train_ds, steps=None, epochs=None, steps_per_epoch=None, validation_data=None,
            validation_freq=1, validation_steps=None, callbacks=None, verbose=None):
        """Train; resume from the latest checkpoint in ``checkpoint_dir`` if there is one.

        Args:
            train_ds: ``tf.data.Dataset`` (or re-iterable, e.g. a list) of ``(x, y)`` or
                ``(x, y, sample_weight)`` batches, x shaped (B, T, n_in).
            steps: total number of training steps (optimizer updates) to reach, counted over
                resumed runs: rerunning the same command continues up to ``steps``.
            epochs: total number of epochs to reach (default 1 when ``steps`` is None). With
                both, training stops at whichever comes first.
            steps_per_epoch: batches per epoch (default: one pass over ``train_ds``; for an
                infinite dataset, ``steps``).
            validation_data: dataset evaluated at the end of every ``validation_freq`` epochs;
                its results go to the logs with a ``val_`` prefix.
            validation_freq: int >= 1.
            validation_steps: batches of ``validation_data`` per evaluation (default all).
            callbacks: list of ``keras.callbacks.Callback`` (EarlyStopping,
                LearningRateScheduler, your own); they see the model as ``self.model`` with
                the Trainer's optimizer as ``self.model.optimizer``.
            verbose: overrides the Trainer's ``verbose``.

        Returns:
            ``keras.callbacks.History`` of the epochs trained in this call: loss (task loss plus
            regularisation), metrics, firing_rate (Hz) and validation results.

        Raises:
            NonFiniteLossError: a loss or gradient was NaN/inf. The update was not applied and
                the last good checkpoint is kept.
        """
        verbose = self.verbose if verbose is None else verbose
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, received {verbose!r}.")
        steps = self._positive_int("steps", steps, True)
        epochs = self._positive_int("epochs", epochs, True)
        steps_per_epoch = self._positive_int("steps_per_epoch", steps_per_epoch, True)
        validation_freq = self._positive_int("validation_freq", validation_freq)
        validation_steps = self._positive_int("validation_steps", validation_steps, True)
        if steps is None and epochs is None:
            epochs = 1
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"`callbacks` must be a list, received {callbacks!r}.")
        length = self._cardinality(train_ds)
        if steps_per_epoch is None:
            if length == math.inf:
                if steps is None:
                    raise ValueError("`train_ds` is infinite: pass `steps` or "
                                     "`steps_per_epoch`.")
                steps_per_epoch = steps
            else:
                steps_per_epoch = length  # None when unknown: an epoch ends with the data
        if self.seed is not None:
            keras.utils.set_random_seed(int(self.seed))
        self._prepare(self._first_batch(train_ds))
        resumed = self._restore()
        if resumed and verbose:
            print(f"Resuming from {resumed} at step {self.step} (epoch {self.epoch + 1}, "
                  f"batch {self._position}).")
        if steps_per_epoch is not None:
            total_epochs = epochs if epochs is not None else max(
                1, math.ceil(steps / steps_per_epoch))
        else:
            total_epochs = epochs if epochs is not None else max(self.epoch + 1, 1)
        proxy = _CallbackModel(self.model, self.optimizer)
        callback_list = keras.callbacks.CallbackList(
            list(callbacks or []), add_history=True, add_progbar=verbose != 0, model=proxy,
            verbose=verbose, epochs=total_epochs, steps=steps_per_epoch)
        history = next(cb for cb in callback_list.callbacks
                       if isinstance(cb, keras.callbacks.History))
        callback_list.on_train_begin()
        epoch_logs = {}
        last_loss = None

        def done():
            return ((steps is not None and self.step >= steps)
                    or (epochs is not None and self.epoch >= epochs) or proxy.stop_training)

        try:
            while not done():
                epoch = self.epoch
                callback_list.on_epoch_begin(epoch)
                for metric in self.metrics:
                    metric.reset_state()
                sums, count = {}, 0
                iterator = self._open_iterator(train_ds, epoch)
                batch_index = self._position
                finished = False
                while True:
                    if steps_per_epoch is not None and batch_index >= steps_per_epoch:
                        finished = True
                        break
                    if steps is not None and self.step >= steps:
                        break
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        finished = True
                        break
                    callback_list.on_train_batch_begin(batch_index)
                    logs = {k: _float(v) for k, v in self._train_function(batch).items()}
                    if logs.pop("finite") < 0.5 or not math.isfinite(logs["loss"]):
                        self._non_finite(logs)
                    self.step += 1
                    self.last_step_logs = dict(logs, step=self.step)
                    batch_index += 1
                    # Roll over to the next epoch before a checkpoint, so a resumed run never
                    # has to skip a whole finished epoch of data.
                    epoch_done = steps_per_epoch is not None and batch_index >= steps_per_epoch
                    if epoch_done:
                        self.epoch, self._position = epoch + 1, 0
                    else:
                        self._position = batch_index
                    last_loss = logs["loss"]
                    count += 1
                    for key, value in logs.items():
                        if key in [m.name for m in self.metrics]:
                            sums[key] = value * count  # metrics are running means already
                        else:
                            sums[key] = sums.get(key, 0.0) + value
                    running = {k: v / count for k, v in sums.items()}
                    callback_list.on_train_batch_end(
                        batch_index - 1, {k: v for k, v in running.items()
                                          if not k.startswith("firing_rate_")})
                    if self.log_dir is not None and self.step % self.log_every == 0:
                        scalars = dict(logs)
                        scalars["learning_rate"] = self._learning_rate()
                        self._write_scalars("train", scalars, self.step)
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self._save(last_loss)
                    if epoch_done:
                        finished = True
                        break
                    if proxy.stop_training:
                        break
                # An epoch cut short by `steps` goes on from here in the next fit call.
                self._open_epoch = (None if finished else
                                    (train_ds, self.epoch, self._position, iterator))
                epoch_logs = {k: v / count for k, v in sums.items()} if count else {}
                active = self._active_connections()
                if active is not None:
                    epoch_logs["active_connections"] = active
                if finished and self.epoch == epoch:
                    self.epoch, self._position = epoch + 1, 0
                if (validation_data is not None and finished
                        and self.epoch % validation_freq == 0):
                    val = self.evaluate(validation_data, steps=validation_steps, verbose=0)
                    epoch_logs.update({f"val_{k}": v for k, v in val.items()})
                    self._write_scalars("validation", {f"epoch_{k}": v for k, v in val.items()},
                                        self.step)
                lr = self._learning_rate()
                if lr is not None:
                    epoch_logs.setdefault("learning_rate", lr)
                self._write_scalars("train", {f"epoch_{k}": v for k, v in epoch_logs.items()
                                              if not k.startswith("val_")}, self.step)
                callback_list.on_epoch_end(epoch, epoch_logs)
                if self.checkpoint_every is None or done():
                    self._save(last_loss)
        finally:
            if self._writers:
                for writer in self._writers.values():
                    writer.flush()
        self._save(last_loss)
        callback_list.on_train_end(epoch_logs)
        return history

    def _non_finite(self, logs):
        last = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        where = (f"The last good checkpoint is kept: {last} (rerun to resume from it)."
                 if last else "No checkpoint was written (set `checkpoint_dir` to keep one).")
        raise NonFiniteLossError(
            f"Non-finite loss or gradient at step {self.step + 1} (loss={logs.get('loss')}); "
            f"training stopped and this update was not applied. {where} Common causes: a "
            "learning rate too high, exploding recurrent weights, or NaN in the data.")

    def evaluate(self, ds, steps=None, verbose=0):
        """Mean loss (task loss plus regularisation), metrics and firing rate over ``ds``.

        Args:
            ds: ``tf.data.Dataset`` or re-iterable of ``(x, y)`` batches.
            steps: number of batches (default: all of ``ds``).
            verbose: 1 shows a progress bar.

        Returns:
            dict of Python floats, e.g. ``{"loss": ..., "accuracy": ..., "firing_rate": ...}``.
        """
        steps = self._positive_int("steps", steps, True)
        self._prepare(self._first_batch(ds))
        for metric in self.metrics:
            metric.reset_state()
        length = self._cardinality(ds)
        if steps is None and length == math.inf:
            raise ValueError("`ds` is infinite: pass `steps` to evaluate().")
        target = steps if steps is not None else length
        bar = keras.utils.Progbar(target) if verbose else None
        sums, count, logs = {}, 0, {}
        for batch in self._iterate(ds, 0):
            if steps is not None and count >= steps:
                break
            logs = {k: _float(v) for k, v in self._eval_function(batch).items()}
            count += 1
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            if bar is not None:
                bar.update(count, [(k, sums[k] / count) for k in logs if k == "loss"])
        if count == 0:
            raise ValueError("`ds` gave no batch to evaluate.")
        result = {k: v / count for k, v in sums.items()}
        result.update({m.name: logs[m.name] for m in self.metrics})  # running -> final value
        return result


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False
