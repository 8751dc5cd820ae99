"""What kspike knows about a model: which layers are its own, and a model as a chain of stages.

Two parts (docs/architecture.md):

* Predicates, the one definition of each "is this a kspike ..." question:
  ``is_spiking_cell(obj)``, ``spiking_cell_of(layer)``, ``is_spiking_layer(layer)``,
  ``is_readout(layer)``, ``is_neuron_layer(layer)``, ``is_specialised_cell(cell)``.
* ``parse(model, who)``: a chain-shaped model (``keras.Sequential`` or a functional model in which
  every layer takes the previous layer's single output) as a list of typed stages
  (``SpikingLayer``, ``RecurrentLayer``, ``Readout``, ``NeuronLayer``, ``PerStepLayer``,
  ``TimeAverage``, ``UnsupportedLayer``). The parser does the checks every consumer shares (a built model with one
  input and one output, a chain, every layer used once) and classifies each layer; a consumer
  (e-prop, S-TLLR, RateBP, export) then accepts the stage types it supports and refuses the rest
  with ``refuse(stage, ...)`` or its own message, so every error names the layer, its type and
  what is supported.
* ``parse_graph(model, who)``: a model of any acyclic topology (residual ``Add`` blocks) as
  ``Node`` objects (a stage and the indices of the nodes feeding it), in dependency order; the
  stages are those of ``parse`` plus ``Merge`` (``keras.layers.Add``).

Example:

>>> import keras, kspike
>>> model = keras.Sequential([keras.Input((100, 20)),
...                           keras.layers.RNN(kspike.LIF(64), return_sequences=True),
...                           kspike.LeakyReadout(10)])
>>> [type(s).__name__ for s in kspike.graph.parse(model, "my rule")]
['SpikingLayer', 'Readout']
"""
import dataclasses
from typing import Optional

import keras

from kspike import compat
from kspike.cells import SpikingCell
from kspike.layers import FoldTime, IFNeurons, LeakyReadout, LIFNeurons

__all__ = ["is_spiking_cell", "spiking_cell_of", "is_spiking_layer", "is_readout",
           "is_specialised_cell", "check_undelayed", "describe", "Stage", "SpikingLayer",
           "RecurrentLayer", "Readout", "NeuronLayer", "PerStepLayer", "TimeAverage",
           "UnsupportedLayer", "Merge", "Node", "is_neuron_layer", "parse", "parse_graph",
           "refuse",
           "check_stateless", "spiking_stages", "PER_STEP_LAYERS", "LAST_AXIS_LAYERS"]


# ----------------------------------------------------------------------------- predicates
def is_spiking_cell(obj):
    """True if ``obj`` is a kspike RNN cell (``kspike.LIF``, ``kspike.ALIF`` or a subclass)."""
    return isinstance(obj, SpikingCell)


def spiking_cell_of(layer):
    """The kspike cell of ``layer``: the layer itself if it is a cell, its ``.cell`` if it is a
    sequence layer (``keras.layers.RNN``, ``kspike.SpikingRNN``) over one, else None."""
    if is_spiking_cell(layer):
        return layer
    cell = getattr(layer, "cell", None)
    return cell if is_spiking_cell(cell) else None


def is_spiking_layer(layer):
    """True if ``layer`` is a sequence layer over a kspike cell (``keras.layers.RNN`` or
    ``kspike.SpikingRNN`` of a ``LIF``/``ALIF``); False for a bare cell."""
    return is_spiking_cell(getattr(layer, "cell", None))


def is_neuron_layer(layer):
    """True if ``layer`` is a weight-free neuron layer of deep SNNs (``kspike.IFNeurons``,
    ``kspike.LIFNeurons``; docs/neuron_layers.md)."""
    return isinstance(layer, (IFNeurons, LIFNeurons))


def is_readout(layer):
    """True if ``layer`` is a ``kspike.LeakyReadout``."""
    return isinstance(layer, LeakyReadout)


def is_specialised_cell(cell):
    """True if ``cell`` is a kspike cell whose step is kspike's own (its class overrides none
    of ``call``, ``pack_state``, ``unpack_state``) and without synaptic delays (``n_delay=1``),
    so a fused loop may replace the step."""
    return (is_spiking_cell(cell)
            and not getattr(cell, "delayed", False)
            and type(cell).call is SpikingCell.call
            and type(cell).pack_state is SpikingCell.pack_state
            and type(cell).unpack_state is SpikingCell.unpack_state)


