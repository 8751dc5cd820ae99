"""kspike.training.logging: TensorBoard scalars, progress-bar logs, epoch means, callbacks."""
import glob
import os

import pytest
import tensorflow as tf

from kspike.training.logging import ScalarLogger, progress_logs


def _read(directory):
    values = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return values


def test_scalars_are_written_per_step_and_none_is_skipped(tmp_path):
    logger = ScalarLogger(str(tmp_path))
    logger.write("train", {"loss": 0.5, "learning_rate": None}, 1)
    logger.write("train", {"loss": 0.25}, 2)
    logger.flush()
    assert _read(str(tmp_path / "train")) == {"loss": [(1, 0.5), (2, 0.25)]}


def test_nothing_is_written_without_log_dir_or_off_the_chief(tmp_path):
    assert ScalarLogger(None).writer("train") is None
    off = ScalarLogger(str(tmp_path / "logs"), enabled=lambda: False)
    off.write("train", {"loss": 1.0}, 1)
    assert not (tmp_path / "logs").exists()


def test_progress_shows_the_overall_rate_but_no_per_layer_rates():
    logs = {"loss": 1.0, "accuracy": 0.5, "firing_rate": 10.0, "firing_rate_alif0": 8.0,
            "firing_rate/alif0": 8.0}
    assert progress_logs(logs) == {"loss": 1.0, "accuracy": 0.5, "firing_rate": 10.0}


def test_epoch_means_keep_the_last_value_of_running_metrics():
    from kspike.training.logging import EpochMeans
    means = EpochMeans(["accuracy"])
    assert means.means() == {}
    for loss, accuracy in ((1.0, 0.2), (2.0, 0.4), (6.0, 0.9)):
        means.add({"loss": loss, "accuracy": accuracy})
    assert means.means() == pytest.approx({"loss": 3.0, "accuracy": 0.9})


def test_epoch_scalars_learning_rate_and_callbacks(tmp_path):
    import keras
    from kspike.training import logging
    optimizer = keras.optimizers.SGD(0.25)
    assert logging.learning_rate(optimizer) == 0.25
    assert logging.learning_rate(object()) is None
    logger = ScalarLogger(str(tmp_path))
    epoch_logs = {"loss": 0.5, "val_loss": 0.7}
    logger.write_epoch(epoch_logs, optimizer, 3)
    logger.write_step({"loss": 0.375}, optimizer, 4)
    logger.flush()
    assert epoch_logs == {"loss": 0.5, "val_loss": 0.7, "learning_rate": 0.25}
    assert _read(str(tmp_path / "train")) == {
        "epoch_loss": [(3, 0.5)], "epoch_learning_rate": [(3, 0.25)], "loss": [(4, 0.375)],
        "learning_rate": [(4, 0.25)]}
    no_rate = {"loss": 1.0}
    ScalarLogger(None).write_epoch(no_rate, object(), 1)
    assert no_rate == {"loss": 1.0}
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callbacks, history, proxy = logging.callback_list([], model, optimizer, 0, 1, 2)
    assert isinstance(history, keras.callbacks.History) and proxy.optimizer is optimizer
    proxy.stop_training = True
    assert not getattr(model, "stop_training", False)  # the user's model is left alone
    assert proxy.layers == model.layers
    assert logging.active_connections(model) is None
