"""Build script: picks the TensorFlow distribution that fits the machine.

TensorFlow ships under several distribution names that all provide the ``tensorflow``
module. Requiring plain ``tensorflow`` would make pip download the 570 MB GPU-capable wheel
on CPU-only machines, or install a second copy next to an existing ``tensorflow-cpu``.
So the requirement (always ``>= 2.16``, the Keras 3 era) is resolved here:

1. ``KSPIKE_TENSORFLOW=<requirement name>`` in the environment wins (e.g. ``tensorflow``);
2. otherwise a TensorFlow distribution already installed in the target environment is kept;
3. otherwise ``tensorflow[and-cuda]`` where an NVIDIA driver is visible (``nvidia-smi``),
   ``tensorflow-cpu`` on other Linux/Windows x86-64 machines, plain ``tensorflow`` elsewhere.
"""
import os
import platform
import shutil
import subprocess
import sys

from setuptools import setup

_TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel",
                     "tensorflow-macos", "tf-nightly", "tf-nightly-cpu")


def _installed_tensorflow():
    """Name of the TensorFlow distribution installed in the target interpreter, if any.

    pip builds in an isolated environment, so ask the target interpreter in a clean
    subprocess (without the build environment's PYTHONPATH)."""
    code = ("import importlib.metadata as m\n"
            f"for n in {_TF_DISTRIBUTIONS!r}:\n"
            "    try:\n        m.version(n); print(n); break\n"
            "    except m.PackageNotFoundError: pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _tensorflow_requirement():
    chosen = os.environ.get("KSPIKE_TENSORFLOW") or _installed_tensorflow()
    if not chosen:
        machine = platform.machine().lower()
        if shutil.which("nvidia-smi"):
            chosen = "tensorflow[and-cuda]"
        elif sys.platform in ("linux", "win32") and machine in ("x86_64", "amd64"):
            chosen = "tensorflow-cpu"
        else:
            chosen = "tensorflow"
    return f"{chosen}>=2.16"


setup(install_requires=["numpy", "h5py", _tensorflow_requirement()])
