"""Figures of spiking activity: rasters, voltages, thresholds, outputs, learning curves.

matplotlib is imported only when a function here is called (``pip install matplotlib``); kspike
itself does not need it. Every function takes NumPy arrays (or tensors) of one sample, time first:
spikes (T, n), voltages (T, n), thresholds (T, n), outputs (T, n_out); times are shown in ms.

Example:

>>> import os, tempfile, keras, numpy as np, kspike
>>> cell = kspike.ALIF(10, n_adaptive=4, thr=0.03, output="all", seed=0)   # 6 LIF + 4 ALIF
>>> model = keras.Sequential([keras.Input((20, 5)), keras.layers.RNN(cell, return_sequences=True)])
>>> x = (np.random.default_rng(0).random((1, 20, 5)) < 0.3).astype("float32")
>>> z, v, A = kspike.split_outputs(keras.ops.convert_to_numpy(model(x)))
>>> fig = kspike.plotting.activity_figure(inputs=x[0], spikes=z[0], thresholds=A[0], n_regular=6)
>>> paths = kspike.plotting.save_figure(fig, os.path.join(tempfile.mkdtemp(), "activity"))
>>> [os.path.basename(p) for p in paths]
['activity.png', 'activity.pdf']
"""
import os

import numpy as np

from kspike.probe import Probe, probe  # noqa: F401  (voltages of output="spikes" models)

__all__ = ["raster", "voltage", "thresholds", "output_traces", "learning_curve",
           "activity_figure", "conv_filters", "dale_colors", "save_figure", "probe", "Probe"]


def _pyplot():
    try:
        import matplotlib
        if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
            # Figures are written to files: a headless backend never needs a display.
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("kspike.plotting needs matplotlib: pip install matplotlib") from None
    return plt


def _array(name, value, ndim=2):
    if hasattr(value, "numpy"):
        value = value.numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        shape = "(T, n)" if ndim == 2 else "(T,)"
        raise ValueError(f"`{name}` must have shape {shape} (one sample, time first), received "
                         f"an array of shape {array.shape}.")
    return array


def _check_dt(dt):
    if isinstance(dt, bool) or not isinstance(dt, (int, float, np.integer, np.floating)) \
            or not np.isfinite(dt) or dt <= 0:
        raise ValueError(f"`dt` must be a time step in ms > 0, received {dt!r}.")
    return float(dt)


def _select(n, max_neurons):
    if max_neurons is None or n <= max_neurons:
        return np.arange(n)
    return np.linspace(0, n - 1, int(max_neurons)).astype(int)


def raster(ax, spikes, dt=1.0, max_neurons=None, color="black", marker_size=2.0, label=None,
           colors=None):
    """Raster plot of spikes (T, n) on ``ax``: a dot at (t * dt ms, neuron index) per spike.

    ``max_neurons`` keeps at most that many neurons, evenly spread over the layer. ``colors``:
    optional sequence of n matplotlib colours, one per neuron (e.g. LSNN's excitatory black
    and inhibitory red, ``dale_colors``), drawn instead of the single ``color``. The x axis
    is labelled "time (ms)", the y axis ``label`` or "neuron index". Returns ax.
    """
    spikes = _array("spikes", spikes)
    dt = _check_dt(dt)
    chosen = _select(spikes.shape[1], max_neurons)
    steps, rows = np.nonzero(spikes[:, chosen] > 0)
    c = color
    if colors is not None:
        colors = list(colors)
        if len(colors) != spikes.shape[1]:
            raise ValueError(f"`colors` must give one colour per neuron ({spikes.shape[1]}), "
                             f"received {len(colors)}.")
        c = [colors[chosen[row]] for row in rows]
    ax.scatter(steps * dt, rows, s=marker_size, c=c, marker="|" if marker_size > 3 else ".",
               linewidths=0.5, label=label)
    ax.set_xlim(0, spikes.shape[0] * dt)
    ax.set_ylim(-0.5, len(chosen) - 0.5)
    ax.set_ylabel(label if label else "neuron index")
    ax.set_xlabel("time (ms)")
    return ax


