"""SavedModel export with a streaming (one time step at a time) interface.

``saved_model(model, directory)`` writes a TensorFlow SavedModel with three functions::

    loaded = tf.saved_model.load(directory)
    y = loaded.serve(x)                            # whole sequences (B, T, n_in) -> outputs
    states = loaded.initial_state(tf.constant(B))  # flat list of (B, size) state tensors
    y_t, states = loaded.step(x_t, states)         # (B, n_in) -> (B, n_out), new states

``serve`` runs the model's layers on the whole sequence (``training=False``) and is also the
``serving_default`` signature. ``step`` advances every stateful layer by one time step
(spiking cells through ``cell.call``, the leaky readout through ``LeakyReadout.step``), so a
reloaded model can run sample by sample, e.g. on a device; feeding ``step`` T times from
``initial_state`` reproduces ``serve`` on the whole sequence (to float rounding; spikes are
identical in float64). The states are listed layer by layer in model order, each layer's
states in its own order (``cell.state_names`` for kspike cells: v, [b,] z, r; then zhat of a
``LeakyReadout``).

Gradients: kspike's spike functions use a forward-exact stop-gradient formulation instead of
``tf.custom_gradient``, so ``tf.GradientTape`` through a reloaded ``serve`` (or ``step``)
gives the same gradients as the live model for models built with ``keras.layers.RNN``.
``kspike.SpikingRNN`` layers are exported with the generic ``keras.layers.RNN`` loop over
the same cell (same outputs; its fused loop's ``tf.custom_gradient`` would not be
differentiable after reloading), so their gradients flow through the reloaded model too.

Latency of a stream: ``step`` is stored as one concrete function, so a call costs the graph
and little else (``bin/bench_engine.py`` measures it for 256 ALIF neurons and batch 1). Such a
tiny graph runs fastest without cross-thread scheduling: a process that only streams should call
``tf.config.threading.set_inter_op_parallelism_threads(1)`` before TensorFlow starts.

``kspike.export.load(directory)`` returns the same three functions behind argument checks
(clear ValueErrors naming ``x``, ``x_t``, ``states`` or ``batch_size``); plain
``tf.saved_model.load`` reports bad arguments with TensorFlow's own errors.

Supported models: ``keras.Sequential`` and functional models that are a chain of layers (one
input (B, T, *features), one output), possibly nested, made of

- recurrent layers (``keras.layers.RNN``, ``kspike.SpikingRNN`` or any layer with a kspike cell
  in ``.cell``; Keras' own cells such as ``LSTMCell`` too) with ``go_backwards=False``,
  ``stateful=False``, ``return_state=False``; ``return_sequences=False`` only when no sequence
  layer follows;
- ``kspike.LeakyReadout``;
- the neuron layers ``kspike.IFNeurons`` / ``kspike.LIFNeurons`` (state: the voltage);
- ``keras.layers.GlobalAveragePooling1D``, the mean over time (streamed as the running mean);
- per-time-step layers: ``Dense``, ``Activation``, ``Dropout`` (and the noise layers, identity
  at inference), activation layers, ``Softmax``/``LayerNormalization``/``BatchNormalization``
  over the last axis, ``Identity``, ``TimeDistributed`` or ``kspike.FoldTime`` of any
  stateless layer (Conv2D, pooling, Flatten, ...) and a ``Reshape`` that keeps the time axis.

``serve`` takes any number of steps T (also for a model built on ``keras.Input((T, n_in))``).
Anything else is refused with an error naming the layer; ``saved_model(...,
streaming=False)`` exports ``serve`` alone for such models (docs/export.md).
"""
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat

import keras
import numpy as np
import tensorflow as tf

from kspike import dynamics, graph

__all__ = ["saved_model", "load", "LoadedModel", "StreamingModel", "ServingModel",
           "ExportError",
           "DirectoryNotEmptyError", "DamagedExportError", "MARKER_FILE", "EXPORT_FILES"]

_logger = logging.getLogger("kspike")


class ExportError(ValueError):
    """The model cannot be exported with a streaming ``step`` (the message names the layer)."""


class DirectoryNotEmptyError(FileExistsError, ValueError):
    """The export directory exists and is not empty (and ``overwrite`` is False), or holds
    files that are not part of a previous export (the message lists them)."""


class DamagedExportError(ValueError):
    """An export directory cannot be loaded: the message names the directory, the damaged
    file and the problem."""


_describe = graph.describe


# ----------------------------------------------------------------------------- stages
class _Stage:
    """One layer in step form. ``sequence`` is True if the layer consumes (B, T, n)."""

    state_specs = ()

    def __init__(self, layer):
        self.layer = layer

    def initial_state(self, batch_size):
        return []

    def sequence(self, x):
        """The layer on a whole sequence (B, T, n), as in the model."""
        return self.layer(x, training=False)

    def step(self, x, states):
        raise NotImplementedError


