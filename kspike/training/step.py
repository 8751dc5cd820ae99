"""The train and evaluate step functions of ``kspike.Trainer`` and its non-finite guard.

One ``tf.function`` per kind, traced for the first batch's shapes; a train step applies the
rule's gradients only when every replica's loss and gradients are finite (docs/training.md).
"""
import functools
import math

import keras
import numpy as np
import tensorflow as tf

from kspike import compat
from kspike import regularizers as _regularizers
# The one place the Trainer takes its firing-rate logs from ("firing_rate" in Hz plus one key
# per layer): swapping the helper is this single line.
from kspike.regularizers import firing_rate_logs
from kspike.losses import model_losses
from kspike.training.arguments import positive_int
from kspike.training.data import cardinality, iterate

__all__ = ["NonFiniteLossError", "NonFiniteInputError", "unpack", "train_step",
           "evaluate_step", "predict_step", "apply_if_finite", "make_step_function",
           "is_finite_step", "non_finite_error", "firing_rate_logs", "all_finite",
           "first_non_finite_layer", "non_finite_input_error", "check_numerics_flag",
           "local_batch", "batch_share",
           "run_evaluation", "step_functions", "predict_function", "run_prediction"]


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient; the offending update was not applied."""


class NonFiniteInputError(ValueError):
    """``check_numerics=True`` found NaN or inf in a batch or in a layer's output."""


def unpack(batch):
    """``(x, y, sample_weight)`` of a batch ``(x, y)`` or ``(x, y, sample_weight)``.

    >>> unpack((1, 2))
    (1, 2, None)
    """
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


def all_finite(*structures):
    """Scalar bool tensor: every floating value in ``structures`` (nested, None skipped) is
    finite."""
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(structures)
             if t is not None and tf.as_dtype(t.dtype).is_floating]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def train_step(model, rule, loss, regularizers, metrics, optimizer, strategy, x, y,
               sample_weight, check_numerics=False):
    """One replica's training step: the rule's loss and gradients, applied by ``optimizer``
    when finite. Returns float32 logs: loss, the rule's logs, metrics updated, "finite" (and,
    with ``check_numerics``, "numerics": 1 when the batch and predictions are finite; the
    update is then applied only if they are)."""
    numerics = all_finite(x, y, sample_weight) if check_numerics else None
    result = rule.compute(model, x, y, loss, sample_weight=sample_weight,
                          regularizers=regularizers, training=True)
    variables = model.trainable_variables
    if len(result.gradients) != len(variables):
        raise ValueError(f"{rule!r} returned {len(result.gradients)} gradients for "
                         f"{len(variables)} trainable variables.")
    pairs = [(g, v) for g, v in zip(result.gradients, variables) if g is not None]
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    value = tf.cast(result.loss, tf.float32)
    if replicas > 1:
        # The optimizer sums gradients over replicas; each replica's loss is the mean over
        # its share of the batch, so weighting by the share (1/replicas for an even split)
        # makes the sum the global-batch gradient, also for a partial last batch split
        # unevenly. multiply_no_nan: a replica without examples adds nothing.
        share = batch_share(x, strategy)
        pairs = [(_scale(g, share), v) for g, v in pairs]
        value = tf.where(share > 0, value, 0.0)
    # One sum per gradient: NaN or inf anywhere makes its sum non-finite (a sum above
    # 3e38 counts as non-finite too, which such a gradient is in practice).
    sums = [tf.reduce_sum(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g,
                                  tf.float32)) for g, _ in pairs]
    finite = tf.reduce_all(tf.math.is_finite(tf.stack([tf.reshape(value, [])] + sums)))
    if check_numerics:
        numerics = tf.logical_and(numerics, all_finite(result.predictions))
        finite = tf.logical_and(finite, numerics)
    finite = apply_if_finite(optimizer, strategy, pairs, finite)
    for metric in metrics:
        metric.update_state(y, result.predictions, sample_weight=sample_weight)
    logs = {"loss": value}
    logs.update({k: tf.cast(v, tf.float32) for k, v in result.logs.items()})
    logs["finite"] = tf.cast(finite, tf.float32)
    if check_numerics:
        logs["numerics"] = tf.cast(numerics, tf.float32)
    return logs


def _scale(gradient, share):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(tf.math.multiply_no_nan(gradient.values,
                                                        tf.cast(share, gradient.values.dtype)),
                                gradient.indices, gradient.dense_shape)
    return tf.math.multiply_no_nan(gradient, tf.cast(share, gradient.dtype))


