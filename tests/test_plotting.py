"""kspike.plotting: figures show exactly the data given, are saved as PNG and PDF, never
overwrite."""
import sys

import numpy as np
import pytest

from kspike import plotting

import matplotlib.pyplot as plt  # noqa: E402  (matplotlib is a test dependency)


def _spikes(rng, steps=50, n=12, p=0.1):
    return (rng.random((steps, n)) < p).astype(np.float32)


def test_raster_places_one_dot_per_spike(rng):
    spikes = _spikes(rng)
    fig, ax = plt.subplots()
    plotting.raster(ax, spikes, dt=0.5)
    offsets = ax.collections[0].get_offsets()
    steps, neurons = np.nonzero(spikes)
    np.testing.assert_allclose(np.asarray(offsets), np.stack([steps * 0.5, neurons], axis=1))
    assert ax.get_xlim() == (0.0, 25.0)
    fig2, ax2 = plt.subplots()
    plotting.raster(ax2, spikes, max_neurons=4)          # neurons 0, 3, 7, 11
    chosen = spikes[:, [0, 3, 7, 11]]
    assert len(ax2.collections[0].get_offsets()) == chosen.sum()
    plt.close("all")


def test_voltage_thresholds_and_outputs_draw_the_traces(rng):
    v = rng.normal(size=(40, 5))
    A = 0.01 + rng.random((40, 5))
    fig, axes = plt.subplots(3)
    plotting.voltage(axes[0], v, dt=2.0, neurons=[1, 3], threshold=0.01)
    lines = axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_xdata(), np.arange(40) * 2.0)
    np.testing.assert_allclose(lines[0].get_ydata(), v[:, 1])
    np.testing.assert_allclose(lines[1].get_ydata(), v[:, 3])
    plotting.thresholds(axes[1], A, neurons=[4])
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), A[:, 4])
    y = rng.random((40, 3))
    targets = np.full(40, -1)
    targets[30:] = 2
    plotting.output_traces(axes[2], y, labels=["a", "b", "c"], targets=targets)
    np.testing.assert_allclose(axes[2].get_lines()[1].get_ydata(), y[:, 1])
    target_line = axes[2].get_lines()[3 + 2].get_ydata()
    assert np.all(np.isnan(target_line[:30])) and np.all(target_line[30:] == 1.05)
    with pytest.raises(ValueError, match="`neurons`.*5 neurons"):
        plotting.voltage(axes[0], v, neurons=[7])
    with pytest.raises(ValueError, match=r"`spikes`.*\(T, n\).*\(3,\)"):
        plotting.raster(axes[0], np.zeros(3))
    with pytest.raises(ValueError, match="`dt`"):
        plotting.raster(axes[0], np.zeros((3, 2)), dt=0)
    plt.close("all")


def test_activity_figure_and_save(tmp_path, rng):
    x = _spikes(rng, n=20)
    z = _spikes(rng, n=30)
    A = 0.01 + rng.random((50, 30))
    y = rng.random((50, 10))
    fig = plotting.activity_figure(x, z, thresholds=A, outputs=y, n_regular=18,
                                   output_labels=list(range(10)), title="test")
    assert len(fig.axes) == 5                       # input, LIF, ALIF, thresholds, outputs
    lif, alif = fig.axes[1], fig.axes[2]
    assert len(lif.collections[0].get_offsets()) == z[:, :18].sum()
    assert len(alif.collections[0].get_offsets()) == z[:, 18:].sum()
    # Thresholds of adaptive neurons only.
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), A[:, 18])
    written = plotting.save_figure(fig, tmp_path / "out" / "activity")
    assert written == [str(tmp_path / "out" / "activity.png"),
                       str(tmp_path / "out" / "activity.pdf")]
    png = (tmp_path / "out" / "activity.png").read_bytes()
    pdf = (tmp_path / "out" / "activity.pdf").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and pdf[:5] == b"%PDF-"
    fig = plotting.activity_figure(x, z)
    with pytest.raises(FileExistsError, match=r"activity\.png"):
        plotting.save_figure(fig, tmp_path / "out" / "activity")
    assert (tmp_path / "out" / "activity.png").read_bytes() == png
    analog = plotting.activity_figure(rng.random((50, 1)), z)
    np.testing.assert_allclose(analog.axes[0].get_lines()[0].get_ydata().size, 50)
    with pytest.raises(ValueError, match="same length"):
        plotting.activity_figure(x[:10], z)
    plt.close("all")


def test_learning_curve(tmp_path):
    history = {"loss": [3.0, 2.0, 1.5], "val_accuracy": [0.1, 0.4]}
    fig = plotting.learning_curve(history, steps={"loss": [10, 20, 30], "val_accuracy": [15, 30]})
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.1, 0.4])
    with pytest.raises(ValueError, match="'acc'"):
        plotting.learning_curve(history, keys=["acc"])
    with pytest.raises(TypeError, match="`history`"):
        plotting.learning_curve([1, 2])
    plt.close("all")


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.learning_curve({"loss": [1.0]})