class _RecurrentStage(_Stage):
    def __init__(self, layer):
        super().__init__(layer)
        cell = layer.cell
        sizes = cell.state_size
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        for size in sizes:
            if not isinstance(size, int):
                raise ExportError(f"Cannot export {_describe(layer)}: its cell has nested or "
                                  f"multi-dimensional states {cell.state_size!r}; only flat "
                                  "(batch, size) states are supported.")
        probe = self._initial(1)
        self.state_specs = tuple(tf.TensorSpec((None, s.shape[-1]), s.dtype) for s in probe)

    def _initial(self, batch_size):
        cell = self.layer.cell
        if hasattr(cell, "get_initial_state"):
            states = cell.get_initial_state(batch_size=batch_size)
        else:
            states = [tf.zeros((batch_size, s), cell.compute_dtype) for s in cell.state_size]
        if not isinstance(states, (list, tuple)):
            states = [states]
        return [tf.convert_to_tensor(s) for s in states]

    def initial_state(self, batch_size):
        return self._initial(batch_size)

    def sequence(self, x):
        layer = self.layer
        if not getattr(layer, "specialised", False):
            return layer(x, training=False)
        # kspike.SpikingRNN's fused loop has a tf.custom_gradient, which a SavedModel cannot
        # differentiate after reloading; the generic keras.layers.RNN loop over the same cell
        # gives the same outputs and keeps the exported function differentiable.
        initial = [tf.cast(s, layer.cell.compute_dtype)
                   for s in layer.get_initial_state(tf.shape(x)[0])]
        last, outputs, _ = keras.layers.RNN.inner_loop(layer, x, initial, None, training=False)
        return tf.cast(outputs if layer.return_sequences else last, layer.compute_dtype)

    def step(self, x, states):
        cell = self.layer.cell
        states = list(states)
        if not graph.is_spiking_cell(cell):
            # keras.layers.RNN casts the states to the cell's compute dtype.
            states = [tf.cast(s, cell.compute_dtype) for s in states]
        output, new_states = cell(x, states if len(states) > 1 else states[0], training=False)
        if not isinstance(new_states, (list, tuple)):
            new_states = [new_states]
        new_states = [tf.cast(n, spec.dtype) for n, spec in zip(new_states, self.state_specs)]
        return tf.cast(output, self.layer.compute_dtype), new_states


class _ReadoutStage(_Stage):
    def __init__(self, layer):
        super().__init__(layer)
        self.dtype = layer.compute_dtype
        self.state_specs = (tf.TensorSpec((None, layer.units), self.dtype),)

    def initial_state(self, batch_size):
        return [tf.zeros((batch_size, self.layer.units), self.dtype)]

    def step(self, x, states):
        y, zhat = self.layer.step(tf.cast(x, self.dtype), states[0])
        return y, [zhat]


class _PerStepStage(_Stage):
    def __init__(self, layer, inner=None):
        super().__init__(layer)
        self.inner = inner or layer

    def sequence(self, x):
        if self.inner is self.layer:
            return self.layer(x, training=False)
        # TimeDistributed, FoldTime or a time-keeping Reshape: the per-step layer on the
        # (B * T, ...) steps folded into the batch. (Keras' TimeDistributed needs a static T,
        # the served T is free; folding gives the same values as one call per step.)
        shape = tf.shape(x)
        folded = tf.reshape(x, tf.concat([[-1], shape[2:]], axis=0))
        y = self.inner(folded, training=False)
        return tf.reshape(y, tf.concat([shape[:2], tf.shape(y)[1:]], axis=0))

    def step(self, x, states):
        return self.inner(x, training=False), []


class _NeuronStage(_Stage):
    """``kspike.IFNeurons`` / ``kspike.LIFNeurons``: one state, the voltage V (B, *features)."""

    def __init__(self, layer, input_shape):
        super().__init__(layer)
        features = tuple(input_shape[2:])
        if any(d is None for d in features):
            raise ExportError(f"Cannot export {_describe(layer)}: its feature shape "
                              f"{features} is not fully known.")
        self.features = features
        self.dtype = tf.as_dtype(layer.state_dtype)
        self.params = layer.parameters
        self.v0 = dynamics.node_initial_voltage(self.params)
        self.state_specs = (tf.TensorSpec((None,) + features, self.dtype),)

    def initial_state(self, batch_size):
        shape = tf.concat([tf.reshape(batch_size, [1]), tf.constant(self.features, tf.int32)], 0)
        return [tf.fill(shape, tf.constant(self.v0, self.dtype))]

    def sequence(self, x):
        return self.layer(x, training=False)

    def step(self, x, states):
        spikes, v, _ = dynamics.node_step(states[0], tf.cast(x, self.dtype), self.params)
        return tf.cast(spikes, self.layer.compute_dtype), [v]


