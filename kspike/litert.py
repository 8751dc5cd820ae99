"""LiteRT (TensorFlow Lite) export of the streaming step, for edge devices.

``kspike.export.litert(model, path)`` converts the one-step function of
``kspike.export.StreamingModel`` (the same ``step`` that ``kspike.export.saved_model`` stores)
into a ``.tflite`` flat buffer for a FIXED batch size::

    (x_t (batch_size, n_in), states) -> (y_t (batch_size, n_out), new states)

``kspike.export.load_litert(path)`` runs it with the LiteRT interpreter of ``ai-edge-litert``
(``pip install kspike[edge]``)::

    runner = kspike.export.load_litert(path)
    states = runner.initial_state()            # list of numpy arrays, (batch_size, size)
    y_t, states = runner.step(x_t, states)     # one time step
    y = runner.run(x)                          # a whole (batch_size, T, n_in) sequence

Stepping the runner T times from ``initial_state()`` reproduces the SavedModel ``step``/``serve``
and the Keras model (spikes identical, other outputs to float32 round-off; see docs/litert.md
for the measured tolerances of the quantised variants).
"""
import os
import tempfile

import numpy as np
import tensorflow as tf

from kspike import compat

__all__ = ["litert", "load_litert", "LiteRTRunner"]

_QUANTIZE = (None, "float16", "int8")


def _export_module():
    # kspike.export imports this module at its end; importing it lazily avoids the cycle.
    from kspike import export
    return export


def _check_path(path, overwrite):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path (str or os.PathLike), received {path!r} "
                        f"of type {type(path).__name__}.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be True or False, received {overwrite!r}.")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise FileExistsError(f"Cannot write the LiteRT model to {path!r}: it is a directory; "
                              "give a file path such as 'model.tflite'.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"Cannot write the LiteRT model to {path!r}: the file exists. "
                              "Choose a new path or pass overwrite=True to replace it.")
    return path


def _fixed_step(model, module, batch_size):
    """The module's ``step`` as a concrete function of fixed shapes with flat arguments.

    The converter needs static shapes and a flat signature: x_t, state_0, state_1, ... ->
    output_0 (= y_t), output_1 (= new state_0), ...
    """
    export = _export_module()
    dtypes = [s.dtype for s in module.state_specs]
    input_dtype = tf.as_dtype(model.inputs[0].dtype)
    if any(d != tf.float32 for d in dtypes) or input_dtype != tf.float32:
        raise export.ExportError(
            "Cannot convert to LiteRT: the model's input and states must be float32, "
            f"received input {input_dtype.name} and states "
            f"{[d.name for d in dtypes]}; build the model in float32.")
    signature = [tf.TensorSpec((batch_size,) + module.step_shape, tf.float32, name="x_t")]
    signature += [tf.TensorSpec((batch_size,) + tuple(spec.shape[1:]), tf.float32,
                                name=f"state_{i}")
                  for i, spec in enumerate(module.state_specs)]

    @tf.function(input_signature=signature, autograph=False)
    def step(x_t, *states):
        y_t, new_states = module.step(x_t, list(states))
        return [y_t] + list(new_states)

    return step.get_concrete_function()


