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
    # Losses and accuracies are different quantities: one panel each.
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy / error"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [0.1, 0.4])
    assert fig.axes[1].get_xlabel() == "iteration"
    with pytest.raises(ValueError, match="'acc'"):
        plotting.learning_curve(history, keys=["acc"])
    with pytest.raises(TypeError, match="`history`"):
        plotting.learning_curve([1, 2])
    plt.close("all")


class _History:
    """Duck type of keras.callbacks.History (what model.fit returns)."""

    def __init__(self, history):
        self.history = history


def _keras_like_history():
    return {"loss": [2.3, 1.1, 0.7], "accuracy": [0.1, 0.6, 0.8],
            "firing_rate": [91.0, 60.0, 35.0], "firing_rate_rnn": [91.0, 60.0, 35.0],
            "learning_rate": [1e-3, 1e-3, 5e-4], "val_loss": [2.0, 1.2, 0.9],
            "val_accuracy": [0.2, 0.5, 0.7], "active_connections": [100, 100, 100]}


def test_learning_curve_panels_by_kind_in_real_units(tmp_path):
    fig = plotting.learning_curve(_History(_keras_like_history()))
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert list(panels) == ["loss", "accuracy / error", "firing rate (Hz)",
                            "active connections"]
    labels = {name: [line.get_label() for line in ax.get_lines()] for name, ax in
              panels.items()}
    # No learning rate, no per-layer duplicate of the mean rate; val_ next to its key.
    assert labels == {"loss": ["loss", "val_loss"], "accuracy / error": ["accuracy",
                      "val_accuracy"], "firing rate (Hz)": ["firing_rate"],
                      "active connections": ["active_connections"]}
    np.testing.assert_allclose(panels["firing rate (Hz)"].get_lines()[0].get_ydata(),
                               [91.0, 60.0, 35.0])
    # The loss panel's scale is the loss's own, not flattened by the 91 Hz rate.
    assert panels["loss"].get_ylim()[1] < 3.0
    train, val = panels["loss"].get_lines()
    assert train.get_color() == val.get_color() and val.get_linestyle() == "--"
    assert fig.axes[-1].get_xlabel() == "epoch"
    np.testing.assert_allclose(train.get_xdata(), [1, 2, 3])
    plotting.save_figure(fig, tmp_path / "curves")
    fig = plotting.learning_curve(_keras_like_history(), xlabel="time (s)",
                                  steps=None, keys=["loss", "learning_rate"])
    assert fig.axes[-1].get_xlabel() == "time (s)"
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning rate"]
    per_layer = dict(_keras_like_history(), firing_rate_rnn=[80.0, 50.0, 30.0])
    fig = plotting.learning_curve(per_layer, keys=None)
    rates = [a for a in fig.axes if a.get_ylabel() == "firing rate (Hz)"][0]
    assert [line.get_label() for line in rates.get_lines()] == ["firing_rate",
                                                                  "firing_rate_rnn"]
    with pytest.raises(TypeError, match="`xlabel`"):
        plotting.learning_curve({"loss": [1.0]}, xlabel=3)
    plt.close("all")


def test_single_panels_have_axis_labels_matched_thresholds_and_target_legend(rng):
    fig, axes = plt.subplots(4)
    plotting.raster(axes[0], _spikes(rng))
    assert (axes[0].get_xlabel(), axes[0].get_ylabel()) == ("time (ms)", "neuron index")
    v = rng.normal(size=(40, 3))
    A = 0.5 + rng.random((40, 3))
    plotting.voltage(axes[1], v, neurons=[0, 2], threshold=A)
    assert (axes[1].get_xlabel(), axes[1].get_ylabel()) == ("time (ms)", "voltage")
    lines = axes[1].get_lines()
    assert len(lines) == 4
    for trace, thr, j in ((lines[0], lines[2], 0), (lines[1], lines[3], 2)):
        np.testing.assert_allclose(thr.get_ydata(), A[:, j])
        assert thr.get_linestyle() == "--" and thr.get_color() == trace.get_color()
    assert lines[0].get_color() != lines[1].get_color()
    plotting.thresholds(axes[2], A)
    assert axes[2].get_xlabel() == "time (ms)"
    targets = np.full(40, -1)
    targets[20:] = 1
    plotting.output_traces(axes[3], rng.random((40, 2)), targets=targets)
    legend = [t.get_text() for t in axes[3].get_legend().get_texts()]
    assert legend == ["target 1"] and axes[3].get_xlabel() == "time (ms)"
    plt.close("all")


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.learning_curve({"loss": [1.0]})


def test_conv_filters_shows_each_filter_on_one_symmetric_scale(rng, tmp_path):
    kernel = rng.normal(size=(3, 3, 2, 5))
    fig = plotting.conv_filters(kernel, in_channel=1, title="conv")
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 5                       # one image per output channel
    for k, im in enumerate(images):
        np.testing.assert_array_equal(im.get_array(), kernel[:, :, 1, k])
        assert im.get_clim() == (-np.abs(kernel[:, :, 1]).max(), np.abs(kernel[:, :, 1]).max())
    assert fig._suptitle.get_text() == "conv"
    plt.close(fig)
    fig = plotting.conv_filters(kernel, max_filters=3)           # mean over input channels
    images = [im for ax in fig.axes for im in ax.images]
    np.testing.assert_allclose(images[-1].get_array(), kernel[:, :, :, 4].mean(axis=2))
    assert len(images) == 3
    assert len(plotting.save_figure(fig, tmp_path / "filters")) == 2
    with pytest.raises(ValueError, match=r"\(kh, kw, C_in, C_out\)"):
        plotting.conv_filters(kernel[0])
    with pytest.raises(ValueError, match="in_channel"):
        plotting.conv_filters(kernel, in_channel=2)
