"""Models compiled with kspike's public losses, metrics and surrogates save to ``.keras`` and
load in a fresh Python process that only imports kspike (as a user's next session would)."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kspike
from kspike import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh_python(code):
    """Run ``code`` in a new interpreter (kspike imported from this checkout), return its last
    stdout line parsed as JSON."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _model(n_out, steps=20, n_in=6, surrogate="triangular"):
    return keras.Sequential([keras.Input((steps, n_in)),
                             keras.layers.RNN(kspike.LIF(8, seed=1,
                                                         surrogate=surrogate),
                                              return_sequences=True),
                             kspike.LeakyReadout(n_out, seed=2)])


def test_task_losses_and_metrics_round_trip_in_fresh_process(tmp_path, rng):
    x = (rng.random((4, 20, 6)) < 0.3).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    bits = (rng.random((4, 20)) < 0.5).astype(np.int32)
    mask = np.zeros((4, 20), np.float32)
    mask[:, 15:] = 1.0
    np.savez(tmp_path / "data.npz", x=x, labels=labels, bits=bits, mask=mask)
    expected = {}
    for average in ("logits", "loss"):
        model = _model(3)
        model.compile("adam", tasks.window_cross_entropy(5, average=average),
                      metrics=[tasks.window_accuracy(5)])
        expected[average] = model.evaluate(x, labels, verbose=0, return_dict=True)
        model.save(tmp_path / f"window_{average}.keras")
    model = _model(2)
    model.compile("adam", tasks.RecallCrossEntropy(5), weighted_metrics=[tasks.RecallError(5)])
    expected["recall"] = model.evaluate(x, bits, sample_weight=mask, verbose=0,
                                        return_dict=True)
    model.save(tmp_path / "recall.keras")

    loaded = _fresh_python(f"""
        import json, keras, numpy as np
        import kspike
        d = np.load({str(tmp_path / "data.npz")!r})
        out = {{}}
        for average in ("logits", "loss"):
            m = keras.models.load_model({str(tmp_path)!r} + f"/window_{{average}}.keras")
            assert type(m.loss).__name__ == "WindowCrossEntropy", m.loss
            assert (m.loss.steps, m.loss.average) == (5, average)
            out[average] = m.evaluate(d["x"], d["labels"], verbose=0, return_dict=True)
        m = keras.models.load_model({str(tmp_path / "recall.keras")!r})
        out["recall"] = m.evaluate(d["x"], d["bits"], sample_weight=d["mask"], verbose=0,
                                   return_dict=True)
        print(json.dumps(out))
    """)
    for key, values in expected.items():
        assert set(loaded[key]) == set(values), key
        for name, value in values.items():
            assert loaded[key][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, name)
    assert expected["logits"]["loss"] != pytest.approx(expected["loss"]["loss"])


def test_window_loss_and_metric_configs_rebuild():
    loss = tasks.window_cross_entropy(7, average="loss", name="ce")
    rebuilt = tasks.WindowCrossEntropy.from_config(loss.get_config())
    assert (rebuilt.steps, rebuilt.average, rebuilt.name) == (7, "loss", "ce")
    metric = tasks.window_accuracy(9, name="acc")
    rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(rebuilt, tasks.WindowAccuracy)
    assert (rebuilt.steps, rebuilt.name) == (9, "acc")


def test_recall_error_in_metrics_says_weighted_metrics(rng):
    x = (rng.random((2, 20, 6)) < 0.3).astype(np.float32)
    bits = np.zeros((2, 20), np.int32)
    mask = np.ones((2, 20), np.float32)
    model = _model(2)
    model.compile("adam", tasks.RecallCrossEntropy(5), metrics=[tasks.RecallError(5)])
    with pytest.raises(ValueError, match=r"weighted_metrics=\[kspike.tasks.RecallError"):
        model.evaluate(x, bits, sample_weight=mask, verbose=0)
    model.compile("adam", tasks.RecallCrossEntropy(5), weighted_metrics=[tasks.RecallError(5)])
    result = model.evaluate(x, bits, sample_weight=mask, verbose=0, return_dict=True)
    reference = tasks.recall_error(bits, model.predict(x, verbose=0), mask, 5)
    assert result["recall_error"] == pytest.approx(float(reference))
