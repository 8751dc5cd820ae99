"""Multi-worker training on the loopback interface, a recurrent ALIF network with DEEP R: 2
worker processes give the weights of one process, only the chief writes checkpoints, and a
killed worker resumes exactly (kspike.distribute, docs/distributed.md). The conv SNN, a missing
peer and TF_CONFIG: tests/test_multiworker_conv.py."""

import os
import signal
import time

import numpy as np
import pytest

from multiworker_common import (STEPS, TIMEOUT, assert_same, checkpoint_steps, load,
                                single_process, start_workers, wait)

pytestmark = pytest.mark.heavy(110)


def test_two_workers_match_one_process_and_a_killed_worker_resumes(tmp_path):
    """Two workers run to a checkpoint, one is killed, the job restarts from the chief's
    checkpoint: both workers end with the weights of one uninterrupted process."""
    checkpoint_dir = tmp_path / "ckpt"
    pause_at = 3
    processes, outputs = start_workers(tmp_path, "killed", checkpoint_dir, pause_at=pause_at)
    # The one-process reference runs here while the workers train.
    single = single_process(tmp_path, "single", tmp_path / "single_ckpt", workers=processes)
    deadline = time.monotonic() + TIMEOUT
    while not (os.path.exists(outputs[1] + ".paused")
               and os.path.isdir(checkpoint_dir) and pause_at in checkpoint_steps(checkpoint_dir)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            for p in processes:
                p.kill()
            pytest.fail("the workers did not reach the pause:\n"
                        + (tmp_path / "killed_0.log").read_text()[-3000:])
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait(TIMEOUT)
    # The chief is blocked in the all-reduce of the next step; a real cluster manager would
    # restart the whole job, as here.
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(TIMEOUT)
    assert max(checkpoint_steps(checkpoint_dir)) == pause_at
    processes, outputs = start_workers(tmp_path, "resumed", checkpoint_dir)
    wait(processes, tmp_path, "resumed")
    assert f"at step {pause_at}" in (tmp_path / "resumed_0.log").read_text()
    chief, other = load(outputs[0]), load(outputs[1])
    assert_same(chief, single)
    assert_same(other, single)
    # DEEP R really rewired during these steps: the active sets differ from the initial ones.
    assert any(np.any(np.asarray(chief["active"][p]) != np.asarray(chief["initial_active"][p]))
               for p in chief["active"])
    # Only the chief writes into the shared directory: one checkpoint per kept step, no
    # temporary entries left behind.
    assert checkpoint_steps(checkpoint_dir) == [STEPS - 1, STEPS]
    leftovers = [e for e in os.listdir(checkpoint_dir) if e.startswith(".")]
    assert leftovers == []
