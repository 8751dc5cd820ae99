"""kspike.export's directory handling: overwrite replaces only a previous export, permissions
and symlinks are kept, killed exports leave the old or the new export and no leftovers, a
damaged export is named on load, and the export size follows the weights."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kspike
from kspike import export

pytestmark = pytest.mark.heavy(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(units=3, seed=8, steps=10, n_in=5):
    return keras.Sequential([keras.Input((steps, n_in)),
                             keras.layers.RNN(kspike.LIF(units, seed=seed),
                                              return_sequences=True)])


def _leftovers(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith(".kspike-"))


def _output(directory, x):
    return export.load(directory).serve(x).numpy()


def test_overwrite_replaces_a_previous_export_only(tmp_path):
    x = np.random.default_rng(0).uniform(size=(2, 10, 5)).astype("float32")
    first, second = _tiny(seed=1), _tiny(seed=2)
    target = tmp_path / "model"
    export.saved_model(first, target)
    assert json.loads((target / export.MARKER_FILE).read_text())["format"] == \
        "kspike.export.saved_model"
    export.saved_model(second, target, overwrite=True)
    np.testing.assert_allclose(_output(target, x), second(x).numpy(), atol=1e-6)
    # A user's file in the export (or in its variables/) makes it not an export any more.
    (target / "notes.txt").write_text("mine")
    (target / "variables" / "backup.bin").write_bytes(b"1")
    with pytest.raises(export.DirectoryNotEmptyError,
                       match=r"not a previous export.*notes\.txt.*variables/backup\.bin"):
        export.saved_model(first, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "variables" / "backup.bin").read_bytes() == b"1"
    np.testing.assert_allclose(_output(target, x), second(x).numpy(), atol=1e-6)
    # A directory of unrelated files is refused with overwrite=True and left as it was.
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"a\.csv, sub/"):
        export.saved_model(first, data, overwrite=True)
    assert sorted(os.listdir(data)) == ["a.csv", "sub"]
    # A SavedModel without the marker (e.g. from an older kspike) is an export too.
    (target / "notes.txt").unlink()
    (target / "variables" / "backup.bin").unlink()
    (target / export.MARKER_FILE).unlink()
    export.saved_model(first, target, overwrite=True)
    np.testing.assert_allclose(_output(target, x), first(x).numpy(), atol=1e-6)
    assert _leftovers(tmp_path) == []


def test_new_directory_follows_the_umask_and_replaced_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = export.saved_model(_tiny(), tmp_path / "fresh")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
        os.umask(0o027)
        assert stat.S_IMODE(os.stat(export.saved_model(_tiny(), tmp_path / "group")).st_mode) \
            == 0o750
        os.chmod(path, 0o711)
        export.saved_model(_tiny(seed=3), path, overwrite=True)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o711
        os.chmod(path, 0o555)   # a read-only old export is replaced too, and stays read-only
        export.saved_model(_tiny(seed=4), path, overwrite=True)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o555
        os.chmod(path, 0o755)
    finally:
        os.umask(old)


def test_symlinked_directory_is_followed(tmp_path):
    real = tmp_path / "store" / "model"
    real.parent.mkdir()
    export.saved_model(_tiny(seed=1), real)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    second = _tiny(seed=2)
    assert export.saved_model(second, link, overwrite=True) == str(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.is_dir() and not real.is_symlink()
    x = np.ones((1, 10, 5), "float32")
    np.testing.assert_allclose(_output(real, x), second(x).numpy(), atol=1e-6)
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []


_KILLED_EXPORT = textwrap.dedent("""
    import sys
    import keras, kspike
    from kspike import export
    if sys.argv[2] == "no-exchange":
        export._rename_exchange = lambda a, b: False
    model = keras.Sequential([keras.Input((10, 5)),
                              keras.layers.RNN(kspike.LIF(3, seed=2), return_sequences=True)])
    export.saved_model(model, sys.argv[1], overwrite=True)
    print("FINISHED")
