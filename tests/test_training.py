"""kspike.Trainer: learning, callbacks, progress, TensorBoard, checkpoints, resume, non-finite
guard, no retracing, reproducibility and tf.distribute."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike.training import NonFiniteLossError, Trainer, latest_checkpoint

pytestmark = pytest.mark.heavy(110)

T = 30
N_IN = 6


def delayed_cue(n, seed=0):
    """Cue on channel 0 or 1 during the first 5 steps, noise after; label = cued side."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype("int32")
    x = (rng.random((n, T, N_IN)) < 0.03).astype("float32")
    x[:, :, :2] = 0.0
    cue = rng.random((n, 5)) < 0.8
    x[np.arange(n), :5, labels] = 0.0
    for i in range(n):
        x[i, :5, labels[i]] = cue[i]
    return x, labels


def make_model(units=(24,), seed=1, connectivity=None):
    inp = keras.Input((T, N_IN))
    h = inp
    for i, u in enumerate(units):
        h = keras.layers.RNN(kspike.ALIF(u, thr=0.05, tau_adaptation=200.0, seed=seed + i,
                                         connectivity=connectivity),
                             return_sequences=True, name=f"alif{i}")(h)
    y = kspike.LeakyReadout(2, tau=10.0, seed=seed + 10, name="readout")(h)
    logits = keras.layers.Lambda(lambda t: tf.reduce_mean(t[:, -5:], axis=1), name="last")(y)
    return keras.Model(inp, logits, name="cue_net")


def dataset(n=64, batch=16, seed=0):
    x, y = delayed_cue(n, seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Recorder(keras.callbacks.Callback):
    def __init__(self, trainer=None):
        super().__init__()
        self.trainer = trainer
        self.calls = {}
        self.batch_logs = []
        self.step_losses = []

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def on_train_begin(self, logs=None):
        self._count("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._count("epoch_begin")

    def on_train_batch_end(self, batch, logs=None):
        self._count("batch_end")
        self.batch_logs.append(dict(logs))
        if self.trainer is not None:
            self.step_losses.append(self.trainer.last_step_logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        self._count("epoch_end")

    def on_train_end(self, logs=None):
        self._count("train_end")


def test_loss_decreases_on_delayed_cue():
    model = make_model()
    trainer = Trainer(model, keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"], seed=0,
                      verbose=0)
    history = trainer.fit(dataset(96, 16).repeat(), steps=36, steps_per_epoch=6)
    losses = history.history["loss"]
    assert len(losses) == 6 and trainer.step == 36
    assert losses[-1] < 0.75 * losses[0], losses
    assert history.history["accuracy"][-1] > 0.8
    assert all(r > 1.0 for r in history.history["firing_rate"]), history.history["firing_rate"]


def test_no_retracing_per_batch():
    model = make_model()
    trainer = Trainer(model, "adam", LOSS, metrics=["accuracy"], verbose=0)
    trainer.fit(dataset(32, 8), epochs=2, validation_data=dataset(16, 8))
    trainer.evaluate(dataset(24, 8))
    assert trainer.step == 8
    assert trainer.trace_counts == {"train": 1, "evaluate": 1}
    # A partial last batch (8, 8, 4) adds one shape-generic trace, reused by every later
    # batch of any size.
    ragged = dataset(20, 8)
    trainer.fit(ragged, epochs=5, validation_data=ragged)
    trainer.fit(dataset(15, 5), epochs=6)
    assert trainer.step == 8 + 3 * 3 + 3
    assert trainer.trace_counts == {"train": 2, "evaluate": 2}


def test_evaluate_matches_manual_mean():
    model = make_model()
    ds = dataset(24, 8)
    reg = kspike.FiringRateRegularizer(target=10.0, strength=0.05)
    trainer = Trainer(model, "adam", LOSS, regularizers=[reg], metrics=["accuracy"],
                      verbose=0)
    result = trainer.evaluate(ds)
    losses, correct = [], 0
    for x, y in ds:
        predictions, acts = kspike.regularizers.record_activity(model, x)
        rate = acts[0].spikes.numpy().mean(axis=(0, 1))
        losses.append(float(LOSS(y, predictions)) + 0.05 * np.sum((rate - 0.01) ** 2))
        correct += int(np.sum(np.argmax(predictions.numpy(), -1) == y.numpy()))
    np.testing.assert_allclose(result["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], correct / 24, rtol=1e-6)


def test_fit_on_a_list_of_numpy_batches():
    x, y = delayed_cue(32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    trainer = Trainer(make_model(), "adam", LOSS, metrics=["accuracy"], verbose=0)
    history = trainer.fit(batches, epochs=2)
    assert trainer.step == 8 and len(history.history["loss"]) == 2
    assert trainer.trace_counts["train"] == 1


def test_seeded_runs_are_identical():
    def run():
        keras.utils.set_random_seed(3)
        model = make_model()
        trainer = Trainer(model, keras.optimizers.Adam(1e-2), LOSS, seed=5, verbose=0)
        recorder = Recorder(trainer)
        ds = dataset(64, 16).shuffle(64, seed=2, reshuffle_each_iteration=False)
        trainer.fit(ds, steps=5, callbacks=[recorder])
        return recorder.step_losses, [w.numpy() for w in model.trainable_variables]

    losses_a, weights_a = run()
    losses_b, weights_b = run()
    assert len(losses_a) == 5 and len(set(losses_a)) > 1
    assert losses_a == losses_b
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)


def test_callbacks_history_and_learning_rate_schedule():
    model = make_model()
    optimizer = keras.optimizers.SGD(0.1)
    trainer = Trainer(model, optimizer, LOSS, metrics=["accuracy"], verbose=0)
    recorder = Recorder(trainer)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))
    # min_delta that no epoch can reach: EarlyStopping stops after the second epoch.
    stopper = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100.0, patience=0)
    history = trainer.fit(dataset(32, 16), epochs=5, callbacks=[recorder, schedule, stopper])
    assert isinstance(history, keras.callbacks.History)
    assert history.epoch == [0, 1]
    assert recorder.calls == {"train_begin": 1, "epoch_begin": 2, "batch_end": 4,
                              "epoch_end": 2, "train_end": 1}
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.05], rtol=1e-6)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.05, rtol=1e-6)
    assert {"loss", "accuracy", "firing_rate"} <= set(recorder.batch_logs[0])
    assert set(history.history) >= {"loss", "accuracy", "firing_rate", "learning_rate"}
    assert recorder.model.optimizer is optimizer