class _TimeAverageStage(_Stage):
    """``GlobalAveragePooling1D``, the mean over time: streamed as the running mean of the
    steps so far (states: their sum and their count)."""

    def __init__(self, layer, input_shape):
        super().__init__(layer)
        features = tuple(input_shape[2:])
        if len(features) != 1 or features[0] is None:
            raise ExportError(f"Cannot export {_describe(layer)}: it needs (batch, time, "
                              f"features) inputs with known features, received "
                              f"{tuple(input_shape)}.")
        self.output_dtype = tf.as_dtype(keras.backend.standardize_dtype(layer.compute_dtype))
        # The running sum stays in float32 under mixed precision (a float16 sum of many steps
        # would round away small outputs).
        self.dtype = tf.float64 if self.output_dtype == tf.float64 else tf.float32
        self.state_specs = (tf.TensorSpec((None, features[0]), self.dtype),
                            tf.TensorSpec((None, 1), self.dtype))

    def initial_state(self, batch_size):
        return [tf.zeros(tf.stack([batch_size, spec.shape[-1]]), spec.dtype)
                for spec in self.state_specs]

    def step(self, x, states):
        total = states[0] + tf.cast(x, self.dtype)
        count = states[1] + 1.0
        return tf.cast(total / count, self.output_dtype), [total, count]


def _stage_for(stage, input_shape):
    """The step form of one parsed ``kspike.graph`` stage, or ExportError naming the layer."""
    layer = stage.layer
    if isinstance(stage, (graph.SpikingLayer, graph.RecurrentLayer)):
        if not stage.sequence_in:
            raise ExportError(f"Cannot export {_describe(layer)}: it receives a single step "
                              "(batch, features) after a recurrent layer with "
                              "return_sequences=False; use return_sequences=True there.")
        for flag in ("go_backwards", "stateful", "return_state"):
            if getattr(layer, flag, False):
                raise ExportError(f"Cannot export {_describe(layer)}: {flag}=True has no "
                                  f"streaming step form; rebuild the layer with {flag}=False "
                                  "(the weights can be copied with set_weights), or export "
                                  "serve only with streaming=False.")
        if stage.cell is None or not hasattr(stage.cell, "state_size"):
            raise ExportError(f"Cannot export {_describe(layer)}: no RNN cell in `.cell`.")
        return _RecurrentStage(layer)
    if isinstance(stage, graph.NeuronLayer):
        if not stage.sequence_in:
            raise ExportError(f"Cannot export {_describe(layer)}: it needs sequences (batch, "
                              "time, ...) but follows a layer with return_sequences=False.")
        for flag in ("stateful", "return_state"):
            if getattr(layer, flag, False):
                raise ExportError(f"Cannot export {_describe(layer)}: {flag}=True; the "
                                  "exported step carries the voltage as a state itself. "
                                  f"Rebuild the layer with {flag}=False.")
        if layer.output_mode != "spikes":
            raise ExportError(f"Cannot export {_describe(layer)}: output="
                              f"{layer.output_mode!r} returns two tensors; export a twin with "
                              "output='spikes' (the layer has no weights).")
        return _NeuronStage(layer, input_shape)
    if isinstance(stage, graph.TimeAverage):
        if not stage.sequence_in:
            raise ExportError(f"Cannot export {_describe(layer)}: it averages over time but "
                              "follows a layer with return_sequences=False.")
        return _TimeAverageStage(layer, input_shape)
    if isinstance(stage, graph.Readout):
        if not stage.sequence_in:
            raise ExportError(f"Cannot export {_describe(layer)}: it needs sequences (batch, "
                              "time, features) but follows a layer with "
                              "return_sequences=False.")
        return _ReadoutStage(layer)
    if isinstance(stage, graph.PerStepLayer):
        if stage.inner is not layer and not stage.sequence_in:
            raise ExportError(f"Cannot export {_describe(layer)}: it needs sequences but "
                              "follows a layer with return_sequences=False.")
        return _PerStepStage(layer, inner=stage.inner)
    reason = getattr(stage, "reason", None)
    hint = (" To export `serve` alone (whole sequences, no streaming step), pass "
            "streaming=False.")
    if reason:
        raise ExportError(f"Cannot export {_describe(layer)}: {reason}.{hint}")
    raise ExportError(f"Cannot export {_describe(layer)}: kspike.export knows no streaming "
                      "step form for it. Supported: keras.layers.RNN / kspike.SpikingRNN, "
                      "kspike.LeakyReadout, kspike.IFNeurons / LIFNeurons, Dense, Activation, "
                      "Dropout, TimeDistributed / kspike.FoldTime of stateless layers (Conv2D, "
                      "pooling, Flatten, ...), a Reshape keeping the time axis, "
                      f"GlobalAveragePooling1D and other per-time-step layers.{hint}")


def _output_shape(layer, input_shape):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return tuple(layer.compute_output_shape(input_shape))