def check_undelayed(cell, who, layer=None, error=ValueError):
    """Raise ``error`` if the kspike ``cell`` has synaptic delays (``n_delay`` > 1), which
    ``who`` (a learning rule, a converter) does not handle; ``layer`` names where it is."""
    n_delay = getattr(cell, "n_delay", 1)
    if n_delay > 1:
        where = describe(layer) if layer is not None else f"cell {cell.name!r}"
        raise error(f"{who} does not support synaptic delays: {where} has a cell with "
                    f"n_delay={n_delay!r}; expected n_delay=1 (train delayed cells with "
                    "BPTT, kspike.Trainer's default rule).")


def describe(layer):
    """``"layer 'name' (Type)"``, how every kspike error names a layer."""
    return f"layer {layer.name!r} ({type(layer).__name__})"


# ----------------------------------------------------------------------------- stages
# Layers that act on every time step independently (a (B, T, n) input is a batch of B*T rows).
PER_STEP_LAYERS = (keras.layers.Dense, keras.layers.Activation, keras.layers.Dropout,
                   keras.layers.GaussianNoise, keras.layers.GaussianDropout,
                   keras.layers.AlphaDropout, keras.layers.ReLU, keras.layers.LeakyReLU,
                   keras.layers.ELU, keras.layers.Identity)
# Per-step only when they normalise over the last (feature) axis.
LAST_AXIS_LAYERS = (keras.layers.Softmax, keras.layers.LayerNormalization,
                    keras.layers.BatchNormalization)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One layer of a parsed chain.

    Attributes:
        layer: the Keras layer.
        sequence_in: True if the layer receives sequences (B, T, ...), False if it receives a
            single step (after a recurrent layer with ``return_sequences=False``).
    """
    layer: object
    sequence_in: bool

    @property
    def name(self):
        return self.layer.name

    @property
    def sequence_out(self):
        """True if the layer outputs sequences (B, T, ...)."""
        return self.sequence_in


@dataclasses.dataclass(frozen=True)
class SpikingLayer(Stage):
    """A ``keras.layers.RNN`` / ``kspike.SpikingRNN`` over a kspike cell ``cell``."""
    cell: SpikingCell = None

    @property
    def sequence_out(self):
        return bool(getattr(self.layer, "return_sequences", True))


@dataclasses.dataclass(frozen=True)
class RecurrentLayer(Stage):
    """A ``keras.layers.RNN`` (LSTM, GRU, ...) over a cell that is not kspike's."""
    cell: object = None

    @property
    def sequence_out(self):
        return bool(getattr(self.layer, "return_sequences", True))


@dataclasses.dataclass(frozen=True)
class Readout(Stage):
    """A ``kspike.LeakyReadout`` (B, T, n) -> (B, T, units)."""

    @property
    def sequence_out(self):
        return True


@dataclasses.dataclass(frozen=True)
class NeuronLayer(Stage):
    """A weight-free ``kspike.IFNeurons`` / ``kspike.LIFNeurons`` layer (B, T, *features)."""

    @property
    def sequence_out(self):
        return bool(getattr(self.layer, "return_sequences", True))


@dataclasses.dataclass(frozen=True)
class PerStepLayer(Stage):
    """A layer acting on each time step alone: one of ``PER_STEP_LAYERS``, one of
    ``LAST_AXIS_LAYERS`` over the last axis, a ``TimeDistributed`` or ``kspike.FoldTime`` of a
    stateless layer, or a ``Reshape`` that keeps the time axis (``inner`` is the layer that
    one step (B, *features) goes through: the wrapped layer, a ``Reshape`` of the per-step
    target shape, or ``layer`` itself)."""
    inner: object = None


@dataclasses.dataclass(frozen=True)
class TimeAverage(Stage):
    """A ``keras.layers.GlobalAveragePooling1D``: the mean over time, (B, T, n) -> (B, n)."""

    @property
    def sequence_out(self):
        return False


@dataclasses.dataclass(frozen=True)
class UnsupportedLayer(Stage):
    """A layer kspike has no stage for; ``reason`` says why (None: an unknown layer type)."""
    reason: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Merge(Stage):
    """A ``keras.layers.Add`` of several inputs of the same shape (residual blocks)."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One layer of a parsed graph (``parse_graph``): its ``stage`` and the indices of the
    nodes feeding it (-1: the model input), in the order of the layer's call."""
    stage: Stage
    inputs: tuple


def _last_axis_only(layer):
    axis = layer.axis
    axis = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    rank = len(layer.input.shape) if _has_single_input(layer) else None
    return all(a == -1 or (rank is not None and a == rank - 1) for a in axis)


def _has_single_input(layer):
    try:
        return not isinstance(layer.input, (list, tuple, dict))
    except (AttributeError, ValueError):
        return False