def apply_if_finite(optimizer, strategy, pairs, finite):
    """Applies the (gradient, variable) ``pairs`` only if every replica's loss and gradients
    are finite; returns that decision."""
    gradients = [g for g, _ in pairs]
    variables = [v for _, v in pairs]
    if strategy is None:
        tf.cond(finite, lambda: (optimizer.apply_gradients(zip(gradients, variables)),
                                 tf.constant(True))[1], lambda: tf.constant(False))
        return finite
    context = tf.distribute.get_replica_context()
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    finite = failures < 0.5  # every replica takes the same decision

    def cross_replica(distribution, gradients, finite):
        # A cond whose branch applies gradients must run in cross-replica context: the
        # optimizer's update calls merge_call, which a replica-context cond cannot hold.
        flag = distribution.experimental_local_results(finite)[0]

        def apply_all():
            distribution.extended.call_for_each_replica(
                lambda g: optimizer.apply_gradients(zip(g, variables)), args=(gradients,))
            return tf.constant(True)

        tf.cond(flag, apply_all, lambda: tf.constant(False))

    context.merge_call(cross_replica, args=(gradients, finite))
    return finite


# Traced only into the Trainer's evaluation function, which is never exported, so SpikingRNN
# may run its native forward loop in it (compat.native_inference_allowed; the mark needs the
# function's own code, which AutoGraph would replace, and it needs no AutoGraph: Keras'
# evaluate runs the same model code without it).
@tf.autograph.experimental.do_not_convert
@compat.mark_step_function
def evaluate_step(model, loss, regularizers, metrics, x, y, sample_weight, outputs=None,
                  check_numerics=False):
    """One replica's evaluation: loss (task + regularisation + model losses), metrics updated,
    firing rates in Hz.

    ``outputs(predictions)`` maps the model's outputs to what the loss and metrics receive, as
    the learning rule does in training (``LearningRule.loss_outputs``); None keeps them.
    ``check_numerics`` adds "numerics": 1 when the batch and predictions are finite."""
    try:
        predictions, activities = _regularizers.record_activity(model, x, training=False)
    except ValueError:
        if regularizers:
            raise
        predictions, activities = model(x, training=False), []
    if outputs is not None:
        predictions = outputs(predictions)
    value = tf.cast(loss(y, predictions, sample_weight=sample_weight), tf.float32)
    value = value + _regularizers.total_penalty(regularizers, activities)
    value = value + model_losses(model)
    for metric in metrics:
        metric.update_state(y, predictions, sample_weight=sample_weight)
    logs = {"loss": value}
    logs.update(firing_rate_logs(activities))
    if check_numerics:
        logs["numerics"] = tf.cast(all_finite(x, y, sample_weight, predictions), tf.float32)
    return logs


@tf.autograph.experimental.do_not_convert
@compat.mark_step_function
def predict_step(model, check_numerics, x):
    """One replica's predictions ``model(x, training=False)`` (and, with ``check_numerics``, a
    flag: 1 when ``x`` and the predictions are finite)."""
    predictions = model(x, training=False)
    flag = all_finite(x, predictions) if check_numerics else tf.constant(True)
    return predictions, tf.cast(flag, tf.float32)


_FLAGS = ("finite", "numerics")


def _weighted(replica_fn, strategy, batch):
    """One replica's logs weighted by its share of the batch (times the number of replicas),
    so that their mean over replicas is the mean over the global batch; flags unweighted."""
    x, y, sample_weight = unpack(batch)
    logs = replica_fn(x, y, sample_weight)
    weight = batch_share(x, strategy) * float(strategy.num_replicas_in_sync)
    return {k: v if k in _FLAGS else tf.math.multiply_no_nan(v, tf.cast(weight, v.dtype))
            for k, v in logs.items()}


def make_step_function(replica_fn, strategy, metrics, on_trace=None):
    """``tf.function(batch) -> logs`` running ``replica_fn(x, y, sample_weight)`` on each
    replica, logs averaged over replicas, metric results added. ``on_trace()`` is called each
    time the function is traced."""
    def step(batch):
        if on_trace is not None:
            on_trace()  # Python runs only while tracing: this counts traces
        if strategy is None:
            logs = replica_fn(*unpack(batch))
        else:
            per_replica = strategy.run(lambda b: _weighted(replica_fn, strategy, b),
                                       args=(batch,))
            logs = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                    for k, v in per_replica.items()}
        for metric in metrics:
            logs[metric.name] = tf.cast(metric.result(), tf.float32)
        return logs
    # Traced for the shapes of the first batch (fully known shapes run measurably faster
    # than a signature with an unknown batch size); a batch of another shape (the last,
    # partial one) makes one more, shape-generic trace that every later shape reuses.
    # No AutoGraph, as in Keras' own model.fit: the graph code is written with TensorFlow's
    # control flow, and converting kspike's functions cost seconds of every first trace.
    return tf.function(step, reduce_retracing=True, autograph=False)