def litert(model, path, batch_size=1, overwrite=False, quantize=None):
    """Write the one-step function of ``model`` as a LiteRT (``.tflite``) file.

    Args:
        model: a built ``keras.Model`` taking (B, T, *features) float32 sequences, made of
            the layers ``kspike.export.saved_model`` supports (kspike cells in RNN layers,
            ``kspike.LeakyReadout``, ``kspike.IFNeurons`` / ``LIFNeurons`` with
            ``v_reset=0``, ``GlobalAveragePooling1D``, per-time-step layers such as
            ``TimeDistributed`` / ``kspike.FoldTime`` of Conv2D, pooling and Flatten).
        path: the ``.tflite`` file to write (parent directories are created).
        batch_size: the fixed batch size B of the step (int >= 1).
        overwrite: replace an existing file. Without it an existing file is refused and left
            untouched; the new file is written next to it and moved into place atomically.
        quantize: None (float32), ``"float16"`` (weights stored as float16, computed in
            float32) or ``"int8"`` (dynamic-range: weights of large tensors stored as int8;
            smaller and faster but it moves spikes of cells with small thresholds, see
            docs/litert.md for the measured errors).

    Returns:
        The absolute path of the written file (str).

    Raises:
        kspike.export.ExportError (a ValueError): a layer without a streaming form, or a
            non-float32 model.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or is a directory.

    Example:

    >>> import os, tempfile, keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((20, 5)),
    ...     keras.layers.RNN(kspike.ALIF(8, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> path = kspike.export.litert(model, os.path.join(tempfile.mkdtemp(), "lsnn.tflite"))
    >>> runner = kspike.export.load_litert(path)
    >>> x = (np.random.default_rng(0).random((1, 20, 5)) < 0.3).astype("float32")
    >>> bool(np.allclose(runner.run(x), model(x), atol=1e-5))
    True
    """
    if isinstance(batch_size, np.integer):
        batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, received {batch_size!r}.")
    if quantize not in _QUANTIZE:
        raise ValueError(f"`quantize` must be one of {_QUANTIZE}, received {quantize!r}.")
    path = _check_path(path, overwrite)
    export = _export_module()
    module = export.StreamingModel(model)
    # The Python function, not the tf.function: no graph is traced for this check.
    for i, state in enumerate(module.initial_state.python_function(batch_size)):
        # The runner starts from zeros; a cell with another initial state would be wrong.
        if np.any(state.numpy() != 0):
            raise export.ExportError(
                f"Cannot convert to LiteRT: initial state {i} of the model is not zero "
                "(e.g. a kspike.IFNeurons / LIFNeurons layer with v_reset != 0 starts at "
                "V_0 = v_reset), and LiteRT runners start from zeros; use v_reset=0 or the "
                "SavedModel export.")
    # The weights are frozen into constants: left as resource variables, the interpreter
    # would read them uninitialised (garbage) unless an initialisation subgraph ran first.
    frozen = compat.freeze_concrete_function(_fixed_step(model, module, batch_size))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], module)
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
    flat_buffer = converter.convert()
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".kspike-litert-", suffix=".tflite", dir=parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(flat_buffer)
        # Re-checked here: the conversion takes seconds and another writer may have won.
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"Cannot write the LiteRT model to {path!r}: the file "
                                  "appeared during the conversion; pass overwrite=True.")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ImportError("kspike.export.load_litert needs the LiteRT runtime: "
                          "pip install 'kspike[edge]' (the ai-edge-litert package).") from error
    return Interpreter