def _traces(ax, name, values, dt, neurons, ylabel, colors=None, **style):
    """Draw the columns ``neurons`` of ``values`` (T, n) against time in ms; returns the lines."""
    values = _array(name, values)
    dt = _check_dt(dt)
    if neurons is None:
        neurons = _select(values.shape[1], 8)
    neurons = np.asarray(neurons, int)
    if neurons.size and (neurons.min() < 0 or neurons.max() >= values.shape[1]):
        raise ValueError(f"`neurons` must index the {values.shape[1]} neurons of `{name}`, "
                         f"received {neurons.tolist()}.")
    time = np.arange(values.shape[0]) * dt
    lines = []
    for i, j in enumerate(neurons):
        if colors is not None:
            style = {**style, "color": colors[i]}
        lines += ax.plot(time, values[:, j], linewidth=0.8, **style)
    ax.set_xlim(0, values.shape[0] * dt)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("time (ms)")
    return lines


def voltage(ax, v, dt=1.0, neurons=None, threshold=None):
    """Membrane potentials v (T, n) of selected ``neurons`` (default up to 8) over time (ms);
    ``threshold`` (a float or (T, n) adaptive thresholds) is drawn dashed, each neuron's
    threshold in the colour of its voltage trace. The y axis is "voltage": kspike's voltages are
    in units of the input current, not mV. Returns ax."""
    if neurons is None:
        neurons = _select(_array("v", v).shape[1], 8)
    lines = _traces(ax, "v", v, dt, neurons, "voltage")
    if threshold is not None:
        if np.ndim(threshold) == 0:
            ax.axhline(float(threshold), color="gray", linestyle="--", linewidth=0.8,
                       label="threshold")
            ax.legend(fontsize=6, loc="upper right", frameon=False)
        else:
            _traces(ax, "threshold", threshold, dt, neurons, "voltage", linestyle="--",
                    colors=[line.get_color() for line in lines])
    return ax


def thresholds(ax, A, dt=1.0, neurons=None):
    """Adaptive thresholds A (T, n) of selected ``neurons`` (default up to 8) over time (ms).
    Returns ax."""
    _traces(ax, "A", A, dt, neurons, "threshold")
    return ax


def output_traces(ax, y, dt=1.0, labels=None, targets=None):
    """Output traces y (T, n_out) (e.g. softmax probabilities) over time (ms), one line per
    output; ``targets`` (T,) integer classes (-1 where undefined) are drawn as a thick line at
    1.05 in the colour of the target class, named "target <label>" in the legend. Returns ax."""
    y = _array("y", y)
    dt = _check_dt(dt)
    time = np.arange(y.shape[0]) * dt
    cmap = _pyplot().get_cmap("tab10")
    for k in range(y.shape[1]):
        ax.plot(time, y[:, k], linewidth=1.0, color=cmap(k % 10),
                label=None if labels is None else str(labels[k]))
    if targets is not None:
        targets = _array("targets", targets, ndim=1)
        if len(targets) != y.shape[0]:
            raise ValueError(f"`targets` must have one entry per step ({y.shape[0]}), received "
                             f"{len(targets)}.")
        for k in range(y.shape[1]):
            on = np.where(targets == k, 1.05, np.nan)
            name = k if labels is None else labels[k]
            ax.plot(time, on, linewidth=3.0, color=cmap(k % 10), alpha=0.6,
                    label=f"target {name}" if np.any(targets == k) else None)
    ax.set_xlim(0, y.shape[0] * dt)
    ax.set_ylabel("output")
    ax.set_xlabel("time (ms)")
    if ax.get_legend_handles_labels()[1]:
        entries = len(ax.get_legend_handles_labels()[1])
        ax.legend(fontsize=6, ncol=min(entries, 10), loc="upper left", frameon=False)
    return ax