def test_progress_bar_shows_loss_metrics_and_rate(capsys):
    trainer = Trainer(make_model(), "adam", LOSS, metrics=["accuracy"], verbose=1)
    trainer.fit(dataset(32, 16), epochs=1)
    out = capsys.readouterr().out
    for word in ("loss", "accuracy", "firing_rate", "2/2"):
        assert word in out, out


def _scalars(directory):
    values = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return values


def test_tensorboard_scalars(tmp_path):
    model = make_model(units=(10, 8))
    log_dir = tmp_path / "logs"
    trainer = Trainer(model, keras.optimizers.Adam(0.01), LOSS, metrics=["accuracy"],
                      log_dir=log_dir, verbose=0)
    recorder = Recorder(trainer)
    trainer.fit(dataset(32, 16), epochs=2, validation_data=dataset(16, 16, seed=1),
                callbacks=[recorder])
    train = _scalars(log_dir / "train")
    for tag in ("loss", "accuracy", "firing_rate", "firing_rate/alif0", "firing_rate/alif1",
                "learning_rate", "epoch_loss", "epoch_firing_rate"):
        assert tag in train, sorted(train)
    assert [s for s, _ in train["loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in train["loss"]], recorder.step_losses, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], 0.01, rtol=1e-6)
    validation = _scalars(log_dir / "validation")
    assert [s for s, _ in validation["epoch_loss"]] == [2, 4]
    assert "epoch_accuracy" in validation and "epoch_firing_rate" in validation


def test_checkpoints_are_atomic_and_leave_other_files_alone(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "ckpt-0000000001").mkdir()          # looks like ours but is not a kspike checkpoint
    (ckpt / "ckpt-0000000001" / "data").write_text("mine too")
    stale = ckpt / ".kspike-tmp-999999999-abc"   # left by a crashed process
    stale.mkdir()
    trainer = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, checkpoint_every=2,
                      keep_checkpoints=2, verbose=0)
    trainer.fit(dataset(96, 16), steps=6)
    names = sorted(os.listdir(ckpt))
    assert names == ["ckpt-0000000001", "ckpt-0000000004", "ckpt-0000000006", "notes.txt"]
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert (ckpt / "ckpt-0000000001" / "data").read_text() == "mine too"
    meta = json.loads((ckpt / "ckpt-0000000006" / "kspike_checkpoint.json").read_text())
    assert (meta["step"], meta["epoch"], meta["position"]) == (6, 1, 0)

    # A crash in the middle of writing leaves the previous checkpoint as the latest one.
    import kspike.training as training
    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(training.json, "dump", crash)
    trainer2 = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, checkpoint_every=1,
                       verbose=0)
    with pytest.raises(OSError, match="disk full"):
        trainer2.fit(dataset(96, 16), steps=8)
    assert latest_checkpoint(ckpt).endswith("ckpt-0000000006")
    assert not [n for n in os.listdir(ckpt) if n.startswith(".kspike-tmp-")]


