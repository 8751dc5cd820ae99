"""The train and evaluate step functions of ``kspike.Trainer`` and its non-finite guard.

One ``tf.function`` per kind, traced for the first batch's shapes; a train step applies the
rule's gradients only when every replica's loss and gradients are finite (docs/training.md).
"""
import numpy as np
import tensorflow as tf

from kspike import compat
from kspike import regularizers as _regularizers
# The one place the Trainer takes its firing-rate logs from ("firing_rate" in Hz plus one key
# per layer): swapping the helper is this single line.
from kspike.regularizers import firing_rate_logs
from kspike.losses import model_losses

__all__ = ["NonFiniteLossError", "unpack", "train_step", "evaluate_step", "apply_if_finite",
           "make_step_function", "is_finite_step", "non_finite_error", "firing_rate_logs"]


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient; the offending update was not applied."""


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


def train_step(model, rule, loss, regularizers, metrics, optimizer, strategy, x, y,
               sample_weight):
    """One replica's training step: the rule's loss and gradients, applied by ``optimizer``
    when finite. Returns float32 logs: loss, the rule's logs, metrics updated, "finite"."""
    result = rule.compute(model, x, y, loss, sample_weight=sample_weight,
                          regularizers=regularizers, training=True)
    variables = model.trainable_variables
    if len(result.gradients) != len(variables):
        raise ValueError(f"{rule!r} returned {len(result.gradients)} gradients for "
                         f"{len(variables)} trainable variables.")
    pairs = [(g, v) for g, v in zip(result.gradients, variables) if g is not None]
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas > 1:
        # The optimizer sums gradients over replicas; each replica's loss is the mean over
        # its share of the batch, so 1/replicas makes the sum the global-batch gradient.
        pairs = [(g / replicas, v) for g, v in pairs]
    value = tf.cast(result.loss, tf.float32)
    # One sum per gradient: NaN or inf anywhere makes its sum non-finite (a sum above
    # 3e38 counts as non-finite too, which such a gradient is in practice).
    sums = [tf.reduce_sum(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g,
                                  tf.float32)) for g, _ in pairs]
    finite = tf.reduce_all(tf.math.is_finite(tf.stack([tf.reshape(value, [])] + sums)))
    finite = apply_if_finite(optimizer, strategy, pairs, finite)
    for metric in metrics:
        metric.update_state(y, result.predictions, sample_weight=sample_weight)
    logs = {"loss": value}
    logs.update({k: tf.cast(v, tf.float32) for k, v in result.logs.items()})
    logs["finite"] = tf.cast(finite, tf.float32)
    return logs


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
def evaluate_step(model, loss, regularizers, metrics, x, y, sample_weight):
    """One replica's evaluation: loss (task + regularisation + model losses), metrics updated,
    firing rates in Hz."""
    try:
        predictions, activities = _regularizers.record_activity(model, x, training=False)
    except ValueError:
        if regularizers:
            raise
        predictions, activities = model(x, training=False), []
    value = tf.cast(loss(y, predictions, sample_weight=sample_weight), tf.float32)
    value = value + _regularizers.total_penalty(regularizers, activities)
    value = value + model_losses(model)
    for metric in metrics:
        metric.update_state(y, predictions, sample_weight=sample_weight)
    logs = {"loss": value}
    logs.update(firing_rate_logs(activities))
    return logs


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
            per_replica = strategy.run(lambda b: replica_fn(*unpack(b)), args=(batch,))
            logs = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                    for k, v in per_replica.items()}
        for metric in metrics:
            logs[metric.name] = tf.cast(metric.result(), tf.float32)
        return logs
    # Traced for the shapes of the first batch (fully known shapes run measurably faster
    # than a signature with an unknown batch size); a batch of another shape (the last,
    # partial one) makes one more, shape-generic trace that every later shape reuses.
    return tf.function(step, reduce_retracing=True)


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