#: Keys that are not learning curves: drawn only when asked for with ``keys``.
_NOT_CURVES = ("learning_rate", "lr", "finite")

#: Panel kinds in drawing order: (title / y label, test on the key without "val_").
_KINDS = (
    ("loss", lambda k: "loss" in k or k in ("regularization", "cross_entropy")),
    ("accuracy / error", lambda k: any(w in k for w in ("acc", "error", "auc", "precision",
                                                       "recall"))),
    ("firing rate (Hz)", lambda k: k.startswith("firing_rate") or k.endswith("rate_hz")),
)


def _kind(key):
    base = key[4:] if key.startswith("val_") else key
    for title, test in _KINDS:
        if test(base):
            return title
    return base.replace("_", " ")


def _default_keys(values):
    keys = [k for k in values if (k[4:] if k.startswith("val_") else k) not in _NOT_CURVES]
    # One spiking layer logs "firing_rate" and "firing_rate_<layer>" with the same numbers.
    for prefix in ("", "val_"):
        mean = values.get(prefix + "firing_rate")
        if mean is None:
            continue
        for key in list(keys):
            if (key.startswith(prefix + "firing_rate_") and len(values[key]) == len(mean)
                    and np.allclose(np.asarray(values[key], np.float64),
                                    np.asarray(mean, np.float64), equal_nan=True)):
                keys.remove(key)
    return keys


def learning_curve(history, keys=None, ax=None, steps=None, xlabel=None, log=False):
    """Learning curves from a history (a ``keras.callbacks.History`` or a dict of lists), one
    panel per kind of quantity: losses, accuracies/errors, firing rates in Hz, then one panel
    per other quantity (e.g. active_connections). A ``val_`` key is drawn dashed in the colour
    of its training key.

    Args:
        history: ``History`` or ``{"loss": [...], "val_accuracy": [...]}``.
        keys: entries to draw. Default: all but the learning rate (``learning_rate``, ``lr``)
            and per-layer firing rates equal to ``firing_rate`` (a single spiking layer).
        ax: one axes to draw all ``keys`` on (no panels); default a new figure with panels.
        steps: x values (default 1, 2, ...); a dict gives x values per key.
        xlabel: label of the x axis with its unit, e.g. "iteration" or "time (s)". Default
            "epoch" for a ``keras.callbacks.History`` (one value per epoch), else "iteration".
        log: logarithmic y axis for the loss panel (for every key when ``ax`` is given).

    Returns:
        The matplotlib Figure.
    """
    plt = _pyplot()
    is_history = hasattr(history, "history")
    values = getattr(history, "history", history)
    if not isinstance(values, dict):
        raise TypeError("`history` must be a keras History or a dict of lists, received "
                        f"{type(history).__name__}.")
    if xlabel is None:
        xlabel = "epoch" if is_history else "iteration"
    elif not isinstance(xlabel, str):
        raise TypeError(f"`xlabel` must be a str such as 'epoch' or 'iteration', received "
                        f"{xlabel!r}.")
    keys = _default_keys(values) if keys is None else list(keys)
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"`keys` {missing} are not in the history (it has {sorted(values)}).")
    if not keys:
        raise ValueError(f"Nothing to draw: the history has only {sorted(values)}; pass "
                         "`keys` to draw them.")
    kinds = []
    for key in keys:
        if _kind(key) not in kinds:
            kinds.append(_kind(key))
    order = [title for title, _ in _KINDS if title in kinds]
    kinds = order + [k for k in kinds if k not in order]
    if ax is None:
        fig, axes = plt.subplots(len(kinds), 1, sharex=True,
                                 figsize=(5, 1.2 + 1.8 * len(kinds)), squeeze=False)
        panels = dict(zip(kinds, axes[:, 0]))
    else:
        fig = ax.figure
        panels = {kind: ax for kind in kinds}
    colors = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for key in keys:
        y = np.asarray(values[key], np.float64)
        x = steps.get(key) if isinstance(steps, dict) else steps
        x = np.arange(1, len(y) + 1) if x is None else np.asarray(x)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} x values for {len(y)} values of {key!r}.")
        base = key[4:] if key.startswith("val_") else key
        if base not in colors:
            colors[base] = cycle[len(colors) % len(cycle)]
        panels[_kind(key)].plot(x, y, label=key, linewidth=1.2, color=colors[base],
                                linestyle="--" if key.startswith("val_") else "-")
    for kind, panel in panels.items():
        if log and (ax is not None or kind == "loss"):
            panel.set_yscale("log")
        if ax is None:
            panel.set_ylabel(kind)
        panel.legend(fontsize=7, frameon=False)
        panel.grid(alpha=0.3)
    bottom = ax if ax is not None else axes[-1, 0]
    bottom.set_xlabel(xlabel)
    if all(np.all(np.mod(line.get_xdata(), 1) == 0) for panel in panels.values()
           for line in panel.get_lines()):
        # Epochs and iterations are counts: no 1.25-epoch ticks.
        from matplotlib.ticker import MaxNLocator
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def dale_colors(signs, excitatory="black", inhibitory="red"):
    """One colour per neuron from its sign under Dale's law (+1 excitatory, -1 inhibitory), as
    LSNN's figures draw them: excitatory black, inhibitory red. ``signs``: (n,) array."""
    signs = _array("signs", signs, ndim=1)
    return [excitatory if s > 0 else inhibitory for s in signs]