# ----------------------------------------------------------------------------- module
def _input_shape(model):
    if not isinstance(model, keras.Model):
        raise TypeError("`model` must be a keras.Model (Sequential or functional), "
                        f"received {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ExportError(f"Cannot export model {model.name!r}: it has no known input "
                          "shape; start it with keras.Input((T, n_in)) or call it once.")
    if len(model.inputs) != 1:
        raise ExportError(f"Cannot export model {model.name!r}: it has {len(model.inputs)} "
                          "inputs; a single input (B, T, *features) is needed.")
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) < 3 or any(d is None for d in input_shape[2:]):
        raise ExportError(f"Cannot export model {model.name!r}: its input must be "
                          f"sequences (batch, time, *features) with known features, "
                          f"received input shape {input_shape}.")
    return input_shape


class StreamingModel(tf.Module):
    """A Keras model with ``serve``, ``initial_state`` and ``step`` tf.functions.

    This is the object ``saved_model`` writes; it can also be used live, e.g. to check the
    streaming form before exporting.

    Args:
        model: a built ``keras.Model`` (see the module docstring for the supported layers)
            taking (B, T, *features) sequences.
        jit_compile: compile ``step`` with XLA (see ``saved_model``).

    Attributes:
        serve: (B, T, *features) -> the model's output, for any T (also when the model was
            built on ``keras.Input((T, n_in))``).
        initial_state: int32 scalar batch size B -> list of (B, *size) initial states.
        step: (x_t (B, *features), states) -> (y_t, new_states).
        state_specs: the ``tf.TensorSpec`` of each state (shape (None, *size)).
        step_shape: the shape of one input step, e.g. (n_in,) or (H, W, C).
    """

    def __init__(self, model, jit_compile=False):
        super().__init__(name="kspike_streaming_model")
        if not isinstance(jit_compile, bool):
            raise TypeError(f"`jit_compile` must be True or False, received {jit_compile!r}.")
        self._jit_compile = jit_compile
        input_shape = _input_shape(model)
        self.model = model
        self.step_shape = tuple(int(d) for d in input_shape[2:])
        self.n_inputs = self.step_shape[-1]
        dtype = tf.as_dtype(keras.backend.standardize_dtype(model.inputs[0].dtype))
        self._stages = []
        shape = input_shape
        for stage in graph.parse(model, "Cannot export", error=ExportError,
                                 flatten_nested=True):
            self._stages.append(_stage_for(stage, shape))
            shape = _output_shape(stage.layer, shape)
        self.state_specs = tuple(
            tf.TensorSpec(spec.shape, spec.dtype, name=f"state_{i}")
            for i, spec in enumerate(s for stage in self._stages for s in stage.state_specs))
        self._input_dtype = dtype
        # Any number of steps: the stages never need the model's static T.
        self.serve = tf.function(
            self._serve, autograph=False,
            input_signature=[tf.TensorSpec((None, None) + self.step_shape, dtype, name="x")])
        self.initial_state = tf.function(
            self._initial_state, autograph=False, input_signature=[tf.TensorSpec((), tf.int32,
                                                                name="batch_size")])
        # ``step`` is kept as its one concrete function: a reloaded concrete function is
        # called without the signature matching of a restored ``tf.function``, which more
        # than halves the per-call latency of a 1-sample stream.
        self.step = tf.function(
            self._step, autograph=False,
            input_signature=[tf.TensorSpec((None,) + self.step_shape, dtype, name="x_t"),
                             [spec for spec in self.state_specs]],
            jit_compile=jit_compile).get_concrete_function()

    def _serve(self, x):
        # The chain layer by layer is the model's own computation (``graph.parse`` checked it).
        for stage in self._stages:
            x = stage.sequence(x)
        return x

    def _initial_state(self, batch_size):
        states = []
        for stage in self._stages:
            states.extend(stage.initial_state(batch_size))
        return states

    def _step(self, x_t, states):
        if self._jit_compile:
            # XLA drops in-graph assertions: the batch sizes are checked by
            # kspike.export.load's argument checks only.
            return self._advance(x_t, states)
        batch = tf.shape(x_t)[0]
        checks = [tf.debugging.assert_equal(
            tf.shape(s)[0], batch,
            message=f"states[{i}] must have the batch size of x_t (its first dimension)")
            for i, s in enumerate(states)]
        with tf.control_dependencies(checks):
            y = tf.identity(x_t)
        return self._advance(y, states)

    def _advance(self, y, states):
        new_states = []
        position = 0
        for stage in self._stages:
            count = len(stage.state_specs)
            y, updated = stage.step(y, states[position:position + count])
            new_states.extend(updated)
            position += count
        return y, new_states