class LiteRTRunner:
    """A ``.tflite`` step written by ``kspike.export.litert``, on the LiteRT interpreter.

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (default 1: a one-sample step is too small to gain
            from more).

    Attributes:
        batch_size: the fixed batch size B. step_shape: the shape of one input step,
        e.g. (n_in,) or (H, W, C); n_inputs its last entry.
        state_shapes: shape (B, *size) of each state. output_shape: shape of y_t without the
        batch; n_outputs its last entry.
    """

    def __init__(self, path, num_threads=1):
        interpreter_class = _interpreter_class()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"`path` must be a .tflite file, received {path!r} (not a file).")
        self.interpreter = interpreter_class(model_path=path, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        signatures = self.interpreter.get_signature_list()
        if len(signatures) != 1:
            raise ValueError(f"{path!r} was not written by kspike.export.litert (signatures "
                             f"{sorted(signatures)}).")
        runner = self.interpreter.get_signature_runner(next(iter(signatures)))
        inputs = runner.get_input_details()
        outputs = runner.get_output_details()
        n_states = len(inputs) - 1
        names = ["x_t"] + [f"state_{i}" for i in range(n_states)]
        if sorted(inputs) != sorted(names) or len(outputs) != n_states + 1:
            raise ValueError(f"{path!r} was not written by kspike.export.litert (inputs "
                             f"{sorted(inputs)}).")
        # Tensor indices, so a step is set_tensor/invoke/get_tensor without name look-ups.
        self._inputs = [inputs[name]["index"] for name in names]
        self._outputs = [outputs[f"output_{i}"]["index"] for i in range(n_states + 1)]
        shapes = [tuple(int(d) for d in inputs[name]["shape"]) for name in names]
        self.batch_size, self.step_shape = shapes[0][0], shapes[0][1:]
        self.n_inputs = self.step_shape[-1]
        self.state_shapes = shapes[1:]
        self.output_shape = tuple(int(d) for d in outputs["output_0"]["shape"][1:])
        self.n_outputs = self.output_shape[-1]
        # A live signature runner pins the interpreter's buffers and blocks invoke().
        del runner

    def initial_state(self):
        """Zero states: a list of float32 arrays of shapes ``state_shapes``."""
        return [np.zeros(shape, np.float32) for shape in self.state_shapes]

    def _check(self, name, value, shape):
        if not isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(f"`{name}` must be a numpy array, received "
                            f"{type(value).__name__}.")
        if value.dtype != np.float32:
            raise TypeError(f"`{name}` must have dtype float32, received {value.dtype}.")
        if value.shape != shape:
            raise ValueError(f"`{name}` must have shape {shape}, received {value.shape} (the "
                             "batch size is fixed when the model is written).")

    def step(self, x_t, states):
        """One time step.

        Args:
            x_t: float32 (batch_size, n_in) input of this step.
            states: the list from ``initial_state`` or the previous ``step``.

        Returns:
            (y_t, new_states): y_t float32 (batch_size, n_out); new_states a list of arrays.
        """
        self._check("x_t", x_t, (self.batch_size,) + self.step_shape)
        if not isinstance(states, (list, tuple)) or len(states) != len(self.state_shapes):
            count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"`states` must be a list of {len(self.state_shapes)} arrays (as "
                             f"returned by initial_state), received {count}.")
        for i, (state, shape) in enumerate(zip(states, self.state_shapes)):
            self._check(f"states[{i}]", state, shape)
        interpreter = self.interpreter
        interpreter.set_tensor(self._inputs[0], x_t)
        for index, state in zip(self._inputs[1:], states):
            interpreter.set_tensor(index, state)
        interpreter.invoke()
        # get_tensor copies, so the returned arrays survive the next invoke.
        values = [interpreter.get_tensor(index) for index in self._outputs]
        return values[0], values[1:]

    def run(self, x):
        """A whole sequence: float32 (batch_size, T, *step_shape) -> (batch_size, T,
        *output_shape), the output of every step (for a model ending in
        ``GlobalAveragePooling1D``, the running mean; its last step is the model's output)."""
        if not isinstance(x, np.ndarray) or x.ndim != 2 + len(self.step_shape) \
                or x.shape[0] != self.batch_size or tuple(x.shape[2:]) != self.step_shape:
            shape = x.shape if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"`x` must be a numpy array of shape ({self.batch_size}, T, "
                             f"{', '.join(map(str, self.step_shape))}), received {shape}.")
        if x.dtype != np.float32:
            raise TypeError(f"`x` must have dtype float32, received {x.dtype}.")
        states = self.initial_state()
        outputs = []
        for t in range(x.shape[1]):
            y_t, states = self.step(np.ascontiguousarray(x[:, t]), states)
            outputs.append(y_t)
        if not outputs:
            return np.zeros((self.batch_size, 0) + self.output_shape, np.float32)
        return np.stack(outputs, axis=1)


def load_litert(path, num_threads=1):
    """Load a ``.tflite`` file written by ``kspike.export.litert`` as a ``LiteRTRunner``
    (``initial_state()``, ``step(x_t, states)``, ``run(x)``). Needs ``kspike[edge]``."""
    return LiteRTRunner(path, num_threads=num_threads)
