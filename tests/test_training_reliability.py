"""kspike.Trainer: nothing is lost. Damaged, incomplete or foreign checkpoints, two trainers on
one directory, a pruning cut by a kill, unusable directories, a full log disk and a changed
learning rate, each with real files (and real processes where it is about processes)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from kspike.training import Trainer, latest_checkpoint
from test_training import LOSS, dataset, make_model

HERE = os.path.dirname(__file__)

pytestmark = pytest.mark.heavy(60)


def _trainer(ckpt, lr=1e-2, **kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("checkpoint_every", 2)
    kwargs.setdefault("keep_checkpoints", 3)
    return Trainer(make_model(), keras.optimizers.Adam(lr), LOSS, checkpoint_dir=ckpt, seed=0,
                   verbose=0, **kwargs)


def _weights(trainer):
    return [v.numpy() for v in trainer.model.trainable_variables]


def _truncate(path):
    data = [n for n in os.listdir(path) if n.startswith("state.data")][0]
    with open(os.path.join(path, data), "r+b") as handle:
        handle.truncate(os.path.getsize(os.path.join(path, data)) // 2)


def _flip(path):
    data = os.path.join(path, [n for n in os.listdir(path) if n.startswith("state.data")][0])
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 3] ^= 0xFF
    open(data, "wb").write(bytes(raw))


def _garbage_index(path):
    open(os.path.join(path, "state.index"), "wb").write(b"\x00garbage" * 20)


def _delete_index(path):
    os.remove(os.path.join(path, "state.index"))


@pytest.fixture(scope="module")
def six_steps_and_four(tmp_path_factory):
    """The weights of an uninterrupted 6-step run, and a directory holding the checkpoints 2
    and 4 of a run stopped after 4 steps (each test damages its own copy)."""
    keras.utils.set_random_seed(1234)
    base = tmp_path_factory.mktemp("damaged")
    reference = _trainer(base / "reference")
    reference.fit(dataset(48, 16), steps=6)
    _trainer(base / "ckpt").fit(dataset(48, 16), steps=4)
    weights = _weights(reference)
    keras.backend.clear_session()
    return weights, base / "ckpt"


@pytest.mark.parametrize("damage", [_truncate, _delete_index, _garbage_index, _flip])
def test_damaged_latest_checkpoint_is_set_aside_and_training_falls_back(tmp_path, damage,
                                                                        six_steps_and_four):
    reference, stopped = six_steps_and_four
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped, ckpt)
    assert sorted(os.listdir(ckpt)) == ["ckpt-0000000002", "ckpt-0000000004"]
    damage(str(ckpt / "ckpt-0000000004"))
    resumed = _trainer(ckpt)
    with pytest.warns(UserWarning, match=r"ckpt-0000000004.*damaged.*ckpt-0000000002"):
        resumed.fit(dataset(48, 16), steps=6)
    assert resumed.step == 6
    for a, b in zip(_weights(resumed), reference):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    aside = [n for n in os.listdir(ckpt) if n.startswith("ckpt-0000000004.damaged")]
    assert len(aside) == 1 and os.listdir(ckpt / aside[0])  # kept, not deleted
    assert latest_checkpoint(ckpt).endswith("ckpt-0000000006")


def test_a_checkpoint_without_marker_or_a_foreign_directory_is_moved_aside(tmp_path):
    ckpt = tmp_path / "ckpt"
    _trainer(ckpt).fit(dataset(48, 16), steps=4)
    os.remove(ckpt / "ckpt-0000000004" / "kspike_checkpoint.json")
    rerun = _trainer(ckpt)
    with pytest.warns(UserWarning, match=r"ckpt-0000000004 .*moved.*ckpt-0000000004\.incomplete"):
        rerun.fit(dataset(48, 16), steps=4)  # resumes from 2, trains 3 and 4
    assert rerun.step == 4 and latest_checkpoint(ckpt).endswith("ckpt-0000000004")
    meta = json.loads((ckpt / "ckpt-0000000004" / "kspike_checkpoint.json").read_text())
    assert meta["step"] == 4
    assert [n for n in os.listdir(ckpt) if n.startswith("ckpt-0000000004.incomplete")]

    user = tmp_path / "user"
    (user / "ckpt-0000000002").mkdir(parents=True)
    (user / "ckpt-0000000002" / "results.csv").write_text("mine")
    with pytest.warns(UserWarning, match=r"ckpt-0000000002 .*moved"):
        _trainer(user).fit(dataset(48, 16), steps=2)
    assert latest_checkpoint(user).endswith("ckpt-0000000002")
    moved = [n for n in os.listdir(user) if n.startswith("ckpt-0000000002.incomplete")]
    assert (user / moved[0] / "results.csv").read_text() == "mine"


_HOLD_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import keras
    from test_training import LOSS, dataset, make_model
    from kspike.training import Trainer

    ckpt, ready = sys.argv[1:3]

    class Hold(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            open(ready, "w").write(str(os.getpid()))
            time.sleep(240)          # until the test kills this process

    Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, verbose=0).fit(
        dataset(16, 16), steps=1, callbacks=[Hold()])
""")