class ServingModel(tf.Module):
    """A Keras model with ``serve`` only (whole sequences, no streaming step): what
    ``saved_model(..., streaming=False)`` writes, for any chain or graph Keras can trace
    (e.g. ``keras.layers.Bidirectional``).

    ``serve`` takes any number of steps T when the model's layers can be traced with an
    unknown T and run on T + 1 steps; otherwise the T the model was built with (a warning says
    so at export).

    Attributes:
        serve: (B, T, *features) -> the model's output.
        fixed_steps: None (any T) or the one T ``serve`` accepts.
    """

    def __init__(self, model):
        super().__init__(name="kspike_serving_model")
        input_shape = _input_shape(model)
        self.model = model
        dtype = tf.as_dtype(keras.backend.standardize_dtype(model.inputs[0].dtype))
        self.step_shape = tuple(int(d) for d in input_shape[2:])
        self.fixed_steps = None
        serve = tf.function(self._serve, autograph=False, input_signature=[
            tf.TensorSpec((None, None) + self.step_shape, dtype, name="x")])
        try:
            serve.get_concrete_function()
            if input_shape[1] is not None:
                # A trace can succeed where a run fails (e.g. a Flatten over time feeding a
                # Dense): run one other length once.
                serve(tf.zeros((1, int(input_shape[1]) + 1) + self.step_shape, dtype))
        except Exception as error:   # noqa: BLE001 - any tracing failure: fall back to T
            if input_shape[1] is None:
                raise
            self.fixed_steps = int(input_shape[1])
            _logger.warning("kspike.export: model %r cannot be traced for any number of "
                            "steps (%s: %s); the exported serve takes exactly T=%d steps.",
                            model.name, type(error).__name__, str(error)[:200],
                            self.fixed_steps)
            serve = tf.function(self._serve, autograph=False, input_signature=[
                tf.TensorSpec((None,) + tuple(input_shape[1:]), dtype, name="x")])
        self.serve = serve

    def _serve(self, x):
        return self.model(x, training=False)


def _shape_text(shape):
    return "(" + ", ".join("batch" if d is None else str(d) for d in shape) + ")"


def _check_step(x_t, states, step_shape, state_specs):
    """Raise a ValueError naming ``x_t`` or ``states`` if they do not fit ``step``."""
    x_t = tf.convert_to_tensor(x_t)
    if tuple(x_t.shape[1:]) != tuple(step_shape) or x_t.shape.rank != len(step_shape) + 1:
        raise ValueError(f"`x_t` must have shape {_shape_text((None,) + tuple(step_shape))}, "
                         f"received {tuple(x_t.shape)}.")
    if not isinstance(states, (list, tuple)) or len(states) != len(state_specs):
        count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
        raise ValueError(f"`states` must be a list of {len(state_specs)} tensors (as returned "
                         f"by initial_state), received {count}.")
    converted = []
    for i, (s, spec) in enumerate(zip(states, state_specs)):
        s = tf.convert_to_tensor(s)
        expected = (x_t.shape[0],) + tuple(spec.shape[1:])
        if tuple(s.shape) != expected:
            raise ValueError(f"`states[{i}]` must have shape {expected} (batch of x_t, state "
                             f"shape), received {tuple(s.shape)}.")
        converted.append(tf.cast(s, spec.dtype))
    return x_t, converted


