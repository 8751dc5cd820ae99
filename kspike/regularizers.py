"""Activity regularisers of spiking layers, and the probe that records their activity.

Two pieces live here:

* ``record_activity(model, x)`` runs ``model`` once and returns its predictions together with the
  spike sequences (and, for cells built with ``output="all"``, the membrane potentials and
  thresholds) of every kspike spiking layer of the model, all from the SAME forward pass. It is
  the one mechanism the Trainer, the learning rules (BPTT, e-prop, S-TLLR) and ``model.fit``
  regularisation use to see inside a model.
* ``FiringRateRegularizer`` (LSNN form) and ``VoltageRegularizer``: callables on the list of
  ``LayerActivity`` records that ``record_activity`` returns. In ``model.fit`` they act through
  ``with_regularization(model, regularizers)``, which adds their terms with ``add_loss``.

A spiking layer is a ``keras.layers.RNN`` or ``kspike.SpikingRNN`` (anything with a ``.cell``)
whose ``.cell`` is a ``kspike.LIF`` or ``kspike.ALIF``, or a neuron layer of deep SNNs
(``kspike.IFNeurons``, ``kspike.LIFNeurons``; spikes of shape (B, T, *features), time step
dt = 1 ms by convention, so rates in Hz are 1000 x spikes per neuron and step). The probe works
on functional and ``Sequential`` models (it reads the layers' outputs from the model's graph);
the spiking layers must sit at the top level of the model and return whole sequences
(``return_sequences=True``).
"""
import warnings
import weakref
from typing import NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from kspike import compat, graph

__all__ = ["LayerActivity", "SpikeRate", "spiking_layers", "activity_probe", "record_activity",
           "FiringRateRegularizer", "VoltageRegularizer", "ActivityPenalty",
           "with_regularization", "mean_firing_rates", "firing_rate_logs", "check_regularizers",
           "total_penalty"]


class LayerActivity(NamedTuple):
    """What one spiking layer did during a forward pass.

    Attributes:
        name: the layer's name.
        spikes: z, (B, T, n) float32 tensor of 0/1 ((B, T, *features) for a neuron layer), or
            None when the layer returns only its last step (``return_sequences=False``).
        voltage: v, (B, T, n) float32, or None unless the cell (the neuron layer) has
            ``output="all"``.
        threshold: A (adaptive threshold), (B, T, n) float32, or None unless ``output="all"``
            (always None for a neuron layer: its threshold is the constant ``layer.thr``).
        dt: the cell's time step in ms (1.0 for a neuron layer).
        layer: the Keras layer itself.
    """
    name: str
    spikes: Optional[tf.Tensor]
    voltage: Optional[tf.Tensor]
    threshold: Optional[tf.Tensor]
    dt: float
    layer: object


def spiking_layers(model):
    """The top-level kspike spiking layers of ``model`` (recurrent layers over kspike cells and
    the neuron layers ``kspike.IFNeurons`` / ``kspike.LIFNeurons``), in graph order.

    Raises:
        ValueError: if a spiking layer is nested inside a sub-model (its outputs are not in
            ``model``'s graph, so no probe can read them in the same forward pass).
    """
    layers = [layer for layer in getattr(model, "layers", [])
              if graph.is_spiking_layer(layer) or graph.is_neuron_layer(layer)]
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            nested = [sub.name for sub in compat.nested_layers(layer)
                      if graph.is_spiking_layer(sub) or graph.is_neuron_layer(sub)]
            if nested:
                raise ValueError(
                    f"Spiking layers {nested} sit inside the nested model '{layer.name}' of "
                    f"'{model.name}'. kspike reads spike sequences from the top-level graph: "
                    "build one functional model over all layers (e.g. call the nested model's "
                    "layers directly).")
    return layers