def test_resume_continues_step_count(tmp_path):
    ckpt = tmp_path / "ckpt"
    ds = dataset(48, 16)  # 3 batches per epoch
    first = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, checkpoint_every=2,
                    verbose=0)
    first.fit(ds, steps=4)
    weights = [w.numpy() for w in first.model.trainable_variables]
    second = Trainer(make_model(seed=7), "adam", LOSS, checkpoint_dir=ckpt, verbose=0)
    recorder = Recorder(second)
    second.fit(ds, steps=7, callbacks=[recorder])
    assert recorder.calls["batch_end"] == 3 and second.step == 7
    # Restored weights replaced the fresh model's (seed 7) before training went on.
    third = Trainer(make_model(seed=9), "adam", LOSS, checkpoint_dir=ckpt, verbose=0)
    third.fit(ds, steps=7)  # already there: nothing to train, weights restored
    assert third.step == 7
    for a, b in zip(second.model.trainable_variables, third.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not all(np.array_equal(a, b.numpy())
                   for a, b in zip(weights, second.model.trainable_variables))


_RESUME_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, {tests!r})
    import keras
    import test_training as t
    from kspike.training import Trainer

    def run(ckpt, out, kill_at=None):
        keras.utils.set_random_seed(0)
        model = t.make_model()
        trainer = Trainer(model, keras.optimizers.Adam(1e-2), t.LOSS, checkpoint_dir=ckpt,
                          checkpoint_every=2, seed=0, verbose=0)

        class Log(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                with open(out, "a") as handle:
                    handle.write(json.dumps([trainer.step, trainer.last_step_logs["loss"]])
                                 + "\\n")
                if trainer.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        trainer.fit(t.dataset(48, 16), steps=8, callbacks=[Log()])

    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
""")


def _read_losses(path):
    return [tuple(json.loads(line)) for line in open(path)]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "resume_run.py"
    script.write_text(_RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "interrupted.jsonl")
    killed = subprocess.run([sys.executable, str(script), ckpt, log, "5"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in _read_losses(log)] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(ckpt).endswith("ckpt-0000000004")
    resumed = subprocess.run([sys.executable, str(script), ckpt, log], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    interrupted = _read_losses(log)
    # Steps 1-5 from the killed run, then 5-8 again from the checkpoint of step 4.
    assert [s for s, _ in interrupted] == [1, 2, 3, 4, 5, 5, 6, 7, 8]

    # The uninterrupted reference runs in this process, from the same script.
    reference_log = str(tmp_path / "reference.jsonl")
    sys.path.insert(0, str(tmp_path))
    try:
        import resume_run
        resume_run.run(str(tmp_path / "ref"), reference_log)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("resume_run", None)
    expected = dict(_read_losses(reference_log))
    after_resume = interrupted[5:]
    assert [loss for _, loss in after_resume] == [expected[s] for s, _ in after_resume]
    assert dict(interrupted[:5]) == {s: expected[s] for s in range(1, 6)}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    x, y = delayed_cue(64)
    x[40] = np.nan  # the third batch of 16
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    ckpt = tmp_path / "ckpt"
    model = make_model()
    trainer = Trainer(model, keras.optimizers.Adam(1e-2), LOSS, checkpoint_dir=ckpt,
                      checkpoint_every=1, verbose=0)
    snapshot = {}

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snapshot[trainer.step] = [w.numpy().copy() for w in model.trainable_variables]

    with pytest.raises(NonFiniteLossError, match=r"step 3.*ckpt-0000000002"):
        trainer.fit(ds, steps=4, callbacks=[Snapshot()])
    assert trainer.step == 2
    assert latest_checkpoint(ckpt).endswith("ckpt-0000000002")
    for before, now in zip(snapshot[2], model.trainable_variables):
        np.testing.assert_array_equal(before, now.numpy())  # the bad update was not applied


def test_continuing_an_epoch_in_process_and_skip_on_resume(tmp_path):
    x, y = delayed_cue(48)
    x[40] = np.nan  # only the third batch of 16 is bad
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    ckpt = tmp_path / "ckpt"
    trainer = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, verbose=0)
    trainer.fit(ds, steps=2)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.fit(ds, steps=3)  # the open epoch goes on with its third batch
    # Resuming from the checkpoint of step 2 skips the two consumed batches by default ...
    skipping = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, verbose=0)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        skipping.fit(ds, steps=3)
    # ... or restarts the epoch's data at its first batch.
    fresh = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, skip_on_resume=False,
                    verbose=0)
    fresh.fit(ds, steps=3)
    assert fresh.step == 3 and np.isfinite(fresh.last_step_logs["loss"])


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    sys.path.insert(0, {tests!r})
    import contextlib
    import keras
    import numpy as np
    import test_training as t
    from kspike.training import Trainer

    results = {{}}
    for name in ("single", "mirrored"):
        strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
                    if name == "mirrored" else None)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = t.make_model()
            optimizer = keras.optimizers.Adam(1e-2)
        trainer = Trainer(model, optimizer, t.LOSS, metrics=["accuracy"], strategy=strategy,
                          checkpoint_dir=os.path.join({tmp!r}, name), verbose=0)
        history = trainer.fit(t.dataset(64, 16), epochs=2)
        results[name] = {{"history": history.history, "replicas": 2 if strategy else 1,
                         "evaluate": trainer.evaluate(t.dataset(32, 16, seed=1)),
                         "traces": trainer.trace_counts["train"],
                         "weights": [w.numpy().tolist() for w in model.trainable_variables]}}
    # A checkpoint written under the strategy restores on a single device.
    restored = t.make_model(seed=11)
    Trainer(restored, keras.optimizers.Adam(1e-2), t.LOSS, verbose=0,
            checkpoint_dir=os.path.join({tmp!r}, "mirrored")).fit(t.dataset(64, 16), epochs=2)
    results["restored"] = [w.numpy().tolist() for w in restored.trainable_variables]
    print(json.dumps(results))
""")