def test_a_second_trainer_is_refused_and_takes_over_the_lock_of_a_killed_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_SCRIPT.format(tests=HERE))
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, str(script), str(ckpt), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    try:
        deadline = time.time() + 240
        while not ready.exists() and holder.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), holder.communicate()[1][-2000:]
        # A trainer holds the directory: a second one is refused and touches nothing.
        (ckpt / ".kspike-tmp-999999999-other").mkdir()
        second = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, verbose=0)
        pattern = (rf"checkpoint directory .*ckpt.* is in use by "
                   rf"{socket.gethostname()}/{holder.pid} since ")
        with pytest.raises(RuntimeError, match=pattern):
            second.fit(dataset(16, 16), steps=2)
        assert (ckpt / ".kspike-tmp-999999999-other").exists()
        assert second.step == 0
    finally:
        holder.kill()
        holder.wait(timeout=240)
    # Killed while holding it: the lock stays behind, and the next trainer takes it over.
    assert holder.returncode == -signal.SIGKILL
    assert (ckpt / "kspike.lock").exists()
    with pytest.warns(UserWarning, match=rf"stale lock of .*/{holder.pid} .*is gone"):
        second.fit(dataset(16, 16), steps=2)
    assert second.step == 2
    assert not (ckpt / "kspike.lock").exists()   # released when fit ends


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    from kspike.training.lock import CheckpointDirectoryInUseError, CheckpointLock
    lock_path = tmp_path / "kspike.lock"
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "boot_id": "x",
                                     "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(CheckpointDirectoryInUseError, match="in use by elsewhere/1 since"):
        CheckpointLock(str(tmp_path), stale_after=60).acquire()
    old = time.time() - 120
    os.utime(lock_path, (old, old))
    lock = CheckpointLock(str(tmp_path), stale_after=60)
    with pytest.warns(UserWarning, match="stale lock.*elsewhere/1"):
        lock.acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path.exists()


_PRUNE_SCRIPT = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {tests!r})
    from test_training import LOSS, dataset, make_model
    from kspike.training import Trainer

    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        # Killed while deleting an old checkpoint: its marker is gone, the state is not.
        marker = os.path.join(path, "kspike_checkpoint.json")
        if os.path.exists(marker):
            os.remove(marker)
            os.kill(os.getpid(), signal.SIGKILL)
        real_rmtree(path, *args, **kwargs)

    shutil.rmtree = killed_midway
    Trainer(make_model(), "adam", LOSS, checkpoint_dir=sys.argv[1], checkpoint_every=1,
            keep_checkpoints=2, verbose=0).fit(dataset(48, 16), steps=3)
""")


def test_a_pruning_cut_by_a_kill_is_finished_at_the_next_start(tmp_path):
    script = tmp_path / "prune.py"
    script.write_text(_PRUNE_SCRIPT.format(tests=HERE))
    ckpt = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    trainer = Trainer(make_model(), "adam", LOSS, checkpoint_dir=ckpt, checkpoint_every=1,
                      keep_checkpoints=2, verbose=0)
    trainer.fit(dataset(48, 16), steps=3)
    assert trainer.step == 3
    assert sorted(os.listdir(ckpt)) == ["ckpt-0000000002", "ckpt-0000000003"]


def test_unusable_directories_fail_at_construction(tmp_path):
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    model = make_model()
    with pytest.raises(ValueError, match=r"`checkpoint_dir` .*file.txt/ckpt.* below the "
                                         r"regular file .*file.txt"):
        Trainer(model, "adam", LOSS, checkpoint_dir=plain / "ckpt")
    with pytest.raises(ValueError, match=r"`log_dir` .*below the regular file"):
        Trainer(model, "adam", LOSS, log_dir=plain / "a" / "logs")
    # /proc takes no new directories, even for root.
    with pytest.raises(ValueError, match=r"`checkpoint_dir` '/proc/kspike-test/ckpt' .*not "
                                         r"writable.*/proc"):
        Trainer(model, "adam", LOSS, checkpoint_dir="/proc/kspike-test/ckpt")
    with pytest.raises(ValueError, match=r"`log_dir` .*not writable"):
        Trainer(model, "adam", LOSS, log_dir="/proc/kspike-test")
    assert not (tmp_path / "ckpt").exists()


class _FullDiskWriter:
    def as_default(self, step=None):
        return _Null()

    def flush(self):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_a_full_log_disk_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(tf.summary, "create_file_writer", lambda path: _FullDiskWriter())
    trainer = _trainer(tmp_path / "ckpt", checkpoint_every=1, log_dir=tmp_path / "logs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(dataset(48, 16), steps=3, validation_data=dataset(16, 16))
    messages = [str(w.message) for w in caught if "TensorBoard" in str(w.message)]
    assert len(messages) == 1 and "No space left on device" in messages[0], messages
    assert trainer.step == 3 and latest_checkpoint(tmp_path / "ckpt").endswith("ckpt-0000000003")


def test_a_rerun_with_another_learning_rate_warns_or_applies_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    _trainer(ckpt, lr=1e-2).fit(dataset(32, 16), steps=2)
    rerun = _trainer(ckpt, lr=1e-3)
    with pytest.warns(UserWarning, match=r"learning rate 0\.01 .*checkpoint.*0\.001"):
        rerun.fit(dataset(32, 16), steps=3)
    np.testing.assert_allclose(rerun._learning_rate(), 1e-2, rtol=1e-6)
    applied = _trainer(ckpt, lr=1e-3, override_learning_rate=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied.fit(dataset(32, 16), steps=4)
    assert not [w for w in caught if "learning rate" in str(w.message)]
    np.testing.assert_allclose(applied._learning_rate(), 1e-3, rtol=1e-6)
    assert applied.step == 4