class _Probe:
    """A functional model sharing ``model``'s layers that also outputs the spiking layers'
    sequences. Holds the per-layer facts needed to turn raw outputs into LayerActivity."""

    def __init__(self, model):
        self.layers = spiking_layers(model)
        if not self.layers:
            self.model = None
            return
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(
                f"Cannot record the spikes of model '{model.name}' ({type(model).__name__}): "
                "kspike needs a functional or Sequential model with a known input "
                "(build it from keras.Input(...)).")
        outputs = compat.output_structure(model)
        if outputs is None:
            outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
        records = []
        for layer in self.layers:
            try:
                out = layer.output
            except (AttributeError, ValueError) as error:
                raise ValueError(
                    f"Cannot read the output of spiking layer '{layer.name}' of model "
                    f"'{model.name}': it must be called exactly once in the model's graph "
                    f"({error}).") from None
            if graph.is_neuron_layer(layer):
                # [spikes, voltages] with output="all", then V_T with return_state=True.
                out = list(out) if isinstance(out, (list, tuple)) else [out]
                out = out[:2] if layer.output_mode == "all" else out[:1]
            elif isinstance(out, (list, tuple)):  # return_state=True: [sequence, *states]
                out = [out[0]]
            else:
                out = [out]
            records.append(out)
        self.sequences = [layer.return_sequences if graph.is_neuron_layer(layer)
                          else len(r[0].shape) == 3 for layer, r in zip(self.layers, records)]
        self.modes = [layer.output_mode if graph.is_neuron_layer(layer)
                      else layer.cell.output_mode for layer in self.layers]
        inputs = inputs[0] if len(inputs) == 1 else inputs
        self.inputs, self.outputs, self.records = inputs, outputs, records
        self.model = keras.Model(inputs, [outputs, records], name=f"{model.name}_activity_probe")

    def specs(self):
        """(name, dt, output mode, units, sequence, neuron layer) of each recorded layer."""
        specs = []
        for layer, sequence, mode in zip(self.layers, self.sequences, self.modes):
            if graph.is_neuron_layer(layer):
                specs.append((layer.name, 1.0, mode, None, sequence, True))
            else:
                specs.append((layer.name, float(layer.cell.dt), mode, layer.cell.units,
                              sequence, False))
        return specs

    def activities(self, records):
        return [activity._replace(layer=layer) for activity, layer in
                zip(_activities_of(self.specs(), records), self.layers)]


def _activities_of(specs, records):
    """``LayerActivity`` records (``layer`` None) from the raw outputs of the spiking layers.

    Args:
        specs: per layer (name, dt, output mode, units, sequence[, neuron layer]).
        records: per layer its raw output: a tensor, or a list [spikes] / [spikes, voltages]
            (neuron layers).
    """
    result = []
    for spec, raw in zip(specs, records):
        name, dt, mode, units, sequence = spec[:5]
        neuron_layer = len(spec) > 5 and bool(spec[5])
        parts = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        spikes = voltage = threshold = None
        if sequence and neuron_layer:
            spikes = tf.cast(parts[0], tf.float32)
            if mode == "all":
                voltage = tf.cast(parts[1], tf.float32)
        elif sequence:
            raw = tf.cast(parts[0], tf.float32)
            if mode == "all":
                spikes, voltage = raw[..., :units], raw[..., units:2 * units]
                threshold = raw[..., 2 * units:]
            else:
                spikes = raw
        result.append(LayerActivity(name, spikes, voltage, threshold, float(dt), None))
    return result


_PROBES = weakref.WeakKeyDictionary()


def activity_probe(model):
    """The (cached) probe of ``model``; build it outside ``tf.function`` when possible."""
    probe = _PROBES.get(model)
    if probe is None:
        probe = _Probe(model)
        _PROBES[model] = probe
    return probe


def record_activity(model, x, training=None):
    """Run ``model`` on ``x`` once; return its predictions and every spiking layer's activity.

    Args:
        model: a functional or Sequential Keras model whose spiking layers are top-level.
        x: model inputs, e.g. (B, T, n_in).
        training: forwarded to the layers.

    Returns:
        (predictions, activities): the model's output (as ``model(x)`` returns it) and a list of
        ``LayerActivity``, one per spiking layer in graph order (empty for a model without
        spiking layers, which then runs as ``model(x)``).

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, thr=0.03, seed=0), return_sequences=True,
    ...                      name="alif"),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> x = (np.random.default_rng(0).random((4, 20, 5)) < 0.3).astype("float32")
    >>> y, activity = kspike.regularizers.record_activity(model, x)
    >>> [(a.name, tuple(a.spikes.shape), a.dt) for a in activity]
    [('alif', (4, 20, 8), 1.0)]
    >>> [f"{1000 * float(keras.ops.mean(a.spikes)) / a.dt:.0f} Hz" for a in activity]
    ['106 Hz']
    """
    probe = activity_probe(model)
    if probe.model is None:
        return model(x, training=training), []
    predictions, records = probe.model(x, training=training)
    return predictions, probe.activities(records)


