"""Multi-worker training on the loopback interface: 2 worker processes give the weights of one
process (a recurrent ALIF network with DEEP R, and a conv SNN), only the chief writes
checkpoints, a killed worker resumes exactly, and a missing peer fails in bounded time
(kspike.distribute, docs/distributed.md)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kspike.distribute import free_ports, parse_tf_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiworker_worker.py")
ROOT = os.path.dirname(HERE)
STEPS = 6
TIMEOUT = 150  # per subprocess: a loaded 2-core machine


def environment(tf_config=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def start_workers(tmp_path, name, checkpoint_dir, pause_at=None, model="alif"):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, outputs = [], []
    for index in range(2):
        out = str(tmp_path / f"{name}_{index}.json")
        args = [sys.executable, WORKER, out, str(checkpoint_dir), str(STEPS)]
        if pause_at is not None and index == 1:
            args.append(str(pause_at))
        args += ["--model", model]
        log = open(tmp_path / f"{name}_{index}.log", "w")
        processes.append(subprocess.Popen(
            args, env=environment({"cluster": cluster, "task": {"type": "worker",
                                                                "index": index}}),
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        outputs.append(out)
    return processes, outputs


def wait(processes, tmp_path, name):
    for index, process in enumerate(processes):
        try:
            code = process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            code = "timeout"
        if code != 0:
            log = (tmp_path / f"{name}_{index}.log").read_text()[-3000:]
            pytest.fail(f"worker {index} of {name} ended with {code}:\n{log}")


def load(path):
    with open(path) as handle:
        return json.load(handle)


def checkpoint_steps(directory):
    steps = []
    for entry in os.listdir(directory):
        marker = os.path.join(directory, entry, "kspike_checkpoint.json")
        if os.path.isfile(marker):
            steps.append(load(marker)["step"])
    return sorted(steps)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    out = str(tmp / "single.json")
    subprocess.run([sys.executable, WORKER, out, str(tmp / "ckpt"), str(STEPS)],
                   env=environment(), cwd=ROOT, check=True, timeout=TIMEOUT,
                   capture_output=True)
    return load(out)


def assert_same(result, reference):
    assert result["step"] == reference["step"] == STEPS
    assert result["weights"].keys() == reference["weights"].keys()
    for path, value in reference["weights"].items():
        # All-reduce sums in another order than one process: relative to the weights' scale
        # (entries shrunk towards 0 by DEEP R's L1 carry the same absolute error).
        value = np.asarray(value)
        np.testing.assert_allclose(result["weights"][path], value, rtol=1e-5,
                                   atol=1e-5 * np.abs(value).max(), err_msg=path)
    for path, mask in reference["active"].items():
        np.testing.assert_array_equal(result["active"][path], mask, err_msg=path)
    assert result["active_connections"] == reference["active_connections"]


def test_two_workers_match_one_process(tmp_path, single):
    checkpoint_dir = tmp_path / "ckpt"
    processes, outputs = start_workers(tmp_path, "run", checkpoint_dir)
    wait(processes, tmp_path, "run")
    chief, other = load(outputs[0]), load(outputs[1])
    assert_same(chief, single)
    assert_same(other, single)
    # DEEP R really rewired during these steps: the active sets differ from the initial ones.
    assert any(np.any(np.asarray(chief["active"][p]) != np.asarray(chief["initial_active"][p]))
               for p in chief["active"])
    # Only the chief writes into the shared directory: one checkpoint per kept step.
    assert checkpoint_steps(checkpoint_dir) == [STEPS - 1, STEPS]
    leftovers = [e for e in os.listdir(checkpoint_dir) if e.startswith(".")]
    assert leftovers == []


def test_conv_snn_two_workers_match_one_process(tmp_path):
    """A convolutional SNN (FoldTime(Conv2D) -> LIFNeurons -> TimeDistributed(Dense) -> mean
    over time, 8x8 images, T=4): two workers end at the weights of one process."""
    # The one-process reference runs alongside the two workers (it needs no peer).
    log = open(tmp_path / "conv_single_0.log", "w")
    reference_out = str(tmp_path / "conv_single.json")
    reference = subprocess.Popen([sys.executable, WORKER, reference_out,
                                  str(tmp_path / "single_ckpt"), str(STEPS), "--model", "conv"],
                                 env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                 cwd=ROOT)
    checkpoint_dir = tmp_path / "ckpt"
    processes, outputs = start_workers(tmp_path, "conv", checkpoint_dir, model="conv")
    wait(processes, tmp_path, "conv")
    wait([reference], tmp_path, "conv_single")
    single = load(reference_out)
    assert single["active"] == {}      # no rewired kernel: only the weights are compared
    assert_same(load(outputs[0]), single)
    assert_same(load(outputs[1]), single)
    # Training moved the convolution (through the LIF surrogate) and the readout (fed by
    # spikes): the comparison is not one of untouched initial weights.
    assert len(single["weights"]) == 3      # conv kernel, dense kernel and bias
    for path, value in single["weights"].items():
        change = np.abs(np.asarray(value) - np.asarray(single["initial_weights"][path])).max()
        assert change > 1e-3, path
    assert checkpoint_steps(checkpoint_dir) == [STEPS - 1, STEPS]


def test_killed_worker_resumes_to_the_same_weights(tmp_path, single):
    checkpoint_dir = tmp_path / "ckpt"
    pause_at = 3
    processes, outputs = start_workers(tmp_path, "killed", checkpoint_dir, pause_at=pause_at)
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
    assert_same(load(outputs[0]), single)
    assert_same(load(outputs[1]), single)


def test_missing_peer_fails_in_bounded_time(tmp_path):
    port, missing = free_ports(2)
    config = {"cluster": {"worker": [f"127.0.0.1:{port}", f"127.0.0.1:{missing}"]},
              "task": {"type": "worker", "index": 0}}
    code = ("from kspike.distribute import multi_worker_strategy\n"
            "multi_worker_strategy(timeout=5)\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=environment(config), cwd=ROOT,
                            capture_output=True, text=True, timeout=55)
    assert time.monotonic() - start < 55
    assert result.returncode != 0
    assert "TimeoutError" in result.stderr
    assert "TF_CONFIG" in result.stderr and f"127.0.0.1:{missing}" in result.stderr


@pytest.mark.parametrize("value, match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG has no 'task'"),
    ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "not a member"),
    ('{"cluster": {"worker": ["no-port"]}, "task": {"type": "worker", "index": 0}}',
     "host:port"),
])
def test_bad_tf_config_is_a_clear_value_error(value, match):
    with pytest.raises(ValueError, match=match):
        parse_tf_config(value)


def test_missing_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        parse_tf_config()


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
            free_ports(bad)
