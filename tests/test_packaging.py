"""Packaging: static metadata with TensorFlow through extras, and a clear error without it."""
import os
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_without_tensorflow_names_the_extras():
    code = ("import sys\n"
            "sys.modules['tensorflow'] = None\n"
            "try:\n"
            "    import kspike\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n"
            "else:\n"
            "    print('IMPORTED')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith("IMPORTERROR"), out
    for extra in ('pip install "kspike[cpu]"', 'pip install "kspike[gpu]"',
                  'pip install "kspike[tf]"'):
        assert extra in out, out


def test_metadata_is_static_and_tensorflow_comes_from_extras():
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg"))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any("tensorflow" in d for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["tensorflow-cpu>=2.16"]
    assert extras["gpu"] == ["tensorflow[and-cuda]>=2.16"]
    assert extras["tf"] == ["tensorflow>=2.16"]
    assert {"pytest", "pytest-xdist", "matplotlib", "tensorboard"} <= set(extras["test"])
    assert "matplotlib" in extras["plot"]
    assert "tensorflow-datasets" in extras["datasets"]
    assert project["dynamic"] == ["version"]