def mean_firing_rates(activities):
    """{layer name: mean firing rate in Hz} (float32 scalars) of the layers with spike
    sequences: 1000 * mean(z) / dt with dt in ms."""
    return {a.name: 1000.0 * tf.reduce_mean(a.spikes) / a.dt
            for a in activities if a.spikes is not None}


class SpikeRate(NamedTuple):
    """The spikes of one layer reduced to a mean, for ``firing_rate_logs``.

    Attributes:
        name: the layer's name.
        spikes_per_step: mean of z over batch, time steps and neurons (a scalar: spikes per
            neuron per step).
        dt: the cell's time step in ms.
        units: number of neurons n of the layer (weights the overall mean; the product of the
            feature shape for a neuron layer).
    """
    name: str
    spikes_per_step: tf.Tensor
    dt: float
    units: int


def firing_rate_logs(activities):
    """The firing-rate scalars every kspike rule and the Trainer log, in Hz.

    Args:
        activities: a list of ``LayerActivity`` (as ``record_activity`` returns; layers without
            a spike sequence are skipped) and/or ``SpikeRate`` records.

    Returns:
        {"firing_rate": mean rate over all neurons of all layers (each layer weighted by its
        number of neurons), "firing_rate/<layer>": mean rate of each layer}, scalars in Hz:
        1000 * spikes_per_step / dt with dt in ms, in the dtype of ``spikes_per_step`` (float32
        for ``LayerActivity``; float32 when the records mix dtypes). {} without spiking layers.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((50, 10)),
    ...     keras.layers.RNN(kspike.LIF(16, thr=0.2), return_sequences=True, name="lsnn")])
    >>> x = (np.random.default_rng(0).random((2, 50, 10)) < 0.5).astype("float32")
    >>> _, activity = kspike.regularizers.record_activity(model, x)
    >>> logs = kspike.regularizers.firing_rate_logs(activity)
    >>> sorted(logs)
    ['firing_rate', 'firing_rate/lsnn']
    >>> bool(logs["firing_rate"] == logs["firing_rate/lsnn"])   # one layer: the same rate (Hz)
    True
    """
    rates = []
    for a in activities:
        if isinstance(a, SpikeRate):
            rates.append(a)
        elif isinstance(a, LayerActivity):
            if a.spikes is not None:
                rates.append(SpikeRate(a.name, tf.reduce_mean(tf.cast(a.spikes, tf.float32)),
                                       a.dt, int(np.prod(a.spikes.shape[2:]))))
        else:
            raise TypeError("`activities` must hold LayerActivity or SpikeRate records, "
                            f"received {a!r} of type {type(a).__name__}.")
    if not rates:
        return {}
    values = [tf.convert_to_tensor(r.spikes_per_step) for r in rates]
    if len({v.dtype for v in values}) > 1:
        values = [tf.cast(v, tf.float32) for v in values]
    hz = {r.name: v * tf.cast(1000.0 / float(r.dt), v.dtype) for r, v in zip(rates, values)}
    total = sum(r.units for r in rates)
    logs = {"firing_rate": tf.add_n([hz[r.name] * (r.units / total) for r in rates])}
    logs.update({f"firing_rate/{name}": value for name, value in hz.items()})
    return logs


def _select(activities, names, what, field):
    chosen = [a for a in activities if names is None or a.name in names]
    if names is not None:
        missing = sorted(set(names) - {a.name for a in activities})
        if missing:
            raise ValueError(f"{what}: `layers` names {missing} are not spiking layers of the "
                             f"model (found {[a.name for a in activities]}).")
    for a in chosen:
        if getattr(a, field) is None:
            if field == "spikes":
                hint = "build it with return_sequences=True"
            else:
                hint = "build its cell with output='all' (split with kspike.split_outputs)"
            raise ValueError(f"{what} needs the {field} sequence of layer '{a.name}': {hint}.")
    return chosen