def activity_figure(inputs, spikes, thresholds=None, outputs=None, n_regular=None, dt=1.0,
                    output_labels=None, targets=None, max_neurons=100, title=None,
                    neuron_colors=None):
    """The LSNN figure of one sample: input raster, LIF raster, ALIF raster, thresholds of the
    ALIF neurons and outputs over time.

    Args:
        inputs: (T, n_in) input spikes (drawn as a raster) or analog inputs (drawn as lines
            when they are not 0/1).
        spikes: (T, n) spikes of the recurrent layer.
        thresholds: optional (T, n) adaptive thresholds A_t; the adaptive neurons' ones are drawn.
        outputs: optional (T, n_out) outputs (e.g. softmax probabilities).
        n_regular: number of LIF neurons first in the layer (LSNN layout); None for one raster.
        dt: time step in ms.
        output_labels: names of the outputs for the legend.
        targets: optional (T,) target class per step (-1 where undefined).
        max_neurons: most neurons shown per raster.
        title: figure title.
        neuron_colors: optional n colours of the recurrent neurons (e.g. ``dale_colors`` of
            their signs: excitatory black, inhibitory red, as LSNN).

    Returns:
        The matplotlib Figure.
    """
    plt = _pyplot()
    inputs = _array("inputs", inputs)
    spikes = _array("spikes", spikes)
    dt = _check_dt(dt)
    if inputs.shape[0] != spikes.shape[0]:
        raise ValueError(f"`inputs` ({inputs.shape[0]} steps) and `spikes` ({spikes.shape[0]} "
                         "steps) must have the same length.")
    if n_regular is not None and not 0 <= int(n_regular) <= spikes.shape[1]:
        raise ValueError(f"`n_regular` must be in 0..{spikes.shape[1]}, received {n_regular!r}.")
    if neuron_colors is not None:
        neuron_colors = list(neuron_colors)
        if len(neuron_colors) != spikes.shape[1]:
            raise ValueError(f"`neuron_colors` must give one colour per neuron "
                             f"({spikes.shape[1]}), received {len(neuron_colors)}.")
    groups = [("input", inputs, None)]
    if n_regular is None or n_regular in (0, spikes.shape[1]):
        groups.append(("spikes", spikes, neuron_colors))
    else:
        k = int(n_regular)
        groups += [("LIF", spikes[:, :k], None if neuron_colors is None else neuron_colors[:k]),
                   ("ALIF", spikes[:, k:], None if neuron_colors is None else neuron_colors[k:])]
    n_panels = len(groups) + (thresholds is not None) + (outputs is not None)
    fig, axes = plt.subplots(n_panels, 1, sharex=True, figsize=(7, 1.5 * n_panels + 0.5))
    axes = np.atleast_1d(axes)
    for ax, (name, data, colors) in zip(axes, groups):
        if name == "input" and not np.all(np.isin(data, (0.0, 1.0))):
            _traces(ax, "inputs", data, dt, _select(data.shape[1], 8), "input")
        else:
            raster(ax, data, dt=dt, max_neurons=max_neurons, label=name, colors=colors)
    k = len(groups)
    if thresholds is not None:
        A = _array("thresholds", thresholds)
        start = 0 if n_regular is None else int(n_regular)
        chosen = start + _select(A.shape[1] - start, 8) if A.shape[1] > start else None
        _traces(axes[k], "thresholds", A, dt, chosen, "threshold")
        k += 1
    if outputs is not None:
        output_traces(axes[k], outputs, dt=dt, labels=output_labels, targets=targets)
    for ax in axes[:-1]:
        ax.set_xlabel("")
    axes[-1].set_xlabel("time (ms)")
    for ax in axes:
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def conv_filters(kernel, in_channel=None, max_filters=None, title=None, size=1.0):
    """The filters of a Conv2D kernel as a grid of images, one per output channel.

    Args:
        kernel: (kh, kw, C_in, C_out) array (Keras' Conv2D kernel layout).
        in_channel: which input channel to show (int), or None for the mean over the input
            channels (the channel itself when C_in = 1).
        max_filters: show at most this many output channels (evenly sampled), None for all.
        title: figure title (None: none).
        size: inches per filter image.

    Returns:
        the matplotlib figure; every image shares one symmetric colour scale
        [-max |w|, max |w|] (colour bar on the right), red positive, blue negative.

    Example:

    >>> import numpy as np, kspike
    >>> kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 16))
    >>> fig = kspike.plotting.conv_filters(kernel, title="conv1")
    >>> sum(len(ax.images) for ax in fig.axes)
    16
    """
    plt = _pyplot()
    if hasattr(kernel, "numpy"):
        kernel = kernel.numpy()
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 4:
        raise ValueError("`kernel` must be a Conv2D kernel of shape (kh, kw, C_in, C_out), "
                         f"received an array of shape {k.shape}.")
    if in_channel is None:
        images = k.mean(axis=2)
    else:
        if (isinstance(in_channel, bool) or not isinstance(in_channel, (int, np.integer))
                or not 0 <= in_channel < k.shape[2]):
            raise ValueError(f"`in_channel` must be None or an integer in [0, {k.shape[2]}), "
                             f"received {in_channel!r}.")
        images = k[:, :, int(in_channel)]
    chosen = _select(images.shape[2], max_filters)
    n = len(chosen)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.8, size * rows + 0.4),
                             squeeze=False)
    vmax = float(np.max(np.abs(images[:, :, chosen]))) or 1.0
    image = None
    for ax, index in zip(axes.flat, chosen):
        image = ax.imshow(images[:, :, index], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(str(index), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig, path, formats=("png", "pdf"), dpi=150, overwrite=False):
    """Save ``fig`` as ``path.png`` and ``path.pdf`` (``formats``) and close it.

    Existing files are never replaced unless ``overwrite=True``: a FileExistsError names the
    file. Returns the list of written paths.
    """
    plt = _pyplot()
    path = os.fspath(path)
    stem, extension = os.path.splitext(path)
    if extension.lstrip(".") in ("png", "pdf", "svg"):
        path = stem
    targets = [f"{path}.{fmt}" for fmt in formats]
    if not overwrite:
        for target in targets:
            if os.path.exists(target):
                raise FileExistsError(f"{target!r} exists; kspike does not overwrite figures "
                                      "(choose another path or pass overwrite=True).")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    for target in targets:
        fig.savefig(target, dpi=dpi)
    plt.close(fig)
    return targets
