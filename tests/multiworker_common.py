"""What the multi-worker test files share: worker processes on the loopback interface
(tests/multiworker_worker.py), their results and the comparison with one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kspike.distribute import free_ports

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


def single_process(tmp_path, name, checkpoint_dir, model="alif", workers=()):
    """The one-process reference (the worker script's main() without TF_CONFIG), run in this
    process: it needs no peer, so it runs while the started ``workers`` are busy (they are
    killed if it fails). Returns its result."""
    import keras
    import multiworker_worker
    out = str(tmp_path / f"{name}.json")
    # Layers built earlier in this process (other test files on the same worker) would make
    # Keras number the reference's layer names, so its weight paths would differ from the
    # workers' (fresh processes).
    keras.backend.clear_session()
    try:
        multiworker_worker.main(out, str(checkpoint_dir), STEPS, model_name=model)
    except BaseException:
        for process in workers:
            process.kill()
        raise
    return load(out)


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