def _check_number(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, received {value!r} of type "
                        f"{type(value).__name__}.")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, received {value!r}.")
    return value


def _check_layers(layers):
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"`layers` must be None or a list of layer names, received {layers!r}.")
    return layers


# Above this a target rate is not a firing rate (a neuron at dt = 1 ms spikes at most 1000 Hz).
MAX_TARGET_HZ = 1000.0
# Targets at or below this (but above 0) are most likely in the former unit, spikes per ms.
_SUSPICIOUS_TARGET_HZ = 0.1


def _check_target(target):
    target = _check_number("target", target)
    if target > MAX_TARGET_HZ:
        raise ValueError(f"`target` is a firing rate in Hz and must be <= {MAX_TARGET_HZ:g} Hz "
                         f"(one spike per 1 ms step), received {target!r} Hz.")
    if 0 < target <= _SUSPICIOUS_TARGET_HZ:
        warnings.warn(f"FiringRateRegularizer(target={target!r}) asks for {target!r} Hz. "
                      "`target` is in Hz, like every firing-rate log (10 Hz is target=10.0); "
                      f"if {target!r} was meant in spikes per ms, pass target={target * 1000:g}.",
                      stacklevel=3)
    return target


@keras.saving.register_keras_serializable(package="kspike")
class FiringRateRegularizer:
    """Firing-rate regulariser in the LSNN form; rates and ``target`` in Hz, like the logs.

    For each spiking layer with neurons j (dt the cell's time step in ms)::

        rate_j  = 1000 * mean over batch and time of z_j(t) / dt           (Hz)
        penalty = strength * sum_j ((rate_j - target) / 1000) ** 2

    summed over the selected layers. The difference is taken in spikes per ms (Hz / 1000), as
    in LSNN, so LSNN's regularisation strengths carry over: LSNN's ``reg_rate`` (Hz) is
    ``target`` as it is.

    Contract (what it receives): a list of ``LayerActivity`` from ``record_activity``; it reads
    ``spikes`` (B, T, n) and ``dt`` of each layer. A learning rule that does not backpropagate
    through time (e-prop) uses the same quantities through ``spike_gradient``: the partial
    derivative of the penalty with respect to every spike,
    2 strength (rate_j - target) / 1000 / (B T dt).

    Args:
        target: desired mean rate per neuron in Hz, 0 <= target <= 1000 (a value in (0, 0.1]
            warns: it looks like the former unit, spikes per ms).
        strength: weight of the penalty, >= 0.
        layers: None for every spiking layer, or a list of layer names.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, thr=0.03, seed=0), return_sequences=True,
    ...                      name="alif"),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> x = (np.random.default_rng(0).random((4, 20, 5)) < 0.3).astype("float32")
    >>> reg = kspike.FiringRateRegularizer(target=10.0, strength=0.1)   # 10 Hz
    >>> _, activity = kspike.regularizers.record_activity(model, x)
    >>> print(f"{float(reg(activity)):.4f}")       # 0.1 * sum_j ((rate_j - 10 Hz) / 1000)^2
    0.0199
    >>> fit_model = kspike.regularizers.with_regularization(model, [reg])   # for model.fit

    ``kspike.Trainer(model, optimizer, loss, regularizers=[reg])`` takes it as well.
    """

    def __init__(self, target=10.0, strength=0.1, layers=None):
        self.target = _check_target(target)
        self.strength = _check_number("strength", strength)
        self.layers = _check_layers(layers)

    @property
    def target_per_ms(self):
        """``target`` in spikes per ms (Hz / 1000), the unit of the penalty's difference."""
        return self.target / 1000.0

    def layer_penalty(self, spikes, dt):
        """Penalty of one layer: spikes (B, T, n), dt in ms -> float32 scalar."""
        rate = tf.reduce_mean(tf.cast(spikes, tf.float32), axis=(0, 1)) / float(dt)
        return self.strength * tf.reduce_sum(tf.square(rate - self.target_per_ms))

    def spike_gradient(self, spikes, dt):
        """d penalty / d z_j(b, t) = 2 strength (rate_j - target) / 1000 / (B T dt) (rates in
        Hz, dt in ms), shape (B, T, n)."""
        spikes = tf.cast(spikes, tf.float32)
        count = tf.cast(tf.shape(spikes)[0] * tf.shape(spikes)[1], tf.float32)
        rate = tf.reduce_mean(spikes, axis=(0, 1)) / float(dt)
        grad = 2.0 * self.strength * (rate - self.target_per_ms) / (count * float(dt))
        return tf.broadcast_to(grad, tf.shape(spikes))

    def __call__(self, activities):
        """List of ``LayerActivity`` -> float32 scalar penalty."""
        chosen = _select(activities, self.layers, "FiringRateRegularizer", "spikes")
        return tf.add_n([tf.constant(0.0)] + [self.layer_penalty(a.spikes, a.dt)
                                              for a in chosen])

    def get_config(self):
        return {"target": self.target, "strength": self.strength, "layers": self.layers,
                "target_unit": "Hz"}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.pop("target_unit", None) != "Hz":
            # Saved before targets were in Hz: the target was in spikes per ms.
            config["target"] = float(config.get("target", 0.01)) * 1000.0
        return cls(**config)

    def __repr__(self):
        return (f"kspike.FiringRateRegularizer(target={self.target}, strength={self.strength}, "
                f"layers={self.layers})")