def _stage(layer, sequence_in):
    cell = spiking_cell_of(layer)
    if cell is not None and cell is not layer:
        return SpikingLayer(layer, sequence_in, cell)
    if isinstance(layer, keras.layers.RNN):
        return RecurrentLayer(layer, sequence_in, layer.cell)
    if is_readout(layer):
        return Readout(layer, sequence_in)
    if is_neuron_layer(layer):
        return NeuronLayer(layer, sequence_in)
    if isinstance(layer, keras.layers.Add):
        return Merge(layer, sequence_in)
    if isinstance(layer, (keras.layers.TimeDistributed, FoldTime)):
        inner = layer.layer
        if getattr(inner, "stateful", False) or hasattr(inner, "cell"):
            return UnsupportedLayer(layer, sequence_in,
                                    f"the wrapped layer {type(inner).__name__} has states")
        return PerStepLayer(layer, sequence_in, inner)
    if isinstance(layer, PER_STEP_LAYERS):
        return PerStepLayer(layer, sequence_in, layer)
    if isinstance(layer, LAST_AXIS_LAYERS):
        if not _last_axis_only(layer):
            return UnsupportedLayer(layer, sequence_in,
                                    f"it works across time steps (axis={layer.axis!r}); only "
                                    "the last (feature) axis has a per-step form")
        return PerStepLayer(layer, sequence_in, layer)
    if isinstance(layer, keras.layers.GlobalAveragePooling1D):
        return TimeAverage(layer, sequence_in)
    if isinstance(layer, keras.layers.Reshape):
        return _reshape_stage(layer, sequence_in)
    return UnsupportedLayer(layer, sequence_in)


def _reshape_stage(layer, sequence_in):
    """A ``Reshape`` whose target keeps the time axis, (B, T, ...) -> (B, T, ...), is per step."""
    target = tuple(layer.target_shape)
    try:
        steps = tuple(layer.input.shape)[1] if _has_single_input(layer) else None
    except (AttributeError, ValueError):
        steps = None
    if sequence_in and steps is not None and len(target) >= 2 and target[0] == steps:
        inner = keras.layers.Reshape(target[1:], name=f"{layer.name}_step")
        return PerStepLayer(layer, sequence_in, inner)
    if not sequence_in:
        return UnsupportedLayer(layer, sequence_in)
    return UnsupportedLayer(layer, sequence_in,
                            f"its target shape {target} does not keep the time axis "
                            f"({steps} steps) first")


def _chain_layers(model, who, error, flatten):
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
    else:
        inputs, outputs = model.inputs, model.outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise error(f"{who}: model {model.name!r} has {len(inputs)} inputs and "
                        f"{len(outputs)} outputs; a single input (B, T, n_in) and a single "
                        "output are needed.")
        layers = [layer for layer in model.layers
                  if not isinstance(layer, keras.layers.InputLayer)]
        previous = inputs[0]
        for layer in layers:
            calls = compat.call_count(layer)
            if calls != 1:
                raise error(f"{who}: {describe(layer)} is used {calls} times in model "
                            f"{model.name!r}; only chains of layers, each called once, are "
                            "supported.")
            fed = compat.inbound_input_tensors(layer)[0]
            if len(fed) != 1 or fed[0] is not previous:
                raise error(f"{who}: {describe(layer)} of model {model.name!r} is not fed by "
                            "exactly the previous layer's single output; the model must be "
                            "a chain of layers.")
            previous = layer.output
        if previous is not outputs[0]:
            raise error(f"{who}: the output of model {model.name!r} is not the output of its "
                        "last layer; the model must be a chain of layers.")
    flat = []
    for layer in layers:
        if flatten and isinstance(layer, keras.Model) and not hasattr(layer, "cell"):
            flat.extend(_chain_layers(layer, who, error, flatten))
        else:
            flat.append(layer)
    return flat


