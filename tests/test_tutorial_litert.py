"""bin/tutorial_litert_streaming.py --quick: trains, writes the .tflite file, streams a test
sequence step by step through LiteRT and saves the figure of streamed vs whole-sequence
output (run in-process: the TensorFlow start-up is the test session's)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))

pytest.importorskip("ai_edge_litert")
pytest.importorskip("matplotlib")


def test_litert_streaming_tutorial_quick(tmp_path, capsys):
    import tutorial_litert_streaming as tutorial
    (tmp_path / "earlier.png").write_bytes(b"earlier result")
    assert tutorial.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "earlier.png").read_bytes() == b"earlier result"
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert (run / "litert_streaming.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "litert_streaming.pdf").read_bytes()[:5] == b"%PDF-"
    results = json.loads((run / "results.json").read_text())
    # The stream through LiteRT reproduces the whole-sequence output of the Keras model.
    assert results["max_abs_difference"] < 1e-5
    assert results["firing_rate_hz"] > 1.0      # the network is not silent
    assert os.path.isfile(results["tflite"])
    output = capsys.readouterr().out
    assert "Results go to" in output and "Figures:" in output