def batch_share(x, strategy):
    """This replica's share of the global batch, local size / global size (float32; 1.0 without
    a strategy). Replica-context only."""
    if strategy is None or strategy.num_replicas_in_sync < 2:
        return tf.constant(1.0)
    local = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)
    return tf.math.divide_no_nan(local, total)


def is_finite_step(logs):
    """False when a step's Python-float logs report a skipped (non-finite) update.

    >>> is_finite_step({"loss": 0.5, "finite": 1.0}), is_finite_step({"loss": float("nan")})
    (True, False)
    """
    return logs.get("finite", 1.0) >= 0.5 and bool(np.isfinite(logs["loss"]))


def non_finite_error(step, logs, last_checkpoint):
    """The ``NonFiniteLossError`` for a bad update at ``step`` (1-based), naming the last good
    checkpoint (a path or None)."""
    where = (f"The last good checkpoint is kept: {last_checkpoint} (rerun to resume from it)."
             if last_checkpoint else
             "No checkpoint was written (set `checkpoint_dir` to keep one).")
    return NonFiniteLossError(
        f"Non-finite loss or gradient at step {step} (loss={logs.get('loss')}); training "
        f"stopped and this update was not applied. {where} Common causes: a learning rate "
        "too high, exploding recurrent weights, or NaN in the data.")


def _count_bad(value):
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        return 0, 0, value.size
    return int(np.isnan(value).sum()), int(np.isinf(value).sum()), value.size


def first_non_finite_layer(model, x):
    """Name of the first layer of ``model`` (in graph order) whose output on ``x`` holds NaN or
    inf, or None (also for models whose layers' outputs cannot be read, e.g. subclassed)."""
    layers = [layer for layer in getattr(model, "layers", [])
              if not isinstance(layer, keras.layers.InputLayer)]
    try:
        outputs = [layer.output for layer in layers]
        probe = keras.Model(model.inputs, outputs)
        results = probe(x, training=False)
    except (AttributeError, ValueError, TypeError):
        return None
    for layer, result in zip(layers, results if len(layers) > 1 else [results]):
        if any(sum(_count_bad(t)[:2]) for t in tf.nest.flatten(result)):
            return layer.name
    return None


def local_batch(batch, strategy):
    """``batch`` as this process's tensors (under a strategy, its replicas' shares joined)."""
    if strategy is None:
        return batch
    return tf.nest.map_structure(
        lambda v: tf.concat(strategy.experimental_local_results(v), axis=0), batch)


def check_numerics_flag(logs, where, model, batch, strategy):
    """Pops the "numerics" flag of a step's logs; raises ``non_finite_input_error`` when it
    reports a non-finite batch or output."""
    if logs.pop("numerics", 1.0) < 1.0:
        raise non_finite_input_error(where, model, batch, strategy)


def non_finite_input_error(where, model, batch, strategy=None):
    """The ``NonFiniteInputError`` for ``batch`` (an ``(x, y[, sample_weight])`` batch, or the
    inputs alone) at ``where`` (e.g. "step 3 of fit"): which of x, y, sample_weight hold NaN or
    inf (how many), and the first layer whose output is not finite."""
    batch = local_batch(batch, strategy)
    parts = batch if isinstance(batch, tuple) else (batch,)
    found = []
    for name, value in zip(("inputs x", "targets y", "sample_weight"), parts):
        if value is None:
            continue
        counts = [_count_bad(t) for t in tf.nest.flatten(value)]
        nan, inf, size = (sum(c[i] for c in counts) for i in range(3))
        if nan or inf:
            found.append(f"{name} hold {nan} NaN and {inf} inf of {size} values")
    layer = first_non_finite_layer(model, parts[0])
    where_layer = (f"the first layer with a non-finite output is '{layer}'" if layer else
                   "no layer output could be inspected")
    what = "; ".join(found) if found else "the batch is finite but the model's output is not"
    return NonFiniteInputError(
        f"check_numerics: non-finite values at {where}: {what}; {where_layer} (model "
        f"'{model.name}'). Clean the data (e.g. np.nan_to_num) or find the layer that "
        "overflows.")