@keras.saving.register_keras_serializable(package="kspike")
class VoltageRegularizer:
    """Keeps membrane potentials in a band around the threshold.

    With u = (v - A) / A, the normalised distance to the (adaptive) threshold that the spike
    function sees (spike when u > 0; a reset brings u down by about 1)::

        penalty = strength * sum_layers mean_{b,t} sum_j [relu(u - upper)^2 + relu(lower - u)^2]

    It discourages silent neurons far below threshold (u < lower) and runaway depolarisation
    (u > upper) without touching neurons working in the band.

    Contract (what it receives): a list of ``LayerActivity``; it reads ``voltage`` and
    ``threshold`` (B, T, n), so the spiking layers must have cells built with
    ``output="all"``. ``voltage_gradient`` gives the partial derivative of the penalty with
    respect to v at fixed A, for rules that do not backpropagate through time.

    Args:
        strength: weight of the penalty, >= 0.
        lower: lower edge of the band in units of the threshold (u), default -1.
        upper: upper edge of the band (u), default 1; must be > lower.
        layers: None for every spiking layer, or a list of layer names.
    """

    def __init__(self, strength=1e-3, lower=-1.0, upper=1.0, layers=None):
        self.strength = _check_number("strength", strength)
        for name, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                 np.floating)):
                raise TypeError(f"`{name}` must be a number, received {value!r}.")
        if not float(lower) < float(upper):
            raise ValueError(f"`lower` must be < `upper`, received lower={lower!r}, "
                             f"upper={upper!r}.")
        self.lower = float(lower)
        self.upper = float(upper)
        self.layers = _check_layers(layers)

    def _normalised(self, voltage, threshold):
        voltage = tf.cast(voltage, tf.float32)
        threshold = tf.cast(threshold, tf.float32)
        return (voltage - threshold) / threshold

    def layer_penalty(self, voltage, threshold):
        """Penalty of one layer: voltage and threshold (B, T, n) -> float32 scalar."""
        u = self._normalised(voltage, threshold)
        excess = tf.square(tf.nn.relu(u - self.upper)) + tf.square(tf.nn.relu(self.lower - u))
        return self.strength * tf.reduce_mean(tf.reduce_sum(excess, axis=-1))

    def voltage_gradient(self, voltage, threshold):
        """d penalty / d v at fixed A, shape (B, T, n)."""
        u = self._normalised(voltage, threshold)
        count = tf.cast(tf.shape(u)[0] * tf.shape(u)[1], tf.float32)
        du = 2.0 * tf.nn.relu(u - self.upper) - 2.0 * tf.nn.relu(self.lower - u)
        return self.strength * du / (count * tf.cast(threshold, tf.float32))

    def __call__(self, activities):
        """List of ``LayerActivity`` -> float32 scalar penalty."""
        chosen = _select(activities, self.layers, "VoltageRegularizer", "voltage")
        return tf.add_n([tf.constant(0.0)] + [self.layer_penalty(a.voltage, a.threshold)
                                              for a in chosen])

    def get_config(self):
        return {"strength": self.strength, "lower": self.lower, "upper": self.upper,
                "layers": self.layers}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"kspike.VoltageRegularizer(strength={self.strength}, lower={self.lower}, "
                f"upper={self.upper}, layers={self.layers})")


