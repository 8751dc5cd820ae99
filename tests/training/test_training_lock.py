"""kspike.training.lock: the checkpoint directory's lock and its stale-lock rules."""
import json
import os

import pytest

from kspike.training.lock import (CheckpointDirectoryInUseError, CheckpointLock, LOCK_NAME,
                                  stale_reason)

ME = {"host": "h", "pid": 10, "boot_id": "boot-1", "pid_namespace": "pid:[1]"}


def test_stale_rules_do_not_need_visible_pids():
    other_host = {"host": "g", "pid": 999999999, "boot_id": "boot-9", "pid_namespace": "x"}
    assert stale_reason(other_host, 5.0, 60.0, ME) is None  # heartbeat fresh: alive
    assert "heartbeat" in stale_reason(other_host, 61.0, 60.0, ME)
    rebooted = dict(ME, boot_id="boot-0", pid=os.getpid())
    assert stale_reason(rebooted, 5.0, 60.0, ME) == "this host rebooted since"
    container = dict(ME, pid_namespace="pid:[2]", pid=999999999)  # pid not comparable
    assert stale_reason(container, 5.0, 60.0, ME) is None
    gone = dict(ME, pid=999999999)
    assert stale_reason(gone, 5.0, 60.0, ME) == "process 999999999 is gone"


def test_acquire_refuse_release(tmp_path):
    first = CheckpointLock(str(tmp_path / "ckpt"))
    first.acquire()
    info = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["started"].endswith("Z")
    # Same process, second owner: its pid is alive, so the lock is not stale.
    with pytest.raises(CheckpointDirectoryInUseError, match=f"/{os.getpid()} since "):
        CheckpointLock(str(tmp_path / "ckpt")).acquire()
    before = os.stat(tmp_path / "ckpt" / LOCK_NAME).st_mtime
    os.utime(tmp_path / "ckpt" / LOCK_NAME, (before - 50, before - 50))
    first.refresh(force=True)
    assert os.stat(tmp_path / "ckpt" / LOCK_NAME).st_mtime > before - 50
    first.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    first.release()  # twice is harmless


def test_release_leaves_a_lock_taken_over_by_another_alone(tmp_path):
    lock = CheckpointLock(str(tmp_path))
    lock.acquire()
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "g", "pid": 1, "token": "someone else"}))
    lock.release()
    assert path.exists()