def run_evaluation(function, ds, steps, metrics, strategy=None, verbose=0, check=None):
    """Mean logs of ``function(batch)`` over the batches of ``ds`` (at most ``steps``, None for
    all; ``ds`` infinite needs ``steps``); ``metrics`` are reset first and keep their final
    value. ``check(count, logs, batch)`` sees each batch's Python-float logs (it may raise);
    ``verbose=1`` shows the mean loss in a progress bar. ValueError when there was no batch."""
    steps = positive_int("steps", steps, True)
    length = cardinality(ds)
    if steps is None and length == math.inf:
        raise ValueError("`ds` is infinite: pass `steps` to evaluate().")
    progbar = keras.utils.Progbar(steps if steps is not None else length) if verbose else None
    for metric in metrics:
        metric.reset_state()
    sums, count, logs = {}, 0, {}
    for batch in iterate(ds, 0, strategy):
        if steps is not None and count >= steps:
            break
        logs = {k: float(np.asarray(v)) for k, v in function(batch).items()}
        count += 1
        if check is not None:
            check(count, logs, batch)
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + value
        if progbar is not None:
            progbar.update(count, [(k, sums[k] / count) for k in logs if k == "loss"])
    if count == 0:
        raise ValueError("`ds` gave no batch to evaluate.")
    result = {k: v / count for k, v in sums.items() if k not in _FLAGS}
    result.update({m.name: logs[m.name] for m in metrics})  # running -> final value
    return result


def step_functions(model, rule, loss, regularizers, metrics, optimizer, strategy,
                   check_numerics, trace_counts):
    """``(train, evaluate)`` step functions of a Trainer (call it in the strategy's scope: it
    builds the optimizer's variables and the activity probe); ``trace_counts["train"]`` and
    ``["evaluate"]`` count their traces. Evaluation maps the model's outputs as the rule does
    for its loss (``rule.loss_outputs``), so it sees what training sees."""
    if not getattr(optimizer, "built", True):
        optimizer.build(model.trainable_variables)
    try:
        _regularizers.activity_probe(model)  # built once, outside tf.function
    except ValueError:
        if regularizers:
            raise
    def counter(kind):
        def count():
            trace_counts[kind] += 1
        return count
    train = make_step_function(functools.partial(
        train_step, model, rule, loss, regularizers, metrics, optimizer, strategy,
        check_numerics=check_numerics), strategy, metrics, counter("train"))
    evaluate = make_step_function(functools.partial(
        evaluate_step, model, loss, regularizers, metrics,
        outputs=functools.partial(rule.loss_outputs, model), check_numerics=check_numerics),
        strategy, metrics, counter("evaluate"))
    return train, evaluate


def predict_function(model, strategy, check_numerics, trace_counts):
    """``tf.function(batch) -> (predictions, finite flag)``, predictions gathered over the
    replicas; ``trace_counts["predict"]`` counts its traces."""
    def predict(batch):
        trace_counts["predict"] = trace_counts.get("predict", 0) + 1
        if strategy is None:
            return predict_step(model, check_numerics, batch)
        predictions, flags = strategy.run(
            functools.partial(predict_step, model, check_numerics), args=(batch,))
        gathered = tf.nest.map_structure(lambda t: strategy.gather(t, axis=0), predictions)
        return gathered, strategy.reduce(tf.distribute.ReduceOp.MEAN, flags, axis=None)
    return tf.function(predict, reduce_retracing=True, autograph=False)


def run_prediction(function, dataset, strategy, steps, verbose, check):
    """Predictions of ``function`` over ``dataset`` (at most ``steps`` batches), concatenated
    as NumPy arrays; ``check(count, batch)`` builds the error raised for a non-finite batch."""
    length = dataset.cardinality().numpy()
    bar = keras.utils.Progbar(steps or (length if length >= 0 else None)) if verbose else None
    if strategy is not None:
        dataset = strategy.experimental_distribute_dataset(dataset)
    outputs = []
    for count, batch in enumerate(dataset, 1):
        if steps is not None and count > steps:
            break
        predictions, flag = function(batch)
        if float(flag) < 1.0:
            raise check(count, batch)
        outputs.append(tf.nest.map_structure(np.asarray, predictions))
        if bar is not None:
            bar.update(count)
    if not outputs:
        raise ValueError("`x` gave no batch to predict.")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *outputs)