""")


@pytest.mark.parametrize("point,swap", [("staging", "exchange"), ("saved", "exchange"),
                                        ("exchanged", "exchange"),
                                        ("moved-aside", "no-exchange"),
                                        ("renamed", "no-exchange")])
def test_killed_export_leaves_an_export_and_is_cleaned_up(tmp_path, point, swap):
    x = np.random.default_rng(1).uniform(size=(2, 10, 5)).astype("float32")
    old_model, new_model = _tiny(seed=1), _tiny(seed=2)
    target = tmp_path / "model"
    export.saved_model(old_model, target)
    env = dict(os.environ, KSPIKE_EXPORT_CRASH_AT=point, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(target), swap], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert "FINISHED" not in run.stdout
    assert _leftovers(tmp_path), "the kill should leave the staging or the old export"
    if point == "moved-aside":
        # Two renames (no atomic exchange): the old export is put back on the next use.
        assert not target.exists()
        np.testing.assert_allclose(_output(target, x), old_model(x).numpy(), atol=1e-6)
    else:
        expected = old_model if point in ("staging", "saved") else new_model
        np.testing.assert_allclose(_output(target, x), expected(x).numpy(), atol=1e-6)
    # The next export removes what the dead process left.
    third = _tiny(seed=3)
    export.saved_model(third, target, overwrite=True)
    assert _leftovers(tmp_path) == []
    np.testing.assert_allclose(_output(target, x), third(x).numpy(), atol=1e-6)


def test_leftovers_of_running_exports_are_kept(tmp_path):
    # A staging directory of a live process (this one) is not touched by another export.
    live = tmp_path / f".kspike-export-{export._host()}-{os.getpid()}-0000abcd-other"
    live.mkdir()
    export.saved_model(_tiny(), tmp_path / "model")
    assert live.is_dir()


def _damaged_copy(tmp_path, name):
    path = export.saved_model(_tiny(), tmp_path / name)
    return path


def test_load_names_an_empty_saved_model_pb(tmp_path):
    path = _damaged_copy(tmp_path, "empty_pb")
    open(os.path.join(path, "saved_model.pb"), "wb").close()
    with pytest.raises(export.DamagedExportError,
                       match=r"empty_pb.*damaged: saved_model\.pb is empty"):
        export.load(path)


def test_load_names_a_truncated_saved_model_pb(tmp_path):
    path = _damaged_copy(tmp_path, "short_pb")
    with open(os.path.join(path, "saved_model.pb"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(export.DamagedExportError, match=r"short_pb.*saved_model\.pb"):
        export.load(path)


def test_load_names_truncated_variables(tmp_path):
    path = _damaged_copy(tmp_path, "short_vars")
    data = os.path.join(path, "variables", "variables.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(100)
    with pytest.raises(export.DamagedExportError,
                       match=r"short_vars.*variables/variables\.data-00000-of-00001 is "
                             r"truncated"):
        export.load(path)
    os.remove(os.path.join(path, "variables", "variables.index"))
    with pytest.raises(export.DamagedExportError, match=r"variables\.index is missing"):
        export.load(path)


def _size(directory):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(directory) for f in files)


def test_export_size_follows_the_weights_not_the_graphs(tmp_path):
    units, n_in = 512, 16
    model = keras.Sequential([keras.Input((5, n_in)),
                              keras.layers.RNN(kspike.ALIF(units, n_adaptive=units // 2,
                                                           seed=0),
                                               return_sequences=True),
                              kspike.LeakyReadout(2)])
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    path = export.saved_model(model, tmp_path / "big")
    assert _size(path) < 3 * weight_bytes, (_size(path), weight_bytes)
    x = np.random.default_rng(2).uniform(size=(1, 5, n_in)).astype("float32")
    np.testing.assert_allclose(_output(path, x), model(x).numpy(), rtol=1e-5, atol=1e-5)