def parse(model, who, error=ValueError, flatten_nested=False):
    """A chain-shaped model as a list of ``Stage`` objects, in order.

    Args:
        model: a built ``keras.Model``, Sequential or functional, taking one input.
        who: what is asking, used at the start of every error message (e.g. "EProp").
        error: the exception class raised (a ``ValueError`` subclass, e.g. export's
            ``ExportError``).
        flatten_nested: parse the layers of nested sub-models in place (when False a nested
            model is an ``UnsupportedLayer``).

    Returns:
        list of stages, one per layer (``keras.layers.InputLayer`` left out). Each stage's
        ``sequence_in`` follows the ``return_sequences`` of the recurrent layers before it.

    Raises:
        TypeError: ``model`` is not a ``keras.Model``.
        ``error``: the model is not built, has several inputs or outputs, or is not a chain.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"{who} needs a keras.Model (Sequential or functional), received "
                        f"{model!r} of type {type(model).__name__}.")
    if not model.built:
        raise error(f"{who}: model {model.name!r} is not built; start it with "
                    "keras.Input((T, n_in)) or call it once on a batch.")
    stages = []
    sequence = True
    for layer in _chain_layers(model, who, error, flatten_nested):
        stage = _stage(layer, sequence)
        if isinstance(layer, keras.Model) and not isinstance(stage, (SpikingLayer,
                                                                      RecurrentLayer)):
            stage = UnsupportedLayer(layer, sequence, "a nested model")
        stages.append(stage)
        sequence = stage.sequence_out
    return stages


def parse_graph(model, who, error=ValueError):
    """A model of any acyclic topology (e.g. residual ``Add`` blocks) as ``Node`` objects in an
    order where every node comes after the nodes feeding it.

    Args: as ``parse`` (nested models are ``UnsupportedLayer`` stages).

    Returns:
        (nodes, output): the list of ``Node`` and the index of the node giving the model's
        output.

    Raises:
        TypeError: ``model`` is not a ``keras.Model``.
        ``error``: the model is not built, has several inputs or outputs, or uses a layer
        more than once.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"{who} needs a keras.Model (Sequential or functional), received "
                        f"{model!r} of type {type(model).__name__}.")
    if isinstance(model, keras.Sequential):
        stages = parse(model, who, error)
        nodes = [Node(stage, (i - 1,)) for i, stage in enumerate(stages)]
        return nodes, len(nodes) - 1
    if not model.built:
        raise error(f"{who}: model {model.name!r} is not built; start it with "
                    "keras.Input((T, n_in)) or call it once on a batch.")
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise error(f"{who}: model {model.name!r} has {len(inputs)} inputs and "
                    f"{len(outputs)} outputs; a single input (B, T, n_in) and a single output "
                    "are needed.")
    pending = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in pending:
        calls = compat.call_count(layer)
        if calls != 1:
            raise error(f"{who}: {describe(layer)} is used {calls} times in model "
                        f"{model.name!r}; every layer must be called once.")
    index = {id(inputs[0]): -1}
    sequence = {-1: True}
    nodes = []
    while pending:
        progress = False
        for layer in list(pending):
            fed = compat.inbound_input_tensors(layer)[0]
            if not all(id(t) in index for t in fed):
                continue
            sources = tuple(index[id(t)] for t in fed)
            stage = _stage(layer, all(sequence[i] for i in sources))
            if isinstance(layer, keras.Model) and not isinstance(stage, (SpikingLayer,
                                                                          RecurrentLayer)):
                stage = UnsupportedLayer(layer, stage.sequence_in, "a nested model")
            nodes.append(Node(stage, sources))
            index[id(layer.output)] = len(nodes) - 1
            sequence[len(nodes) - 1] = stage.sequence_out
            pending.remove(layer)
            progress = True
        if not progress:
            raise error(f"{who}: the layers {[layer.name for layer in pending]} of model "
                        f"{model.name!r} are not fed by the model input.")
    if id(outputs[0]) not in index:
        raise error(f"{who}: the output of model {model.name!r} is not a layer output.")
    return nodes, index[id(outputs[0])]


def refuse(stage, who, supported, error=ValueError):
    """Raise ``error`` saying that ``who`` cannot use the layer of ``stage`` and what it
    supports (with the parser's reason when it has one)."""
    reason = getattr(stage, "reason", None)
    why = f": {reason}" if reason else ""
    raise error(f"{who} does not support {describe(stage.layer)}{why}. Supported: "
                f"{supported}.")


def check_stateless(stage, who, error=ValueError):
    """Raise ``error`` if the recurrent layer of ``stage`` has ``go_backwards``, ``stateful``
    or ``return_state`` set (no rule or export handles them)."""
    for flag in ("go_backwards", "stateful", "return_state"):
        if getattr(stage.layer, flag, False):
            raise error(f"{who} does not support {describe(stage.layer)} with {flag}=True; "
                        f"rebuild the layer with {flag}=False (the weights can be copied with "
                        "set_weights).")


def spiking_stages(model):
    """The ``SpikingLayer`` stages among the top-level layers of ``model`` (any topology),
    in the order of ``model.layers``."""
    layers = getattr(model, "layers", [])
    return [SpikingLayer(layer, True, layer.cell) for layer in layers if is_spiking_layer(layer)]
