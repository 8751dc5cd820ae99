"""The README's example runs as written, and its set-up commands are the ones CI runs."""
import os
import re
import subprocess

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_example_trains_saves_and_exports(tmp_path, monkeypatch):
    section = _readme().split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    model, x = namespace["model"], namespace["x"]
    assert (tmp_path / "alif.keras").is_file()
    loaded = tf.saved_model.load(str(tmp_path / "alif_savedmodel"))
    np.testing.assert_allclose(loaded.serve(tf.constant(x[:4])), model(x[:4]), rtol=1e-5,
                               atol=1e-6)


def test_ci_runs_the_readme_commands():
    script = os.path.join(ROOT, ".ci", "run")
    out = subprocess.run(
        ["bash", "-c", f'source <(sed -n "/^readme_command()/,/^}}/p" "{script}"); '
                       'cd "$0"; readme_command "<!-- ci:install -->"; '
                       'readme_command "<!-- ci:test -->"', ROOT],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("python -m pip install -e")
    assert out[1] == "python -m pytest -q -n 2 --dist loadfile"


def test_readme_example_starts_in_a_sane_firing_regime(tmp_path, monkeypatch):
    # The README states the initial rate; LSNN's default thr=0.01 fires far above it.
    section = _readme().split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.split("model.compile(", 1)[0]
    stated = float(re.search(r"~(\d+) Hz at initialisation", code).group(1))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    assert abs(namespace["rate"] - stated) <= 3.0
    import keras
    import kspike
    keras.utils.set_random_seed(0)
    default = keras.layers.RNN(kspike.ALIF(64, n_adaptive=32, n_refractory=2),
                               return_sequences=True)
    assert 1000 * float(np.mean(default(namespace["x"]))) > 80.0
