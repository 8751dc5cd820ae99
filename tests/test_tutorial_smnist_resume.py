"""bin/tutorial_sequential_mnist_with_LSNN.py --checkpoint-dir: a stopped run resumes and keeps
the whole curve."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tutorial():
    path = os.path.join(ROOT, "bin", "tutorial_sequential_mnist_with_LSNN.py")
    spec = importlib.util.spec_from_file_location("tutorial_smnist_resume", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curve_keeps_the_last_entry_per_iteration_and_ignores_a_cut_last_line(tutorial, tmp_path):
    path = tmp_path / "curve.jsonl"
    path.write_text('{"iteration": 1, "val_accuracy": 0.1}\n'
                    '{"iteration": 2, "val_accuracy": 0.2}\n'
                    '{"iteration": 2, "val_accuracy": 0.25}\n'
                    '{"iteration": 3, "val_acc')
    curve = tutorial.read_curve(str(path))
    assert sorted(curve) == [1, 2]
    assert curve[2]["val_accuracy"] == 0.25
    assert tutorial.read_curve(str(tmp_path / "missing.jsonl")) == {}


def test_a_damaged_curve_line_names_the_file_and_line(tutorial, tmp_path):
    path = tmp_path / "curve.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(SystemExit, match=r"curve\.jsonl, line 2: not a curve entry"):
        tutorial.read_curve(str(path))


def test_a_stopped_run_resumes_from_its_checkpoints_with_the_whole_curve(tutorial, tmp_path,
                                                                         capsys):
    ckpt = tmp_path / "ckpt"
    common = ["--quick", "--eval-every", "1", "--checkpoint-dir", str(ckpt)]
    assert tutorial.main(common + ["--iterations", "2", "--output-dir",
                                   str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert first["iterations"] == [1, 2]
    capsys.readouterr()
    assert tutorial.main(common + ["--iterations", "3", "--output-dir",
                                   str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "Resuming from" in out and "at step 2" in out
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["iterations"] == [1, 2, 3]
    # The first run's evaluations are carried over unchanged, the new one is appended.
    assert second["history"]["val_accuracy"][:2] == first["history"]["val_accuracy"]
    lines = (ckpt / "curve.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    seconds = [json.loads(line)["seconds"] for line in lines]
    assert seconds == sorted(seconds) and seconds[0] > 0
