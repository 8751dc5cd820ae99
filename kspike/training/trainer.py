"""``kspike.Trainer``: the training loop that composes the parts of ``kspike.training``
(docs/training.md): step functions (``step``), checkpoints (``checkpoints``), data position
(``data``), TensorBoard scalars and progress (``logging``)."""
import functools
import math

import keras
import numpy as np
import tensorflow as tf

from kspike import compat, graph
from kspike import regularizers as _regularizers
from kspike.learning.base import LearningRule
from kspike.learning.bptt import BPTT
from kspike.losses import UnscaledLoss, get_loss
from kspike.training import arguments, checkpoints, step as steps_module
from kspike.training.data import DataPosition, cardinality, first_batch, iterate
from kspike.training.logging import ScalarLogger, progress_logs

__all__ = ["Trainer"]


def _float(value):
    return float(np.asarray(value))


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


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


class _EpochSums:
    """Running means of an epoch's step logs (metrics are running means already)."""

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


class Trainer:
    """Trains a Keras model of kspike layers with any ``kspike.learning`` rule.

    See docs/training.md for its parts, the checkpoint format, resuming and what survives a
    crash.

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
        override_learning_rate: on resume, the optimizer's learning rate as given replaces the
            checkpoint's (True), or the checkpoint's is kept with a warning when they differ
            (False, the default).

    ``fit`` holds a lock on ``checkpoint_dir`` (``kspike.lock``): a second trainer on the same
    directory is refused; damaged or incomplete checkpoints are moved aside with a warning and
    training resumes from the newest complete one (docs/training.md, "Reliability").

    Checkpoints hold the model's and the optimizer's variables, the step, epoch and position in
    the epoch, and the states of TensorFlow's and Keras' global random generators. On resume the
    data of the interrupted epoch is skipped up to the saved position, so a dataset that gives
    the same order each time it is iterated (unshuffled, or shuffled with a fixed seed and
    ``reshuffle_each_iteration=False``) continues exactly where it stopped. NumPy's and
    Python's random states and tf.data's internal shuffle buffers are not saved.

    Example:

    >>> import keras, numpy as np, tensorflow as tf, kspike
    >>> inputs = keras.Input((5, 3))
    >>> spikes = keras.layers.RNN(kspike.LIF(4, seed=0), return_sequences=True,
    ...                           name="hidden")(inputs)
    >>> outputs = kspike.LeakyReadout(2, seed=1)(spikes)
    >>> logits = keras.layers.Lambda(lambda t: t[:, -1])(outputs)
    >>> model = keras.Model(inputs, logits)
    >>> x, y = np.ones((8, 5, 3), "float32"), np.zeros(8, "int32")
    >>> train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    >>> trainer = kspike.Trainer(model, keras.optimizers.Adam(1e-3),
    ...                          keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...                          metrics=["accuracy"], verbose=0)
    >>> history = trainer.fit(train_ds, steps=2)
    >>> trainer.step, sorted(history.history)
    (2, ['accuracy', 'firing_rate', 'firing_rate/hidden', 'learning_rate', 'loss'])
    """

    def __init__(self, model, optimizer="adam", loss=None, rule=None, regularizers=None,
                 metrics=None, checkpoint_dir=None, log_dir=None, strategy=None,
                 checkpoint_every=None, keep_checkpoints=2, seed=None, log_every=1,
                 skip_on_resume=True, verbose=1, override_learning_rate=False):
        arguments.check_model(model, strategy)
        self.model = model
        self.strategy = strategy
        with self._scope():
            self.optimizer = keras.optimizers.get(optimizer) if isinstance(optimizer, str) \
                else optimizer
        arguments.check_optimizer(self.optimizer, optimizer)
        if loss is None:
            raise ValueError("`loss` is required, e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
        self.loss = UnscaledLoss(get_loss(loss))
        rule = BPTT() if rule is None else rule
        if not isinstance(rule, LearningRule):
            raise TypeError("`rule` must be a kspike.learning.LearningRule (e.g. "
                            f"kspike.learning.BPTT()), received {rule!r}.")
        rule.check_model(model)
        self.rule = rule
        self.regularizers = _regularizers.check_regularizers(regularizers)
        if metrics is not None and not isinstance(metrics, (list, tuple)):
            raise TypeError(f"`metrics` must be a list, received {metrics!r}.")
        self._metric_identifiers = list(metrics or [])
        self.metrics = None
        self.checkpoint_dir = arguments.check_directory(
            "checkpoint_dir", checkpoint_dir, "a directory (it is created if missing)")
        self.log_dir = arguments.check_directory("log_dir", log_dir, "a directory")
        self.checkpoint_every = arguments.positive_int("checkpoint_every", checkpoint_every, True)
        self.keep_checkpoints = arguments.positive_int("keep_checkpoints", keep_checkpoints)
        self.log_every = arguments.positive_int("log_every", log_every)
        if seed is not None and (isinstance(seed, bool)
                                 or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"`seed` must be an integer or None, received {seed!r}.")
        self.seed = seed
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, received {verbose!r}.")
        self.verbose = verbose
        self.skip_on_resume = arguments.check_flag("skip_on_resume", skip_on_resume)
        self.override_learning_rate = arguments.check_flag("override_learning_rate",
                                                           override_learning_rate)
        self._init_state()

    def _init_state(self):
        self.step = 0
        self._data = DataPosition(self.strategy)
        self._train_function = None
        self._eval_function = None
        # How often the train and evaluate steps were traced: 1 each when every batch has the
        # same shape, 2 with a partial last batch, whatever the number of steps.
        self.trace_counts = {"train": 0, "evaluate": 0}
        self._logger = ScalarLogger(self.log_dir, self._is_chief)
        self._last_saved_step = None
        self._last_loss = None
        self._restored = False
        self._checkpoints = checkpoints.CheckpointManager(
            self.checkpoint_dir, self.keep_checkpoints, self._is_chief)
        # Values of the most recent step (not epoch means): loss, metrics so far, rates.
        self.last_step_logs = {}
        self._rewired = self._has_rewired_kernels()

    # ------------------------------------------------------------------ state
    @property
    def epoch(self):
        """The current epoch (0-based): the number of finished epochs."""
        return self._data.epoch

    @epoch.setter
    def epoch(self, value):
        self._data.epoch = value

    @property
    def _position(self):
        return self._data.position

    @_position.setter
    def _position(self, value):
        self._data.position = value

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else _NullScope()

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

    def _has_rewired_kernels(self):
        return any(graph.spiking_cell_of(layer) is not None
                   and graph.spiking_cell_of(layer).rewired_kernels
                   for layer in compat.nested_layers(self.model))

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
    def _prepare(self, batch):
        """Checks the first batch and builds metrics, optimizer variables and step functions."""
        x, y, _ = steps_module.unpack(batch)
        if isinstance(x, (tf.Tensor, np.ndarray)) and len(x.shape) < 3:
            raise ValueError("Inputs x must be shaped (batch, time, features), or (batch, time, "
                             "*features) for deep SNNs (rank >= 3), received shape "
                             f"{tuple(x.shape)}.")
        if self.metrics is None:
            with self._scope():
                try:
                    predictions = self.model.compute_output_spec(
                        tf.nest.map_structure(
                            lambda t: keras.KerasTensor(tuple(t.shape), t.dtype), x))
                except Exception:  # noqa: BLE001 - e.g. a subclassed model: run one sample
                    predictions = self.model(tf.nest.map_structure(lambda t: t[:1], x))
                self.metrics = arguments.resolve_metrics(
                    self._metric_identifiers, self.loss.loss, tf.convert_to_tensor(y),
                    tf.nest.flatten(predictions)[0])
                if not getattr(self.optimizer, "built", True):
                    self.optimizer.build(self.model.trainable_variables)
            try:
                _regularizers.activity_probe(self.model)  # built once, outside tf.function
            except ValueError:
                if self.regularizers:
                    raise
        if self._train_function is None:
            self._train_function = self._step_function("train", functools.partial(
                steps_module.train_step, self.model, self.rule, self.loss, self.regularizers,
                self.metrics, self.optimizer, self.strategy))
            self._eval_function = self._step_function("evaluate", functools.partial(
                steps_module.evaluate_step, self.model, self.loss, self.regularizers,
                self.metrics))

    def _step_function(self, kind, replica_fn):
        def count_trace():
            self.trace_counts[kind] += 1
        return steps_module.make_step_function(replica_fn, self.strategy, self.metrics,
                                               count_trace)

    def _non_finite(self, logs):
        last = checkpoints.latest_checkpoint(self.checkpoint_dir)
        raise steps_module.non_finite_error(self.step + 1, logs, last)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_object(self):
        return checkpoints.checkpoint_object(self.model, self.optimizer, self.rule)

    def _save(self, loss=None):
        if self.checkpoint_dir is None or self._last_saved_step == self.step:
            return None
        path = self._checkpoints.save(self._checkpoint_object(), self.step,
                                      checkpoints.checkpoint_metadata(
                                          self.step, self.epoch, self._position, loss,
                                          self.model.name))
        self._last_saved_step = self.step
        return path

    def _restore(self):
        if self.checkpoint_dir is None:
            return None
        self._checkpoints.remove_leftovers()
        if self._restored or not checkpoints.list_checkpoints(self.checkpoint_dir):
            return None
        with self._scope():
            if not getattr(self.optimizer, "built", True):
                self.optimizer.build(self.model.trainable_variables)
        given = self._learning_rate()
        path, position = self._checkpoints.restore(self._checkpoint_object())
        if path is None:
            return None
        self.step, self.epoch, self._position = position
        self._last_saved_step = self.step
        self._restored = True
        checkpoints.resume_learning_rate(self.optimizer, given, self._learning_rate(), path,
                                         self.override_learning_rate)
        return path

    # ------------------------------------------------------------------ logging
    def _writer(self, name):
        return self._logger.writer(name)

    def _write_scalars(self, name, logs, step):
        self._logger.write(name, logs, step)

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
        plan = _FitPlan(steps, epochs, steps_per_epoch, validation_data, validation_freq,
                        validation_steps)
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"`callbacks` must be a list, received {callbacks!r}.")
        plan.set_steps_per_epoch(cardinality(train_ds))
        if self.seed is not None:
            keras.utils.set_random_seed(int(self.seed))
        self._prepare(first_batch(train_ds))
        with self._checkpoints.lock():
            resumed = self._restore()
            if resumed and verbose:
                print(f"Resuming from {resumed} at step {self.step} (epoch {self.epoch + 1}, "
                      f"batch {self._position}).")
            return self._fit(train_ds, plan, callbacks, verbose)

    def _fit(self, train_ds, plan, callbacks, verbose):
        plan.proxy = _CallbackModel(self.model, self.optimizer)
        plan.callbacks = keras.callbacks.CallbackList(
            list(callbacks or []), add_history=True, add_progbar=verbose != 0,
            model=plan.proxy, verbose=verbose, epochs=plan.total_epochs(self.epoch),
            steps=plan.steps_per_epoch)
        history = next(cb for cb in plan.callbacks.callbacks
                       if isinstance(cb, keras.callbacks.History))
        plan.callbacks.on_train_begin()
        epoch_logs = {}
        self._last_loss = None
        try:
            while not plan.done(self):
                epoch_logs = self._run_epoch(train_ds, plan)
        finally:
            self._logger.flush()
        self._save(self._last_loss)
        plan.callbacks.on_train_end(epoch_logs)
        return history

    def _run_epoch(self, train_ds, plan):
        epoch = self.epoch
        plan.callbacks.on_epoch_begin(epoch)
        for metric in self.metrics:
            metric.reset_state()
        sums = _EpochSums(m.name for m in self.metrics)
        iterator = self._data.open_iterator(train_ds, epoch, self.skip_on_resume)
        finished = self._train_batches(iterator, epoch, plan, sums)
        # An epoch cut short by `steps` goes on from here in the next fit call.
        if finished:
            self._data.close()
        else:
            self._data.keep_open(train_ds, iterator)
        epoch_logs = sums.means()
        active = self._active_connections()
        if active is not None:
            epoch_logs["active_connections"] = active
        if finished and self.epoch == epoch:
            self.epoch, self._position = epoch + 1, 0
        self._end_epoch(epoch, finished, epoch_logs, plan)
        return epoch_logs

    def _train_batches(self, iterator, epoch, plan, sums):
        """Trains on the epoch's batches; True when the epoch finished."""
        batch_index = self._position
        while True:
            if plan.steps_per_epoch is not None and batch_index >= plan.steps_per_epoch:
                return True
            if plan.steps is not None and self.step >= plan.steps:
                return False
            try:
                batch = next(iterator)
            except StopIteration:
                return True
            plan.callbacks.on_train_batch_begin(batch_index)
            epoch_done = self._train_batch(batch, epoch, batch_index, plan, sums)
            batch_index += 1
            if epoch_done:
                return True
            if plan.proxy.stop_training:
                return False

    def _train_batch(self, batch, epoch, batch_index, plan, sums):
        """One step: train, count, log, checkpoint; True when it ended the epoch."""
        logs = {k: _float(v) for k, v in self._train_function(batch).items()}
        if not steps_module.is_finite_step(logs):
            logs.pop("finite")
            self._non_finite(logs)
        logs.pop("finite")
        self.step += 1
        self._checkpoints.heartbeat()
        self.last_step_logs = dict(logs, step=self.step)
        # Roll over to the next epoch before a checkpoint, so a resumed run never has to skip
        # a whole finished epoch of data.
        epoch_done = plan.steps_per_epoch is not None and batch_index + 1 >= plan.steps_per_epoch
        if epoch_done:
            self.epoch, self._position = epoch + 1, 0
        else:
            self._position = batch_index + 1
        self._last_loss = logs["loss"]
        sums.add(logs)
        plan.callbacks.on_train_batch_end(batch_index, progress_logs(sums.means()))
        if self.log_dir is not None and self.step % self.log_every == 0:
            self._write_scalars("train", dict(logs, learning_rate=self._learning_rate()),
                                self.step)
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self._save(self._last_loss)
        return epoch_done

    def _end_epoch(self, epoch, finished, epoch_logs, plan):
        if (plan.validation_data is not None and finished
                and self.epoch % plan.validation_freq == 0):
            val = self.evaluate(plan.validation_data, steps=plan.validation_steps, verbose=0)
            epoch_logs.update({f"val_{k}": v for k, v in val.items()})
            self._write_scalars("validation", {f"epoch_{k}": v for k, v in val.items()},
                                self.step)
        lr = self._learning_rate()
        if lr is not None:
            epoch_logs.setdefault("learning_rate", lr)
        self._write_scalars("train", {f"epoch_{k}": v for k, v in epoch_logs.items()
                                      if not k.startswith("val_")}, self.step)
        plan.callbacks.on_epoch_end(epoch, epoch_logs)
        if self.checkpoint_every is None or plan.done(self):
            self._save(self._last_loss)

    def evaluate(self, ds, steps=None, verbose=0):
        """Mean loss (task loss plus regularisation), metrics and firing rate over ``ds``.

        Args:
            ds: ``tf.data.Dataset`` or re-iterable of ``(x, y)`` batches.
            steps: number of batches (default: all of ``ds``).
            verbose: 1 shows a progress bar.

        Returns:
            dict of Python floats, e.g. ``{"loss": ..., "accuracy": ..., "firing_rate": ...}``.
        """
        steps = arguments.positive_int("steps", steps, True)
        self._prepare(first_batch(ds))
        for metric in self.metrics:
            metric.reset_state()
        length = cardinality(ds)
        if steps is None and length == math.inf:
            raise ValueError("`ds` is infinite: pass `steps` to evaluate().")
        bar = keras.utils.Progbar(steps if steps is not None else length) if verbose else None
        sums, count, logs = {}, 0, {}
        for batch in iterate(ds, 0, self.strategy):
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


class _FitPlan:
    """The targets of one ``fit`` call (steps, epochs, steps per epoch, validation) and its
    callbacks, checked."""

    def __init__(self, steps, epochs, steps_per_epoch, validation_data, validation_freq,
                 validation_steps):
        self.steps = arguments.positive_int("steps", steps, True)
        self.epochs = arguments.positive_int("epochs", epochs, True)
        self.steps_per_epoch = arguments.positive_int("steps_per_epoch", steps_per_epoch, True)
        self.validation_freq = arguments.positive_int("validation_freq", validation_freq)
        self.validation_steps = arguments.positive_int("validation_steps", validation_steps,
                                                       True)
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
