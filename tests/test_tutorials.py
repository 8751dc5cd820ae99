"""Every tutorial script runs with --quick on synthetic data and writes its figures.

The scripts run as subprocesses (as a user runs them), started together so that their TensorFlow
start-up overlaps; each test then checks one script's exit code and files.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")

RUNS = {
    "smnist": ("tutorial_sequential_mnist_with_LSNN.py", [], ["lsnn_activity", "learning_curve"]),
    "storerecall": ("tutorial_storerecall_with_LSNN.py", ["--rule", "stllr"],
                    ["storerecall_activity", "learning_curve"]),
    "evidence": ("tutorial_evidence_accumulation.py", ["--rule", "eprop"],
                 ["evidence_activity", "learning_curve"]),
    "shd": ("tutorial_shd.py", ["--xla"], ["shd_activity", "learning_curve"]),
    "conv_snn": ("tutorial_conv_snn_mnist.py", ["--rule", "bptt"],
                 ["conv_snn_spikes", "firing_rates", "learning_curve"]),
    "stdp_conv": ("tutorial_stdp_conv.py", ["--modes", "stdp", "gd"],
                  ["conv1_filters_initial", "conv1_filters_stdp", "weight_change_history",
                   "learning_curve"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tutorials")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = {}
    for name, (script, extra, _) in RUNS.items():
        out = base / name
        # An existing result in the output folder must survive: the script writes elsewhere.
        out.mkdir()
        (out / "lsnn_activity.png").write_bytes(b"earlier result")
        command = [sys.executable, os.path.join(BIN, script), "--quick", "--output-dir",
                   str(out)] + extra
        started[name] = (subprocess.Popen(command, cwd=str(base), env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True), out)
    results = {}
    for name, (process, out) in started.items():
        try:
            output, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        results[name] = (process.returncode, output, out)
    return results


@pytest.mark.parametrize("name", list(RUNS))
def test_tutorial_quick_run(runs, name):
    code, output, out = runs[name]
    assert code == 0, output[-3000:]
    assert (out / "lsnn_activity.png").read_bytes() == b"earlier result"
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert len(folders) == 1, output[-2000:]
    for stem in RUNS[name][2]:
        png = folders[0] / f"{stem}.png"
        pdf = folders[0] / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"
    assert (folders[0] / "results.json").is_file()
    assert "Results go to" in output and "Figures:" in output


def test_tutorial_requires_its_data(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for script, flag in (("tutorial_sequential_mnist_with_LSNN.py", "--mnist-path"),
                         ("tutorial_shd.py", "--data-dir")):
        result = subprocess.run([sys.executable, os.path.join(BIN, script), "--output-dir",
                                 str(tmp_path / script)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2
        assert flag in result.stderr and "--quick" in result.stderr
        assert not (tmp_path / script).exists()


def test_conv_snn_tutorial_requires_mnist(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(BIN, "tutorial_conv_snn_mnist.py"),
                             "--mnist-path", str(tmp_path / "missing.npz"), "--output-dir",
                             str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "--mnist-path" in result.stderr and "--quick" in result.stderr
    assert not (tmp_path / "out").exists()