def test_mirrored_strategy_matches_single_device(tmp_path):
    script = tmp_path / "mirrored_run.py"
    script.write_text(_MIRRORED_SCRIPT.format(tests=os.path.dirname(__file__),
                                              tmp=str(tmp_path)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    single, mirrored = results["single"], results["mirrored"]
    assert mirrored["replicas"] == 2 and mirrored["traces"] == 1
    for key in ("loss", "accuracy", "firing_rate"):
        np.testing.assert_allclose(mirrored["history"][key], single["history"][key], rtol=1e-5)
    for key in ("loss", "accuracy", "firing_rate"):
        np.testing.assert_allclose(mirrored["evaluate"][key], single["evaluate"][key], rtol=1e-5)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)
    for a, b in zip(results["restored"], mirrored["weights"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # The run trained: weights moved away from the initial ones by much more than the tolerance.
    initial = [w.numpy() for w in make_model().trainable_variables]
    assert max(np.abs(np.array(a) - b).max() for a, b in zip(single["weights"], initial)) > 1e-2


def test_deep_r_optimizer_passes_through_and_active_connections_are_logged():
    model = make_model(units=(16,), connectivity=0.3)
    optimizer = kspike.DeepR(keras.optimizers.Adam(1e-2), l1=1e-3, seed=0)
    trainer = Trainer(model, optimizer, LOSS, verbose=0)
    assert trainer.optimizer is optimizer
    history = trainer.fit(dataset(32, 16), epochs=2)
    expected = kspike.rewiring.active_connections(model)
    assert history.history["active_connections"] == [expected, expected]
    assert expected > 0


def test_clear_errors(tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        Trainer("model", "adam", LOSS)
    with pytest.raises(ValueError, match="`loss` is required"):
        Trainer(model, "adam")
    with pytest.raises(ValueError, match="not a Keras loss name"):
        Trainer(model, "adam", "no_such_loss")
    with pytest.raises(TypeError, match="`rule` must be a kspike.learning.LearningRule"):
        Trainer(model, "adam", LOSS, rule="bptt")
    with pytest.raises(ValueError, match="LossScaleOptimizer.*Adam"):
        Trainer(model, keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), LOSS)
    with pytest.raises(ValueError, match="`checkpoint_every` must be an integer >= 1"):
        Trainer(model, "adam", LOSS, checkpoint_every=0)
    with pytest.raises(ValueError, match="strategy.scope"):
        Trainer(model, "adam", LOSS, strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))
    trainer = Trainer(model, "adam", LOSS, verbose=0)
    flat = tf.data.Dataset.from_tensor_slices((np.zeros((8, T), "float32"),
                                               np.zeros(8, "int32"))).batch(4)
    with pytest.raises(ValueError, match=r"\(batch, time, features\).*\(4, 30\)"):
        trainer.fit(flat)
    with pytest.raises(ValueError, match="tuple \\(x, y\\)"):
        trainer.fit(tf.data.Dataset.from_tensor_slices(np.zeros((8, T, N_IN), "float32")).batch(4))
    with pytest.raises(TypeError, match="re-iterable"):
        trainer.fit(iter([(np.zeros((4, T, N_IN), "float32"), np.zeros(4, "int32"))]))
    with pytest.raises(ValueError, match="infinite"):
        trainer.fit(dataset(16, 8).repeat())

    other = tmp_path / "other"
    inp = keras.Input((T, N_IN))
    small = keras.Model(inp, keras.layers.Lambda(lambda t: t[:, -1, :2])(
        keras.layers.RNN(kspike.LIF(3), return_sequences=True)(inp)))
    Trainer(small, "adam", LOSS, checkpoint_dir=other, verbose=0).fit(dataset(16, 8), steps=1)
    with pytest.raises(ValueError, match=r"ckpt-0000000001.*does not match"):
        Trainer(make_model(), "adam", LOSS, checkpoint_dir=other, verbose=0).fit(dataset(16, 8))


def test_only_the_chief_writes_checkpoints_and_logs(tmp_path):
    from types import SimpleNamespace
    trainer = Trainer(make_model(), "adam", LOSS, checkpoint_dir=tmp_path / "ckpt",
                      log_dir=tmp_path / "logs", verbose=0)
    assert trainer._is_chief()
    trainer._prepare(next(iter(dataset(16, 8))))

    def as_task(cluster, task_type, task_id):
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
        trainer.strategy = SimpleNamespace(cluster_resolver=resolver)
        return trainer._is_chief()

    workers = {"worker": ["a:1", "b:1"]}
    assert as_task(workers, "worker", 0) and not as_task(workers, "worker", 1)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert as_task(with_chief, "chief", 0) and not as_task(with_chief, "worker", 0)
    # A non-chief worker takes part in saving but leaves checkpoint_dir and log_dir alone.
    trainer.step = 1
    trainer._save()
    assert trainer._writer("train") is None
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_loss_as_a_plain_function_or_a_name():
    """A callable loss(y_true, y_pred) and a Keras loss name work like the Loss object."""
    ds = dataset(16, 8)
    reference = Trainer(make_model(), "adam", LOSS, verbose=0).evaluate(ds)["loss"]

    def my_loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    by_function = Trainer(make_model(), "adam", my_loss, verbose=0).evaluate(ds)["loss"]
    np.testing.assert_allclose(by_function, reference, rtol=1e-6)
    probabilities = keras.Sequential([make_model(), keras.layers.Softmax()])
    by_name = Trainer(probabilities, "adam", "sparse_categorical_crossentropy",
                      verbose=0).evaluate(ds)["loss"]
    np.testing.assert_allclose(by_name, reference, rtol=1e-5)


def test_resume_restores_the_adaptive_feedback_of_eprop(tmp_path):
    """The rule's own state (e-prop's trained feedback matrices) is checkpointed too: an
    interrupted and resumed run ends with the same feedback as an uninterrupted one."""
    x, y = delayed_cue(16)
    onehot = np.eye(2, dtype="float32")[y][:, None, :].repeat(T, axis=1)
    ds = tf.data.Dataset.from_tensor_slices((x, onehot)).batch(8)

    def build(directory):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((T, N_IN)),
                                  keras.layers.RNN(kspike.ALIF(12, thr=0.05, seed=1),
                                                   return_sequences=True),
                                  kspike.LeakyReadout(2, seed=2)])
        rule = kspike.learning.EProp(feedback="adaptive", seed=0)
        return Trainer(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
                       rule=rule, checkpoint_dir=str(directory), verbose=0), rule

    straight, straight_rule = build(tmp_path / "straight")
    straight.fit(ds, steps=4)
    first, _ = build(tmp_path / "resumed")
    first.fit(ds, steps=2)
    resumed, resumed_rule = build(tmp_path / "resumed")
    resumed.fit(ds, steps=4)
    assert resumed.step == 4
    assert len(resumed_rule.feedback_weights) == len(straight_rule.feedback_weights) == 1
    np.testing.assert_allclose(resumed_rule.feedback_weights[0].numpy(),
                               straight_rule.feedback_weights[0].numpy(), rtol=1e-5, atol=1e-7)