def check_regularizers(regularizers):
    """``regularizers`` (None, one callable or a list of them) as a list; TypeError naming the
    argument for anything not callable."""
    if regularizers is None:
        return []
    if callable(regularizers) and not isinstance(regularizers, (list, tuple)):
        regularizers = [regularizers]
    regularizers = list(regularizers)
    for reg in regularizers:
        if not callable(reg):
            raise TypeError("`regularizers` must be a list of kspike regularisers (callables "
                            f"on a list of LayerActivity), received {reg!r}.")
    return regularizers


# The Trainer and BPTT still call the old private name.
_check_regularizers = check_regularizers


def total_penalty(regularizers, activities):
    """Sum of every regulariser's term (float32 scalar; 0 without regularisers)."""
    terms = [tf.cast(reg(activities), tf.float32) for reg in regularizers]
    return tf.add_n(terms) if terms else tf.constant(0.0)


@keras.saving.register_keras_serializable(package="kspike")
class ActivityPenalty(keras.layers.Layer):
    """Passes a model's outputs through unchanged and ``add_loss``-es activity penalties.

    Built by ``with_regularization``; its inputs are ``[outputs, raw spiking-layer outputs]``.
    """

    def __init__(self, regularizers=(), layer_specs=(), **kwargs):
        super().__init__(**kwargs)
        self.regularizers = check_regularizers(
            [keras.saving.deserialize_keras_object(r) if isinstance(r, dict) else r
             for r in regularizers])
        # (name, dt, output mode, units, sequence[, neuron layer]) of each recorded layer.
        self.layer_specs = [tuple(s) for s in layer_specs]

    def call(self, inputs):
        outputs, records = inputs
        self.add_loss(total_penalty(self.regularizers, _activities_of(self.layer_specs, records)))
        return outputs

    def get_config(self):
        return {**super().get_config(),
                "regularizers": [keras.saving.serialize_keras_object(r)
                                 for r in self.regularizers],
                "layer_specs": [list(s) for s in self.layer_specs]}


def with_regularization(model, regularizers):
    """A model for ``model.fit`` that adds the regularisers' terms to the loss.

    The returned functional model shares every layer and weight with ``model`` and returns the
    same outputs; during its forward pass an ``ActivityPenalty`` layer receives the spiking
    layers' sequences and calls ``add_loss``, so ``model.fit``/``evaluate`` include the
    penalty exactly as the Trainer does.

    Args:
        model: functional or Sequential model whose spiking layers are top-level.
        regularizers: list of kspike regularisers (``FiringRateRegularizer``, ...).

    Returns:
        keras.Model to ``compile`` and ``fit``.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, thr=0.03, seed=0), return_sequences=True,
    ...                      name="alif"),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> x = (np.random.default_rng(0).random((4, 20, 5)) < 0.3).astype("float32")
    >>> fit_model = kspike.regularizers.with_regularization(
    ...     model, [kspike.FiringRateRegularizer(target=10.0, strength=0.1)])
    >>> fit_model.compile("adam", "mse")
    >>> history = fit_model.fit(x, np.zeros((4, 20, 2)), verbose=0)   # trains ``model``'s weights
    """
    regularizers = check_regularizers(regularizers)
    probe = activity_probe(model)
    if probe.model is None:
        raise ValueError(f"Model '{model.name}' has no kspike spiking layer to regularise.")
    specs = [spec if spec[5] else spec[:5] for spec in probe.specs()]
    penalised = ActivityPenalty(regularizers, specs, name=f"{model.name}_activity_penalty")(
        [probe.outputs, probe.records])
    return keras.Model(probe.inputs, penalised, name=f"{model.name}_regularized")
