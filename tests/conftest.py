"""Test settings shared by the whole suite: quiet TensorFlow, seeded, CPU only; heavy modules
scheduled first and the native loops compiled once per test run."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")
# Subprocesses started by tests (kill-and-resume runs) import the kspike under test, not
# whichever copy is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy(seconds): a module that runs for tens of seconds (subprocesses, "
                   "several trainings); scheduled first, the longest (seconds on one idle "
                   "core, roughly) first")
    # pytest-xdist orders its work units (with --dist loadfile: one per file) by their number
    # of tests; a file of few long tests then starts last and lengthens the run. Keep the
    # order of the collection instead, which starts the heavy modules first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _native_loops():
    """Compile (or load) the native loops while holding a lock that every process of this
    test run takes: one compiles them, the others then load the cached library."""
    import fcntl
    import tempfile
    from kspike import native
    path = os.path.join(tempfile.gettempdir(), f"kspike-tests-native-{os.getuid()}.lock")
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            native.available()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """The native loops compile once, before any test runs: pytest-xdist's workers and the
    subprocesses of tests would otherwise each compile them, at the same time, on a machine
    without the cached library. The main process compiles them while the workers start and
    collect; each worker waits for it after collecting (pytest_collection_finish)."""
    if hasattr(session.config, "workerinput"):
        return
    if session.config.pluginmanager.hasplugin("dsession"):      # pytest-xdist's main process
        import threading
        threading.Thread(target=_native_loops, daemon=True).start()
    else:
        _native_loops()


def pytest_collection_finish(session):
    if hasattr(session.config, "workerinput"):
        _native_loops()


def pytest_collection_modifyitems(session, config, items):
    """Heavy modules first, the longest first (a stable sort: the tests of a module keep their
    order), so that a parallel run does not end waiting for one of them."""
    def weight(item):
        mark = item.get_closest_marker("heavy")
        return 0.0 if mark is None else float(mark.args[0] if mark.args else 1.0)
    items.sort(key=lambda item: -weight(item))


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Every test starts from the same seeds and the float32 policy."""
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
