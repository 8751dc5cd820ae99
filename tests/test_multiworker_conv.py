"""Multi-worker training on the loopback interface, a convolutional SNN: 2 worker processes give
the weights of one process; a missing peer fails in bounded time; TF_CONFIG is checked
(kspike.distribute, docs/distributed.md). The recurrent network and the killed worker:
tests/test_multiworker.py."""

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kspike.distribute import free_ports, parse_tf_config
from multiworker_common import (ROOT, STEPS, assert_same, checkpoint_steps, environment, load,
                                single_process, start_workers, wait)

pytestmark = pytest.mark.heavy(60)


def test_conv_snn_two_workers_match_one_process(tmp_path):
    """A convolutional SNN (FoldTime(Conv2D) -> LIFNeurons -> TimeDistributed(Dense) -> mean
    over time, 8x8 images, T=4): two workers end at the weights of one process."""
    checkpoint_dir = tmp_path / "ckpt"
    processes, outputs = start_workers(tmp_path, "conv", checkpoint_dir, model="conv")
    # The one-process reference runs while the two workers do (it needs no peer).
    single = single_process(tmp_path, "conv_single", tmp_path / "single_ckpt", model="conv",
                            workers=processes)
    wait(processes, tmp_path, "conv")
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
