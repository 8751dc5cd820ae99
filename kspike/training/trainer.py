"""``kspike.Trainer``: the training loop that composes the parts of ``kspike.training``
(docs/training.md): arguments and the fit plan (``arguments``), step functions (``step``),
checkpoints (``checkpoints``), data (``data``), scalars, epoch means and callbacks
(``logging``)."""
import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf

from kspike import regularizers as _regularizers
from kspike.learning.bptt import BPTT
from kspike.training import arguments, checkpoints, data, logging, step as steps_module
from kspike.training.data import DataPosition

__all__ = ["Trainer"]


class Trainer:
    """Trains a Keras model of kspike layers with any ``kspike.learning`` rule.

    docs/training.md describes its parts, the inputs it takes, the checkpoint format, the lock
    on ``checkpoint_dir``, resuming and what survives a crash.

    Args:
        model: a built Keras model (functional or Sequential for firing-rate logs and
            regularisers); under a strategy, built inside ``strategy.scope()``.
        optimizer: a Keras optimizer, its name, or a wrapper such as ``kspike.DeepR``.
        loss: a Keras loss (object, name or ``fn(y_true, y_pred)``); in training and in
            evaluation it receives the outputs as the rule gives them (``rule.loss_outputs``).
        rule: a ``kspike.learning.LearningRule``; default ``kspike.learning.BPTT()``.
        regularizers: list of kspike regularisers (``kspike.FiringRateRegularizer``, ...).
        metrics: list of Keras metrics or names ("accuracy" fits the loss and labels).
        checkpoint_dir: checkpoint directory (None: none); ``fit`` resumes from it.
        log_dir: TensorBoard directory (None: no logs).
        strategy: None, a MirroredStrategy, MultiWorkerMirroredStrategy or OneDeviceStrategy;
            global batches must divide among the replicas; only the chief writes files.
        checkpoint_every: save every this many steps; None saves at the end of each epoch.
        keep_checkpoints: number of checkpoints kept (int >= 1).
        seed: ``fit`` calls ``keras.utils.set_random_seed(seed)``; it also draws the order of
            shuffled array inputs.
        log_every: write per-step TensorBoard scalars every this many steps.
        skip_on_resume: a resumed epoch skips the batches it had consumed (False: afresh).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.
        override_learning_rate: on resume, the given learning rate replaces the
            checkpoint's (True) or the checkpoint's is kept with a warning (False).
        check_numerics: ``fit``, ``evaluate`` and ``predict`` raise ``NonFiniteInputError``
            at a batch with NaN/inf inputs or outputs, naming the first such layer.

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
    >>> history = trainer.fit(x, y, batch_size=4, epochs=2)      # arrays, as model.fit
    >>> trainer.step
    4
    """

    def __init__(self, model, optimizer="adam", loss=None, rule=None, regularizers=None,
                 metrics=None, checkpoint_dir=None, log_dir=None, strategy=None,
                 checkpoint_every=None, keep_checkpoints=2, seed=None, log_every=1,
                 skip_on_resume=True, verbose=1, override_learning_rate=False,
                 check_numerics=False):
        arguments.check_model(model, strategy)
        self.model, self.strategy = model, strategy
        with self._scope():
            self.optimizer = arguments.get_optimizer(optimizer)
        self.loss = arguments.get_trainer_loss(loss)
        self.rule = arguments.check_rule(rule, model, BPTT())
        self.regularizers = _regularizers.check_regularizers(regularizers)
        self._metric_identifiers = arguments.check_list("metrics", metrics)
        self.metrics = None
        self.__dict__.update(arguments.check_options(
            checkpoint_dir=checkpoint_dir, log_dir=log_dir, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, seed=seed, log_every=log_every,
            skip_on_resume=skip_on_resume, verbose=verbose,
            override_learning_rate=override_learning_rate, check_numerics=check_numerics))
        self.step, self._data = 0, DataPosition(strategy)
        self._train_function = self._eval_function = self._predict_function = None
        # How often the train and evaluate steps were traced: 1 each when every batch has the
        # same shape, 2 with a partial last batch, whatever the number of steps.
        self.trace_counts = {"train": 0, "evaluate": 0}
        self._logger = logging.ScalarLogger(self.log_dir, self._is_chief)
        self._last_saved_step = self._last_loss = None
        self._restored = False
        self._checkpoints = checkpoints.CheckpointManager(
            self.checkpoint_dir, self.keep_checkpoints, self._is_chief)
        # Values of the most recent step (not epoch means): loss, metrics so far, rates.
        self.last_step_logs = {}

    @property
    def epoch(self):
        """The current epoch (0-based): the number of finished epochs."""
        return self._data.epoch

    @epoch.setter
    def epoch(self, value):
        self._data.epoch = value

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def _is_chief(self):
        return checkpoints.is_chief(self.strategy)

    def _writer(self, name):
        return self._logger.writer(name)

    def _learning_rate(self):
        return logging.learning_rate(self.optimizer)

    def _prepare(self, batch):
        """Checks the first batch and builds metrics, optimizer variables and step functions."""
        x, y, _ = steps_module.unpack(batch)
        if isinstance(x, (tf.Tensor, np.ndarray)) and len(x.shape) < 3:
            raise ValueError("Inputs x must be shaped (batch, time, features), or (batch, time, "
                             "*features) for deep SNNs (rank >= 3), received shape "
                             f"{tuple(x.shape)}.")
        if self.metrics is None:
            with self._scope():
                self.metrics = arguments.build_metrics(
                    self._metric_identifiers, self.loss.loss, self.model, x, y,
                    functools.partial(self.rule.loss_outputs, self.model))
        if self._train_function is None:
            with self._scope():
                self._train_function, self._eval_function = steps_module.step_functions(
                    self.model, self.rule, self.loss, self.regularizers, self.metrics,
                    self.optimizer, self.strategy, self.check_numerics, self.trace_counts)

    def _save(self, loss=None):
        if self.checkpoint_dir is None or self._last_saved_step == self.step:
            return None
        path = self._checkpoints.save_run(self.model, self.optimizer, self.rule, self.step,
                                          self.epoch, self._data.position, loss)
        self._last_saved_step = self.step
        return path

    def _restore(self):
        if self.checkpoint_dir is None or self._restored:
            self._checkpoints.remove_leftovers()
            return None
        path, position = self._checkpoints.resume(self.model, self.optimizer, self.rule,
                                                  self.override_learning_rate)
        if path is not None:
            self.step, self.epoch, self._data.position = position
            self._last_saved_step, self._restored = self.step, True
        return path

    # ------------------------------------------------------------------ public
    def fit(self, train_ds, steps=None, epochs=None, steps_per_epoch=None, validation_data=None,
            validation_freq=1, validation_steps=None, callbacks=None, verbose=None, *, y=None,
            batch_size=None, shuffle=True, validation_split=0.0, sample_weight=None):
        """Train; resume from the latest checkpoint in ``checkpoint_dir`` if there is one.

        Args:
            train_ds: a ``tf.data.Dataset`` (or re-iterable) of ``(x, y)`` or
                ``(x, y, sample_weight)`` batches, x (B, T, n_in); or arrays as
                ``model.fit`` takes them: ``fit(x, y)``, ``fit((x, y))``.
            steps, epochs: totals to reach, counted over resumed runs (default: 1 epoch).
            steps_per_epoch: batches per epoch (default: one pass over the data).
            validation_data: a dataset or ``(x_val, y_val)`` arrays evaluated every
                ``validation_freq`` epochs (``validation_steps`` batches, default all).
            callbacks: list of ``keras.callbacks.Callback``.
            verbose: overrides the Trainer's ``verbose``.
            y, sample_weight, batch_size (default 32), shuffle, validation_split: for
                array inputs, as in ``model.fit``; the shuffled order is drawn from ``seed``.

        Returns:
            ``keras.callbacks.History`` of the epochs trained in this call.

        Raises:
            NonFiniteLossError: a loss or gradient was NaN/inf; the update was not applied.
        """
        verbose = self.verbose if verbose is None else arguments.check_verbose(verbose)
        callbacks = arguments.check_list("callbacks", callbacks)
        train_ds, plan, batch = data.plan_fit(
            train_ds, steps, epochs, steps_per_epoch, validation_data, validation_freq,
            validation_steps, y, sample_weight, batch_size, shuffle, validation_split,
            self.seed, self.strategy)
        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
        self._prepare(batch)
        with self._checkpoints.lock():
            resumed = self._restore()
            if resumed and verbose:
                print(f"Resuming from {resumed} at step {self.step} (epoch {self.epoch + 1}, "
                      f"batch {self._data.position}).")
            plan.callbacks, history, plan.proxy = logging.callback_list(
                callbacks, self.model, self.optimizer, verbose, plan.total_epochs(self.epoch),
                plan.steps_per_epoch)
            plan.callbacks.on_train_begin()
            epoch_logs, self._last_loss = {}, None
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
        means = logging.EpochMeans(m.name for m in self.metrics)
        iterator = self._data.open_iterator(train_ds, epoch, self.skip_on_resume)
        finished = self._train_batches(iterator, epoch, plan, means)
        # An epoch cut short by `steps` goes on from here in the next fit call.
        self._data.close() if finished else self._data.keep_open(train_ds, iterator)
        epoch_logs = logging.epoch_logs(means, self.model)
        if finished:
            self._data.finish(epoch)
        self._end_epoch(epoch, finished, epoch_logs, plan)
        return epoch_logs

    def _train_batches(self, iterator, epoch, plan, means):
        """Trains on the epoch's batches; True when the epoch finished."""
        batch_index = self._data.position
        while True:
            if plan.steps_per_epoch is not None and batch_index >= plan.steps_per_epoch:
                return True
            if plan.steps is not None and self.step >= plan.steps:
                return False
            batch = next(iterator, None)
            if batch is None:
                return True
            plan.callbacks.on_train_batch_begin(batch_index)
            epoch_done = self._train_batch(batch, epoch, batch_index, plan, means)
            batch_index += 1
            if epoch_done:
                return True
            if plan.proxy.stop_training:
                return False

    def _train_batch(self, batch, epoch, batch_index, plan, means):
        """One step: train, count, log, checkpoint; True when it ended the epoch."""
        logs = {k: float(np.asarray(v)) for k, v in self._train_function(batch).items()}
        steps_module.check_numerics_flag(
            logs, f"step {self.step + 1} of fit (batch {batch_index + 1} of epoch {epoch + 1})",
            self.model, batch, self.strategy)
        if not steps_module.is_finite_step(logs):
            raise steps_module.non_finite_error(
                self.step + 1, logs, checkpoints.latest_checkpoint(self.checkpoint_dir))
        logs.pop("finite")
        self.step += 1
        self._checkpoints.heartbeat()
        self.last_step_logs = dict(logs, step=self.step)
        epoch_done = self._data.advance(epoch, batch_index, plan.steps_per_epoch)
        self._last_loss = logs["loss"]
        means.add(logs)
        plan.callbacks.on_train_batch_end(batch_index, logging.progress_logs(means.means()))
        if self.step % self.log_every == 0:
            self._logger.write_step(logs, self.optimizer, self.step)
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self._save(self._last_loss)
        return epoch_done

    def _end_epoch(self, epoch, finished, epoch_logs, plan):
        if (plan.validation_data is not None and finished
                and self.epoch % plan.validation_freq == 0):
            val = self.evaluate(plan.validation_data, steps=plan.validation_steps, verbose=0)
            epoch_logs.update({f"val_{k}": v for k, v in val.items()})
            self._logger.write("validation", {f"epoch_{k}": v for k, v in val.items()},
                               self.step)
        self._logger.write_epoch(epoch_logs, self.optimizer, self.step)
        plan.callbacks.on_epoch_end(epoch, epoch_logs)
        if self.checkpoint_every is None or plan.done(self):
            self._save(self._last_loss)

    def evaluate(self, ds, steps=None, verbose=0, *, y=None, batch_size=None,
                 sample_weight=None):
        """Mean loss (task loss plus regularisation), metrics and firing rate over ``ds``
        (a dataset or re-iterable of ``(x, y)`` batches, or arrays: ``evaluate(x, y)``,
        ``evaluate((x, y))``, with ``batch_size`` default 32), its first ``steps`` batches
        (default all); ``verbose=1`` shows a progress bar. Returns a dict of floats."""
        ds, steps = data.evaluation_inputs(ds, steps, y, sample_weight, batch_size)
        self._prepare(data.first_checked_batch(ds, self.strategy, "ds"))
        return steps_module.run_evaluation(
            self._eval_function, ds, steps, self.metrics, self.strategy, verbose,
            check=lambda count, logs, b: steps_module.check_numerics_flag(
                logs, f"batch {count} of evaluate", self.model, b, self.strategy))

    def predict(self, x, batch_size=None, steps=None, verbose=0):
        """The model's outputs on ``x`` (an array, or a dataset of inputs or of ``(x, y)``
        batches) as NumPy arrays: ``model.predict`` with ``check_numerics`` and the strategy."""
        if self._predict_function is None:
            self._predict_function = steps_module.predict_function(
                self.model, self.strategy, self.check_numerics, self.trace_counts)
        return steps_module.run_prediction(
            self._predict_function, data.prediction_inputs(x, batch_size), self.strategy,
            arguments.positive_int("steps", steps, True), verbose,
            check=lambda count, b: steps_module.non_finite_input_error(
                f"batch {count} of predict", self.model, b, self.strategy))