class LoadedModel:
    """A reloaded export with argument checks (clear ValueErrors) in front of its functions.

    ``tf.saved_model.load(directory)`` gives the raw functions (TensorFlow's own errors for
    bad arguments); ``kspike.export.load(directory)`` wraps them in this class.

    Attributes:
        raw: the object returned by ``tf.saved_model.load``.
        step_shape: the shape of one input step, e.g. (n_in,) or (H, W, C).
        n_inputs: the last entry of ``step_shape`` (the input features n_in).
        state_specs: ``tf.TensorSpec`` of each state (empty for a serve-only export).
        streaming: False for a serve-only export (``saved_model(..., streaming=False)``),
            whose ``initial_state`` and ``step`` raise.
        fixed_steps: None when ``serve`` takes any number of steps, else the one it takes.
    """

    def __init__(self, raw):
        self.raw = raw
        serve = getattr(raw.serve, "concrete_functions", [raw.serve])[0]
        x_spec = serve.structured_input_signature[0][0]
        self._x_dtype = x_spec.dtype
        self.step_shape = tuple(int(d) for d in x_spec.shape[2:])
        self.n_inputs = self.step_shape[-1]
        self.fixed_steps = None if x_spec.shape[1] is None else int(x_spec.shape[1])
        self.streaming = hasattr(raw, "step")
        self.state_specs = ()
        self._step = None
        if self.streaming:
            # Exports store ``step`` as a concrete function (older ones as a tf.function).
            concrete = getattr(raw.step, "concrete_functions", [raw.step])[0]
            _, state_specs = concrete.structured_input_signature[0]
            self._step = concrete
            self.state_specs = tuple(state_specs)

    def serve(self, x):
        """(B, T, *features) sequences -> the model's outputs."""
        x = tf.convert_to_tensor(x)
        expected = (None, self.fixed_steps) + self.step_shape
        if x.shape.rank != len(expected) or tuple(x.shape[2:]) != self.step_shape or (
                self.fixed_steps is not None and x.shape[1] != self.fixed_steps):
            raise ValueError(f"`x` must have shape (batch, "
                             f"{'time' if self.fixed_steps is None else self.fixed_steps}, "
                             f"{', '.join(map(str, self.step_shape))}), received "
                             f"{tuple(x.shape)}.")
        return self.raw.serve(tf.cast(x, self._x_dtype))

    def _require_streaming(self, what):
        if not self.streaming:
            raise ValueError(f"`{what}` is not available: this export was written with "
                             "streaming=False (serve only).")

    def initial_state(self, batch_size):
        """Initial states for a batch of ``batch_size`` (int >= 1): a list of (B, *size)."""
        self._require_streaming("initial_state")
        if isinstance(batch_size, tf.Tensor) and batch_size.shape.rank == 0:
            batch_size = batch_size.numpy()
        if isinstance(batch_size, np.integer):
            batch_size = int(batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, received {batch_size!r}.")
        return self.raw.initial_state(tf.constant(batch_size, tf.int32))

    def step(self, x_t, states):
        """One time step: (x_t (B, *features), states) -> (y_t, new_states)."""
        self._require_streaming("step")
        x_t, states = _check_step(x_t, states, self.step_shape, self.state_specs)
        return self._step(tf.cast(x_t, self._x_dtype), states)


def load(directory):
    """Load a ``saved_model`` export as a ``LoadedModel`` (argument-checked ``serve``,
    ``initial_state`` and ``step``).

    Raises:
        ValueError: ``directory`` holds no SavedModel, or one not written by
            ``kspike.export.saved_model``.
        DamagedExportError (a ValueError): a file of the export is empty, truncated or
            missing; the message names the directory and the file.
    """
    directory = os.path.abspath(os.fspath(directory))
    target = os.path.realpath(directory)
    if not os.path.exists(target):
        # An export killed between its two renames (no atomic exchange) left the old one aside.
        _clean_stale(target, remove=False)
    if not os.path.isfile(os.path.join(target, "saved_model.pb")):
        raise ValueError(f"{directory!r} is not a SavedModel directory (no saved_model.pb).")
    # TensorFlow reports an empty saved_model.pb as a tag mismatch and a truncated variable
    # file as a bare IndexError: check the files first, and again after any failure.
    problem = _damage(target, variables=False)
    if problem is None:
        try:
            raw = tf.saved_model.load(target)
        except Exception as error:   # noqa: BLE001 - re-raised below, named or as it was
            problem = _damage(target)
            if problem is None:
                raise
            raise DamagedExportError(_damage_message(directory, problem)) from error
    if problem is not None:
        raise DamagedExportError(_damage_message(directory, problem))
    if not hasattr(raw, "serve") or (hasattr(raw, "step") != hasattr(raw, "initial_state")):
        raise ValueError(f"The SavedModel in {directory!r} was not written by "
                         "kspike.export.saved_model (no serve/initial_state/step).")
    return LoadedModel(raw)


def _damage_message(directory, problem):
    name, what = problem
    return (f"The export in {directory!r} is damaged: {name} {what}. Write it again with "
            "kspike.export.saved_model(model, directory, overwrite=True).")


def _damage(directory, variables=True):
    """(file, problem) of the first damaged file of a SavedModel directory, or None."""
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(directory, "saved_model.pb")
    size = os.path.getsize(pb)
    if size == 0:
        return "saved_model.pb", "is empty (0 bytes)"
    proto = saved_model_pb2.SavedModel()
    try:
        with open(pb, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as error:   # noqa: BLE001 - protobuf's DecodeError and friends
        return "saved_model.pb", f"is not a valid SavedModel ({size} bytes; {error})"
    if not proto.meta_graphs:
        return "saved_model.pb", f"holds no graph ({size} bytes; truncated?)"
    index = os.path.join(directory, "variables", "variables.index")
    if not os.path.isfile(index):
        return os.path.join("variables", "variables.index"), "is missing"
    if not variables:
        return None
    data = sorted(n for n in os.listdir(os.path.join(directory, "variables"))
                  if n.startswith("variables.data-"))
    data_name = (os.path.join("variables", data[0]) if len(data) == 1
                 else os.path.join("variables", "variables.data-*"))
    try:
        reader = tf.train.load_checkpoint(os.path.join(directory, "variables", "variables"))
    except Exception as error:   # noqa: BLE001
        return os.path.join("variables", "variables.index"), f"is unreadable ({error})"
    for key in sorted(reader.get_variable_to_shape_map()):
        try:
            reader.get_tensor(key)
        except Exception as error:   # noqa: BLE001
            return data_name, (f"is truncated or damaged (reading variable {key!r} failed: "
                               f"{type(error).__name__}: {error})")
    return None


# ----------------------------------------------------------------------------- saving
#: The file kspike writes into every export, so that ``overwrite=True`` knows the directory
#: as a previous export.
MARKER_FILE = "kspike_export.json"
#: The entries of an export directory (``variables/`` holds ``variables.index`` and
#: ``variables.data-NNNNN-of-NNNNN``; ``assets/`` stays empty).
EXPORT_FILES = ("saved_model.pb", "fingerprint.pb", "variables", "assets", MARKER_FILE)
_VARIABLE_FILE = re.compile(r"^variables\.(index|data-\d{5}-of-\d{5})$")
# Leftovers are named after their kind, host, process and target so that a later export can
# tell those of dead processes (safe to remove) from those of a running export.
_LEFTOVER = re.compile(r"^\.kspike-(export|replaced)-([0-9a-f]{8})-(\d+)-([0-9a-f]{8})-(.+)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _host():
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _leftover_name(kind, target):
    return (f".kspike-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}-"
            f"{os.path.basename(target)}")


def _crash_point(name):
    # Lets tests kill a real export (SIGKILL, no clean-up) at a chosen point of the swap.
    if os.environ.get("KSPIKE_EXPORT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _process_alive(pid):
    if os.name == "nt":   # os.kill would terminate the process there: never assume it dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:       # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _clean_stale(target, remove=True):
    """Remove (if ``remove``) the leftovers of killed exports next to ``target``; if an export
    was killed after moving ``target`` aside (the two-rename fallback), put it back."""
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    host = _host()
    for name in sorted(names):
        match = _LEFTOVER.match(name)
        if not match or match.group(2) != host or _process_alive(int(match.group(3))):
            continue
        path = os.path.join(parent, name)
        if match.group(1) == "replaced" and match.group(5) == base and not os.path.lexists(target):
            try:
                os.rename(path, target)
                _logger.warning("kspike.export: restored %s, which an interrupted export had "
                                "moved to %s.", target, path)
                continue
            except OSError:
                pass
        if not remove:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            _remove_tree(path)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def _remove_tree(path):
    # A replaced export keeps its mode, which may lack the write bit its deletion needs.
    try:
        os.chmod(path, stat.S_IRWXU)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _foreign_entries(directory):
    """Paths (relative, directories with a trailing /) in ``directory`` that are not part of
    an export."""
    foreign = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        is_file = os.path.isfile(path) and not os.path.islink(path)
        if name in ("saved_model.pb", "fingerprint.pb", MARKER_FILE) and is_file:
            continue
        if name in ("variables", "assets") and is_dir:
            for inner in sorted(os.listdir(path)):
                inner_path = os.path.join(path, inner)
                if (name == "variables" and _VARIABLE_FILE.match(inner)
                        and os.path.isfile(inner_path) and not os.path.islink(inner_path)):
                    continue
                foreign.append(f"{name}/{inner}" + ("/" if os.path.isdir(inner_path) else ""))
            continue
        foreign.append(name + ("/" if os.path.isdir(path) else ""))
    return foreign


def _check_directory(directory, overwrite):
    """(path as given made absolute, real target with symlinks resolved)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a path (str or os.PathLike), received "
                        f"{directory!r} of type {type(directory).__name__}.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be True or False, received {overwrite!r}.")
    directory = os.path.abspath(os.fspath(directory))
    # A symlinked export directory stays a symlink: the export replaces what it points to.
    target = os.path.realpath(directory)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise DirectoryNotEmptyError(f"Cannot export to {directory!r}: it exists and is "
                                         "a file, not a directory.")
        entries = os.listdir(target)
        if entries and not overwrite:
            raise DirectoryNotEmptyError(f"Cannot export to {directory!r}: the directory is "
                                         "not empty. Choose a new directory or pass "
                                         "overwrite=True to replace a previous export.")
        foreign = _foreign_entries(target) if entries else []
        if entries and not foreign and "saved_model.pb" not in entries:
            foreign = sorted(entries)   # SavedModel pieces without the model itself
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more"
                                               if len(foreign) > 10 else "")
            raise DirectoryNotEmptyError(
                f"Cannot overwrite {directory!r}: it is not a previous export, it holds "
                f"{shown}. overwrite=True replaces only an export (the files "
                f"{', '.join(EXPORT_FILES)}); move these away or choose another directory.")
    return directory, target


def _rename_exchange(a, b):
    """Atomically swap the directories ``a`` and ``b`` (Linux renameat2); False where the
    system or file system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        # The process's own symbols include libc's (glibc >= 2.28 has renameat2).
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def _swap_in(staging, target):
    """Put ``staging`` at ``target`` so that at every instant one of the two exports is
    there (an atomic exchange; where it is unavailable, two renames whose window a later
    export or load repairs, see ``_clean_stale``)."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    if _rename_exchange(staging, target):
        _crash_point("exchanged")
        _remove_tree(staging)   # the previous export now
        return
    old = os.path.join(os.path.dirname(target), _leftover_name("replaced", target))
    os.rename(target, old)
    _crash_point("moved-aside")
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    _crash_point("renamed")
    _remove_tree(old)


def saved_model(model, directory, overwrite=False, jit_compile=False, streaming=True):
    """Write ``model`` as a TensorFlow SavedModel with ``serve``, ``initial_state`` and
    ``step`` (see the module docstring and docs/export.md).

    Args:
        model: a built ``keras.Model`` taking (B, T, *features) sequences: a chain of
            recurrent layers with kspike cells, ``kspike.LeakyReadout``, the neuron layers
            ``kspike.IFNeurons`` / ``LIFNeurons``, ``GlobalAveragePooling1D`` and
            per-time-step layers (with ``streaming=False``: any single-input model).
        directory: where to write the SavedModel (created if missing, with the permissions
            of the umask; a symlink is followed and stays a symlink).
        overwrite: replace a previous export in ``directory``: a directory holding only the
            export files (``EXPORT_FILES``). Anything else in it is refused, the files are
            listed and nothing is touched. Without it any non-empty directory is refused.
            The new model is written next to the old one first and swapped in atomically,
            so a failed or killed export leaves the old export in place; the replaced
            directory keeps its permissions.
        jit_compile: compile ``step`` with XLA: on a 2-core CPU this brings a 1-sample
            step of 256 ALIF neurons from ~0.25 ms to ~0.15 ms per call
            (``bin/bench_engine.py``). XLA may round differently from ``serve`` (a spike
            within float rounding of its threshold can flip) and drops the in-graph check
            that every state has the batch size of ``x_t`` (``kspike.export.load`` still
            checks it), so it is off by default.
        streaming: True: write ``step`` and ``initial_state`` too (refused, with the layer
            named, when a layer has no streaming form). False: write ``serve`` alone, for
            models that cannot be streamed (e.g. ``keras.layers.Bidirectional``): the
            reloaded object has ``serve`` only (``kspike.export.load`` says so if ``step`` is
            called).

    Returns:
        The absolute path of the SavedModel directory (str).

    Raises:
        ExportError (a ValueError): a layer without a streaming form; the message names it.
        DirectoryNotEmptyError (a FileExistsError and ValueError): ``directory`` is not empty
            and ``overwrite`` is False, holds files that are not a previous export, or is a
            file.

    Example:

    >>> import os, tempfile, keras, numpy as np, tensorflow as tf, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> x = (np.random.default_rng(0).random((4, 20, 5)) < 0.3).astype("float32")
    >>> path = kspike.export.saved_model(model, os.path.join(tempfile.mkdtemp(), "lsnn"))
    >>> loaded = tf.saved_model.load(path)
    >>> states = loaded.initial_state(tf.constant(4))
    >>> y_t, states = loaded.step(tf.constant(x[:, 0]), states)    # one step, (B, n_out)
    >>> bool(np.allclose(y_t, model(x)[:, 0], atol=1e-6))
    True
    """
    directory, target = _check_directory(directory, overwrite)
    if not isinstance(streaming, bool):
        raise TypeError(f"`streaming` must be True or False, received {streaming!r}.")
    if streaming:
        module = StreamingModel(model, jit_compile=jit_compile)
        functions = ["serve", "initial_state", "step"]
    else:
        module = ServingModel(model)
        functions = ["serve"]
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _clean_stale(target)
    directory, target = _check_directory(directory, overwrite)   # a restored old export
    staging = os.path.join(parent, _leftover_name("export", target))
    os.mkdir(staging, 0o777)   # the umask decides, as for any new directory
    try:
        _crash_point("staging")
        _write_export(module, functions, staging, target)
        _crash_point("saved")
        _swap_in(staging, target)
    finally:
        if os.path.lexists(staging):
            _remove_tree(staging)
    return directory


def _write_export(module, functions, staging, target):
    """Write the SavedModel of ``module`` and the kspike marker file into ``staging``.

    ``functions`` are the names recorded in the marker; when ``target`` already holds an
    export, ``staging`` takes its permissions.
    """
    # serve and step hold no tf.custom_gradient of their own (kspike's surrogates are
    # stop-gradient expressions, SpikingRNN is served by the generic loop); custom
    # gradients traced elsewhere by the model (e.g. SpikingRNN's fused loop when the model
    # was built) capture tensors of other graphs and cannot be serialised.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, staging,
                        signatures={"serving_default": module.serve.get_concrete_function()},
                        options=options)
    from kspike import __version__
    with open(os.path.join(staging, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": "kspike.export.saved_model", "kspike_version": __version__,
                   "functions": functions,
                   "fixed_steps": getattr(module, "fixed_steps", None)}, f)
    if os.path.isdir(target):
        # After writing, so that a read-only mode of the old export cannot block it.
        os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))


from kspike.litert import litert, load_litert, LiteRTRunner  # noqa: E402  docs/litert.md
__all__ += ["litert", "load_litert", "LiteRTRunner"]
