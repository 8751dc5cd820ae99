"""Record the membrane voltages (and thresholds) of a trained model's spiking layers, also when
they were built with ``output="spikes"`` (docs/probe.md).

A model trained for speed emits spikes only; ``Probe(model)`` builds, next to it, a twin of
each spiking layer with ``output="all"`` that reads the trained layer's weights at every call,
and runs the model's chain layer by layer through the twins::

    probe = kspike.Probe(model)
    y, records = probe(x)                  # or kspike.plotting.probe(model, x)
    records[0].spikes, records[0].voltage, records[0].threshold

The model itself is not changed (its layers keep ``output="spikes"`` and their fast loops).
"""
from typing import NamedTuple, Optional

import keras
import numpy as np

from kspike import graph
from kspike.cells import split_outputs

__all__ = ["Probe", "ProbeRecord", "probe"]


class ProbeRecord(NamedTuple):
    """The activity of one spiking layer over a batch (NumPy arrays, batch and time first).

    Attributes:
        name: the layer's name.
        spikes: (B, T, *features) 0/1.
        voltage: (B, T, *features) membrane potential (after the reset, as the layer's
            ``output="all"`` gives it).
        threshold: (B, T, n) adaptive threshold A_t of a kspike cell (constant ``thr`` for
            LIF neurons); None for ``IFNeurons`` / ``LIFNeurons``, whose threshold is the
            layer's ``thr``.
        dt: the time step in ms of a kspike cell; 1.0 (one step) for the neuron layers.
    """
    name: str
    spikes: np.ndarray
    voltage: np.ndarray
    threshold: Optional[np.ndarray]
    dt: float


class _Twin:
    def __init__(self, layer):
        self.layer = layer
        self.twin = None

    def _make(self, shape):
        layer = self.layer
        if graph.is_neuron_layer(layer):
            config = layer.get_config()
            config.update(output="all", return_sequences=True, return_state=False,
                          stateful=False, name=f"{layer.name}_probe")
            twin = type(layer).from_config(config)
        else:
            cell = graph.spiking_cell_of(layer)
            config = cell.get_config()
            config["output"] = "all"
            twin_cell = type(cell).from_config(config)
            if getattr(layer, "specialised", False):
                from kspike.engine import SpikingRNN
                twin = SpikingRNN(twin_cell, return_sequences=True, name=f"{layer.name}_probe")
            else:
                twin = keras.layers.RNN(twin_cell, return_sequences=True,
                                        name=f"{layer.name}_probe")
        twin.build(shape)
        self.twin = twin

    def __call__(self, x, training):
        if self.twin is None:
            self._make(tuple(x.shape))
        # The trained weights, read at every call (the probe follows further training).
        self.twin.set_weights(self.layer.get_weights())
        layer = self.layer
        if graph.is_neuron_layer(layer):
            spikes, voltage = self.twin(x, training=training)
            threshold, dt = None, 1.0
        else:
            z, voltage, threshold = split_outputs(self.twin(x, training=training))
            spikes, dt = z, float(graph.spiking_cell_of(layer).dt)
            threshold = keras.ops.convert_to_numpy(threshold)
        record = ProbeRecord(layer.name, keras.ops.convert_to_numpy(spikes),
                             keras.ops.convert_to_numpy(voltage), threshold, dt)
        following = spikes if getattr(layer, "return_sequences", True) else spikes[:, -1]
        return following, record


class Probe:
    """Runs a model with every spiking layer replaced by an ``output="all"`` twin.

    Args:
        model: a built chain-shaped ``keras.Model`` (Sequential or functional, one input, as
            ``kspike.graph.parse`` reads it) with spiking layers: RNN layers / ``SpikingRNN``
            over ``kspike.LIF`` / ``ALIF`` cells (``output="spikes"`` or ``"all"``) and
            ``kspike.IFNeurons`` / ``LIFNeurons``. Other layers run as they are.

    Call arguments:
        x: the model's input, e.g. (B, T, n_in).
        training: forwarded to every layer (default False).

    Returns:
        (predictions, records): the model's output (equal to ``model(x)``; NumPy) and one
        ``ProbeRecord`` per spiking layer in model order.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, thr=0.03, seed=0), return_sequences=True,
    ...                      name="alif"),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> x = (np.random.default_rng(0).random((4, 20, 5)) < 0.3).astype("float32")
    >>> y, records = kspike.Probe(model)(x)
    >>> [(r.name, r.spikes.shape, r.voltage.shape, r.threshold.shape) for r in records]
    [('alif', (4, 20, 8), (4, 20, 8), (4, 20, 8))]
    >>> bool(np.allclose(y, model(x), atol=1e-6))
    True
    """

    def __init__(self, model):
        stages = graph.parse(model, "kspike.Probe", flatten_nested=True)
        self.model = model
        self._steps = []
        for stage in stages:
            spiking = isinstance(stage, (graph.SpikingLayer, graph.NeuronLayer))
            if spiking:
                graph.check_stateless(stage, "kspike.Probe")
            self._steps.append(_Twin(stage.layer) if spiking else stage.layer)
        if not any(isinstance(step, _Twin) for step in self._steps):
            raise ValueError(f"kspike.Probe: model {model.name!r} has no spiking layer (RNN "
                             "layers of kspike cells, kspike.IFNeurons / LIFNeurons).")

    def __call__(self, x, training=False):
        y = keras.ops.convert_to_tensor(x)
        records = []
        for step in self._steps:
            if isinstance(step, _Twin):
                y, record = step(y, training)
                records.append(record)
            else:
                y = step(y, training=training)
        return keras.ops.convert_to_numpy(y), records


def probe(model, x, training=False):
    """``Probe(model)(x)``: the model's predictions and a ``ProbeRecord`` (spikes, voltage,
    threshold) for each of its spiking layers, also for layers built with
    ``output="spikes"``. Build a ``Probe`` once to probe a model repeatedly."""
    return Probe(model)(x, training=training)
