"""kspike.training.logging: TensorBoard scalars and progress-bar logs."""
import glob
import os

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
