"""Every tutorial script runs with --quick on synthetic data and writes its figures.

The quick runs call each script's main() in this process (the TensorFlow start-up is the test
session's); the scripts' command lines (exit codes, missing data) run as subprocesses below.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")

pytestmark = pytest.mark.heavy(120)

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


def _script(name):
    spec = importlib.util.spec_from_file_location(f"tutorial_quick_{name}",
                                                  os.path.join(BIN, RUNS[name][0]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(RUNS))
def test_tutorial_quick_run(tmp_path, monkeypatch, capsys, name):
    _, extra, stems = RUNS[name]
    out = tmp_path / name
    # An existing result in the output folder must survive: the script writes elsewhere.
    out.mkdir()
    (out / "lsnn_activity.png").write_bytes(b"earlier result")
    monkeypatch.chdir(tmp_path)
    assert _script(name).main(["--quick", "--output-dir", str(out)] + extra) == 0
    output = capsys.readouterr().out
    assert (out / "lsnn_activity.png").read_bytes() == b"earlier result"
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert len(folders) == 1, output[-2000:]
    for stem in stems:
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
