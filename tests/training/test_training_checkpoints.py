"""kspike.training.checkpoints: atomic writing, listing, restore."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kspike.training import checkpoints


def _state(value):
    return tf.train.Checkpoint(v=tf.Variable(value))


def test_save_lists_and_prunes_only_kspike_checkpoints(tmp_path):
    (tmp_path / "ckpt-0000000001").mkdir()  # no marker: not ours, never touched
    (tmp_path / "notes.txt").write_text("mine")
    writer = checkpoints.CheckpointWriter(tmp_path, keep=2)
    for step in (2, 4, 6):
        meta = checkpoints.checkpoint_metadata(step, 0, step, 0.1, "net")
        writer.save(_state(float(step)), step, meta)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [4, 6]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000001", "ckpt-0000000004",
                                            "ckpt-0000000006", "notes.txt"]
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert latest.endswith("ckpt-0000000006")
    assert checkpoints.read_metadata(latest) == (6, 0, 6)
    restored = _state(0.0)
    checkpoints.read_state(restored, latest)
    assert float(restored.v.numpy()) == 6.0


def test_a_failing_write_leaves_no_temporary_and_the_previous_latest(tmp_path, monkeypatch):
    writer = checkpoints.CheckpointWriter(tmp_path, keep=2)
    writer.save(_state(1.0), 1, checkpoints.checkpoint_metadata(1, 0, 1, None, "net"))

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        writer.save(_state(2.0), 2, {"step": 2})
    assert os.listdir(tmp_path) == ["ckpt-0000000001"]


def test_metadata_and_state_errors(tmp_path):
    bad = tmp_path / "ckpt-0000000003"
    bad.mkdir()
    (bad / checkpoints.MARKER).write_text("{not json")
    with pytest.raises(ValueError, match="ckpt-0000000003.*not valid kspike checkpoint"):
        checkpoints.read_metadata(str(bad))
    writer = checkpoints.CheckpointWriter(tmp_path / "other", keep=1)
    path = writer.save(tf.train.Checkpoint(w=tf.Variable(np.zeros(3))), 1, {"step": 1})
    with pytest.raises(ValueError, match="does not match"):
        checkpoints.read_state(tf.train.Checkpoint(u=tf.Variable(1.0)), path)


def test_damage_is_found_from_the_recorded_digests(tmp_path):
    writer = checkpoints.CheckpointWriter(tmp_path, keep=3)
    path = writer.save(_state(1.0), 1, checkpoints.checkpoint_metadata(1, 0, 1, None, "net"))
    assert checkpoints.damage(path) is None and checkpoints.damage(path, 1) is None
    assert checkpoints.damage(path, 2) == "its marker is for step 1"
    data = [n for n in os.listdir(path) if n.startswith("state.data")][0]
    with open(os.path.join(path, data), "ab") as handle:
        handle.write(b"x")
    assert "bytes" in checkpoints.damage(path)
    os.remove(os.path.join(path, checkpoints.MARKER))
    assert "no completion marker" in checkpoints.damage(path)


def test_restore_latest_moves_damaged_ones_aside_and_reads_the_next(tmp_path):
    writer = checkpoints.CheckpointWriter(tmp_path, keep=3)
    for step in (1, 2):
        writer.save(_state(float(step)), step,
                    checkpoints.checkpoint_metadata(step, 0, step, None, "net"))
    os.remove(tmp_path / "ckpt-0000000002" / "state.index")
    restored = _state(0.0)
    with pytest.warns(UserWarning, match=r"ckpt-0000000002 is damaged \(state.index is "
                                         r"missing\).*resuming from .*ckpt-0000000001"):
        path, value = checkpoints.restore_latest(
            str(tmp_path), lambda p: (checkpoints.read_state(restored, p), p)[1])
    assert path.endswith("ckpt-0000000001") and float(restored.v.numpy()) == 1.0
    names = sorted(os.listdir(tmp_path))
    assert names[0] == "ckpt-0000000001" and names[1].startswith("ckpt-0000000002.damaged-")


def test_pruning_renames_before_deleting_and_leftovers_are_removed(tmp_path, monkeypatch):
    writer = checkpoints.CheckpointWriter(tmp_path, keep=1)
    writer.save(_state(1.0), 1, {"step": 1})
    seen = []
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda p, **k: seen.append(p))
    writer.save(_state(2.0), 2, {"step": 2})  # the deletion "fails" half-way: nothing deleted
    assert os.path.basename(seen[0]).startswith(checkpoints.PRUNE_PREFIX)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [2]
    monkeypatch.undo()
    writer.remove_leftovers()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000002"]


def test_is_chief_of_multi_worker_clusters():
    from types import SimpleNamespace

    def strategy(cluster, task_type, task_id):
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
        return SimpleNamespace(cluster_resolver=resolver)

    assert checkpoints.is_chief(None)
    workers = {"worker": ["a:1", "b:1"]}
    assert checkpoints.is_chief(strategy(workers, "worker", 0))
    assert not checkpoints.is_chief(strategy(workers, "worker", 1))
    with_chief = {"chief": ["c:1"], "worker": ["a:1"]}
    assert checkpoints.is_chief(strategy(with_chief, "chief", 0))
    assert not checkpoints.is_chief(strategy(with_chief, "worker", 0))


def test_save_run_and_resume_round_trip(tmp_path):
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    manager = checkpoints.CheckpointManager(str(tmp_path), keep=2)
    assert manager.resume(model, optimizer, None, False) == (None, None)
    saved = [w.numpy() for w in model.trainable_variables]
    path = manager.save_run(model, optimizer, None, 7, 1, 3, 0.5)
    assert path.endswith("ckpt-0000000007")
    for w in model.trainable_variables:
        w.assign(w + 1.0)
    other = keras.optimizers.SGD(0.3)
    other.build(model.trainable_variables)
    with pytest.warns(UserWarning, match="learning rate 0.1 of the checkpoint"):
        restored, position = manager.resume(model, other, None, False)
    assert restored == path and position == (7, 1, 3)
    for a, b in zip(saved, model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
