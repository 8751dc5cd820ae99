"""NIR (Neuromorphic Intermediate Representation) export and import: docs/nir.md.

``to_nir(model, dt=1.0)`` writes a ``nir.NIRGraph``; ``from_nir(graph, dt=1.0)`` builds a Keras
model of kspike layers. Needs the ``nir`` package (``pip install 'kspike[nir]'``).

Discretisation: NIR is continuous-time and every library discretises it its own way. kspike
reads and writes NIR as snnTorch does (forward Euler over a step ``dt``): a LI/LIF node
``tau dv/dt = (v_leak - v) + r I`` becomes

    v_t = beta v_{t-1} + (dt r / tau) I_t + (1 - beta) v_leak,     beta = 1 - dt / tau.

snnTorch's ``Leaky(beta)`` has input gain 1 and is written tau = dt / (1 - beta), r = tau / dt.
kspike's neurons have input gain (1 - alpha) (alpha = exp(-dt_cell / tau_cell)), so they are
written with tau = dt / (1 - alpha) and r = 1, and their weights are written unchanged.

Mapping (kspike -> NIR):

- ``Dense`` (linear activation) -> ``Affine`` (``Linear`` without bias); Dropout, noise and
  Identity layers (identity at inference) are skipped;
- an RNN layer of ``kspike.LIF`` cells -> ``Affine``/``Linear`` (input weights, cell bias)
  -> ``LIF`` with a recurrent ``Linear`` from the ``LIF`` back to itself. kspike's LIF resets
  by SUBTRACTING the threshold, which NIR's LIF (reset to ``v_reset``) cannot express: the
  ``LIF`` node carries the cell's full Keras config in ``metadata["kspike"]`` and
  ``from_nir`` rebuilds that exact cell from it. Other NIR readers see a LIF with the same
  leak, gain and threshold but NIR's reset to ``v_reset = 0``: their spike trains differ from
  kspike's after the first spike of a neuron.
- ``kspike.LeakyReadout`` -> ``Linear`` (kernel) -> ``LI`` -> ``Affine`` (identity weights,
  the readout bias; the bias is added after the filter as in kspike);
- ``kspike.IFNeurons`` / ``kspike.LIFNeurons`` -> ``IF`` / ``LIF``: exact for the hard reset
  (NIR's own reset to v_reset, in the step of the spike); the soft reset is written with
  v_reset 0 and read back exactly by kspike only, from ``metadata["kspike"]``;
- ``TimeDistributed`` / ``kspike.FoldTime`` of ``Conv2D``, ``AveragePooling2D``, ``Flatten``,
  ``Rescaling``, ``Dense`` -> ``Conv2d``, ``AvgPool2d``, ``Flatten``, ``Scale``, ``Affine``;
  image shapes channels-first (C, H, W) as in NIR and PyTorch;
- refused with an error naming the layer: ALIF cells (NIR has no adaptive threshold), cells
  with ``n_refractory > 0`` (no refractory period in NIR), ``n_delay > 1``, ``output="all"``,
  the mean over time, any other layer.

NIR -> kspike: the kspike graphs above exactly (weights are copied, sparse DEEP R cells come
back as dense cells with the same effective weights), and graphs of other writers made of
``Affine``/``Linear``/``Scale``, ``IF``/``LIF`` (with optional recurrent ``Linear``), ``LI``,
``Conv2d``, ``AvgPool2d``/``SumPool2d`` and ``Flatten`` nodes in a chain. An ``IF``/``LIF`` node
without kspike metadata has NIR's hard reset and becomes ``kspike.IFNeurons`` /
``kspike.LIFNeurons``; a 1-D ``LIF`` node is imported as a ``kspike.LIF`` cell (reset by
subtraction) instead when the writer meant subtraction (``lif_reset="subtract"``, e.g.
snnTorch's default ``Leaky``).
"""
import json

import keras
import numpy as np

__all__ = ["to_nir", "from_nir", "NIRExportError"]

_METADATA_KEY = "kspike"
_SKIPPED = (keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
            keras.layers.AlphaDropout, keras.layers.Identity)


class NIRExportError(ValueError):
    """A layer or node has no NIR / kspike counterpart (the message names it and says why)."""


def _nir():
    try:
        import nir
    except ImportError as error:
        raise ImportError("kspike.nir needs the NIR package: pip install 'kspike[nir]' "
                          "(the nir package).") from error
    return nir


def _check_dt(dt):
    if isinstance(dt, bool) or not isinstance(dt, (int, float, np.floating)) or not dt > 0:
        raise ValueError(f"`dt` must be a number > 0 (the time step of the NIR graph), "
                         f"received {dt!r}.")
    return float(dt)


def _describe(layer):
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _metadata(kind, obj, **extra):
    record = {"kind": kind, "config": keras.saving.serialize_keras_object(obj), **extra}
    # A JSON string: nir.write stores metadata values as HDF5 datasets.
    return {_METADATA_KEY: json.dumps(record)}


def _read_metadata(node):
    value = (getattr(node, "metadata", None) or {}).get(_METADATA_KEY)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return json.loads(str(value))


def _affine(nir, weight_in_out, bias):
    """NIR Affine/Linear (weight (out, in)) from a kspike kernel (in, out)."""
    weight = np.asarray(weight_in_out, np.float32).T.copy()
    if bias is None:
        return nir.Linear(weight=weight)
    return nir.Affine(weight=weight, bias=np.asarray(bias, np.float32).copy())


# ----------------------------------------------------------------------------- kspike -> NIR
def _nir_shape(features):
    """A kspike per-step feature shape (H, W, C) as NIR's channels-first (C, H, W)."""
    features = tuple(int(d) for d in features)
    if len(features) == 3:
        return (features[2], features[0], features[1])
    return features


def _to_nir_layout(array):
    """(H, W, C) per-neuron values as (C, H, W); other shapes unchanged."""
    array = np.asarray(array)
    return np.transpose(array, (2, 0, 1)) if array.ndim == 3 else array


def _neuron_layer_to_nir(nir, layer, name, dt, features):
    """kspike.IFNeurons / kspike.LIFNeurons -> NIR IF / LIF (forward Euler over dt):

    IF:  H = V + X                        <- IF(r = 1/dt, v_threshold, v_reset)
    LIF: H = V + (X - (V - c)) / tau      <- LIF(tau = tau dt, r = 1, v_leak = c, v_reset = c)
         H = V - (V - c) / tau + X        <- LIF(tau = tau dt, r = tau, ...)  (decay_input=False)

    exactly for the hard reset (``v_reset=c``); the soft reset (``v_reset=None``) is written
    with v_reset 0 and read back exactly by kspike from the metadata record only.
    """
    for flag in ("stateful", "return_state"):
        if getattr(layer, flag):
            raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: {flag}=True has "
                                 "no NIR form.")
    if layer.output_mode != "spikes" or not layer.return_sequences:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: NIR neurons emit a "
                             "spike sequence (output='spikes', return_sequences=True).")
    shape = _nir_shape(features)
    full = lambda value: np.full(shape, value, np.float32)  # noqa: E731
    reset = 0.0 if layer.v_reset is None else layer.v_reset
    record = _metadata(type(layer).__name__, layer,
                       reset="hard" if layer.v_reset is not None else
                       "soft (subtraction of the threshold)")
    if layer.tau is None:
        node = nir.IF(r=full(1.0 / dt), v_threshold=full(layer.thr), v_reset=full(reset),
                      metadata=record)
    else:
        node = nir.LIF(tau=full(layer.tau * dt), r=full(1.0 if layer.decay_input else layer.tau),
                       v_leak=full(reset), v_threshold=full(layer.thr), v_reset=full(reset),
                       metadata=record)
    return {name: node}, [], name, name


def _wrapped(layer):
    """The per-step layer inside a TimeDistributed / kspike.FoldTime, and the wrapper's name."""
    from kspike.layers import FoldTime
    if isinstance(layer, (keras.layers.TimeDistributed, FoldTime)):
        return layer.layer, type(layer).__name__
    return layer, None


def _pair(value):
    value = np.asarray(value).ravel()
    if value.size == 1:
        value = np.repeat(value, 2)
    return value.astype(np.int64)


def _conv_to_nir(nir, layer, inner, name, features):
    kh, kw = inner.kernel_size
    if inner.data_format != "channels_last":
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: data_format="
                             f"{inner.data_format!r}; kspike writes channels_last models.")
    if inner.activation not in (None, keras.activations.linear):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: activation "
                             f"{inner.activation.__name__!r}; NIR's Conv2d is linear.")
    stride, dilation = _pair(inner.strides), _pair(inner.dilation_rate)
    if inner.padding == "valid":
        padding = np.array([0, 0])
    elif kh % 2 == 1 and kw % 2 == 1 and np.all(stride == 1):
        # Keras 'same' with odd kernels and stride 1 pads symmetrically, as PyTorch does.
        padding = np.array([dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2])
    else:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: padding='same' with "
                             f"kernel {inner.kernel_size} and strides {inner.strides} pads "
                             "asymmetrically, which NIR's (PyTorch's) Conv2d cannot express; "
                             "use odd kernels with stride 1, or padding='valid'.")
    kernel = np.asarray(inner.kernel, np.float32)                # (kh, kw, C_in/g, C_out)
    bias = (np.zeros(kernel.shape[-1], np.float32) if inner.bias is None
            else np.asarray(inner.bias, np.float32))
    node = nir.Conv2d(input_shape=(int(features[0]), int(features[1])),
                      weight=np.transpose(kernel, (3, 2, 0, 1)).copy(), stride=stride,
                      padding=padding, dilation=dilation, groups=int(inner.groups), bias=bias,
                      metadata=_metadata("Conv2D", inner, wrapper=_wrapped(layer)[1]))
    return {name: node}, [], name, name


def _pool_to_nir(nir, layer, inner, name):
    if inner.padding != "valid" or inner.data_format != "channels_last":
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: only "
                             "padding='valid', channels_last pooling has a NIR form.")
    node = nir.AvgPool2d(kernel_size=_pair(inner.pool_size), stride=_pair(inner.strides),
                         padding=np.array([0, 0]),
                         metadata=_metadata("AveragePooling2D", inner,
                                            wrapper=_wrapped(layer)[1]))
    return {name: node}, [], name, name


def _flatten_to_nir(nir, layer, name, features):
    node = nir.Flatten(input_type={"input": np.array(_nir_shape(features))}, start_dim=0,
                       end_dim=-1, metadata=_metadata("Flatten", _wrapped(layer)[0],
                                                      wrapper=_wrapped(layer)[1]))
    return {name: node}, [], name, name


def _hwc_rows_to_chw(kernel, features):
    """Rows of a Dense kernel after a Keras Flatten of (H, W, C) reordered for NIR's
    Flatten of (C, H, W)."""
    h, w, c = (int(d) for d in features)
    return kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)


def _chw_rows_to_hwc(kernel, chw):
    c, h, w = (int(d) for d in chw)
    return kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(c * h * w, -1)


def _lif_to_nir(nir, layer, name, dt):
    from kspike.cells import ALIF, LIF
    cell = layer.cell
    if isinstance(cell, ALIF):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: its ALIF cell has an "
                             "adaptive threshold, and NIR has no adaptive-threshold neuron.")
    if not isinstance(cell, LIF):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: only kspike.LIF "
                             f"cells have a NIR form, received {type(cell).__name__}.")
    if cell.n_refractory > 0:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: n_refractory="
                             f"{cell.n_refractory}, and NIR's LIF has no refractory period.")
    if getattr(cell, "n_delay", 1) != 1:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: n_delay="
                             f"{cell.n_delay} synaptic delays per synapse have no NIR form.")
    if cell.output_mode != "spikes":
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: output="
                             f"{cell.output_mode!r}; NIR's LIF emits spikes only.")
    w_in, w_rec, bias = (None if w is None else np.asarray(w)
                         for w in cell.effective_kernels("float32"))
    n = cell.units
    rnn = "SpikingRNN" if getattr(layer, "specialised", False) else "RNN"
    lif = nir.LIF(tau=np.full(n, dt / (1.0 - cell.alpha), np.float32),
                  r=np.ones(n, np.float32), v_leak=np.zeros(n, np.float32),
                  v_threshold=np.full(n, cell.thr, np.float32),
                  v_reset=np.zeros(n, np.float32),
                  metadata=_metadata("LIF", cell, rnn=rnn, layer=layer.name,
                                     return_sequences=bool(layer.return_sequences),
                                     reset="subtraction of the threshold"))
    nodes = {f"{name}.input": _affine(nir, w_in, bias), f"{name}.lif": lif}
    edges = [(f"{name}.input", f"{name}.lif")]
    if w_rec is not None:
        nodes[f"{name}.recurrent"] = _affine(nir, w_rec, None)
        edges += [(f"{name}.lif", f"{name}.recurrent"), (f"{name}.recurrent", f"{name}.lif")]
    return nodes, edges, f"{name}.input", f"{name}.lif"


def _readout_to_nir(nir, layer, name, dt):
    n = layer.units
    li = nir.LI(tau=np.full(n, dt / (1.0 - layer.kappa), np.float32), r=np.ones(n, np.float32),
                v_leak=np.zeros(n, np.float32),
                metadata=_metadata("LeakyReadout", layer, layer=layer.name))
    nodes = {f"{name}.kernel": _affine(nir, np.asarray(layer.kernel), None), f"{name}.li": li}
    edges = [(f"{name}.kernel", f"{name}.li")]
    last = f"{name}.li"
    if layer.bias is not None:
        # The readout adds its bias after the filter; an Affine with identity weights does it.
        nodes[f"{name}.bias"] = _affine(nir, np.eye(n, dtype=np.float32), np.asarray(layer.bias))
        edges.append((f"{name}.li", f"{name}.bias"))
        last = f"{name}.bias"
    return nodes, edges, f"{name}.kernel", last


def _check_exportable(model):
    """The (batch, time, *features) input shape of a model ``to_nir`` can export."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, received {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise NIRExportError(f"Cannot export model {model.name!r} to NIR: it has no known "
                             "input shape; start it with keras.Input((T, *features)).")
    shape = tuple(model.inputs[0].shape)
    if len(shape) < 3 or any(d is None for d in shape[2:]):
        raise NIRExportError(f"Cannot export model {model.name!r} to NIR: its input must be "
                             f"sequences (batch, time, *features) with known features, "
                             f"received {shape}.")
    return shape


def _output_shape(layer):
    output = layer.output
    return tuple((output[0] if isinstance(output, (list, tuple)) else output).shape)


def _rnn_to_nir(nir, stage, layer, name, dt):
    from kspike import graph as kgraph
    kgraph.check_stateless(stage, "kspike.nir.to_nir", NIRExportError)
    if getattr(layer.cell, "n_delay", 1) > 1:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: synaptic "
                             f"delays (n_delay={layer.cell.n_delay}) have no NIR form; "
                             "expected n_delay=1.")
    if not layer.return_sequences:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: "
                             "return_sequences=False has no NIR form (NIR graphs "
                             "map a sequence to a sequence).")
    return _lif_to_nir(nir, layer, name, dt)


def _rescaling_to_nir(nir, layer, inner, name, features):
    if np.any(np.asarray(inner.offset) != 0):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: offset="
                             f"{inner.offset}; NIR's Scale multiplies only.")
    scale = np.full(_nir_shape(features), inner.scale, np.float32)
    return ({name: nir.Scale(scale=scale, metadata=_metadata(
        "Rescaling", inner, wrapper=_wrapped(layer)[1]))}, [], name, name)


def _dense_to_nir(nir, layer, inner, name, features, flattened):
    if inner.activation not in (None, keras.activations.linear):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: activation "
                             f"{inner.activation.__name__!r}; NIR's Affine is linear.")
    if len(features) != 1:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: a Dense on "
                             f"features of shape {tuple(features)}; flatten them "
                             "first (TimeDistributed(Flatten())).")
    kernel = np.asarray(inner.kernel)
    if flattened is not None:
        kernel = _hwc_rows_to_chw(kernel, flattened)
    bias = None if inner.bias is None else np.asarray(inner.bias)
    return ({name: _affine(nir, kernel, bias)}, [], name, name)


def _per_step_to_nir(nir, layer, inner, name, features, flattened):
    """A per-step layer (in TimeDistributed / FoldTime, or a Dense) as NIR parts, or None."""
    if isinstance(inner, keras.layers.Conv2D) and type(inner) is keras.layers.Conv2D:
        return _conv_to_nir(nir, layer, inner, name, features)
    if type(inner) is keras.layers.AveragePooling2D:
        return _pool_to_nir(nir, layer, inner, name)
    if type(inner) is keras.layers.Flatten and inner is not layer:
        return _flatten_to_nir(nir, layer, name, features)
    if type(inner) is keras.layers.Rescaling and inner is not layer:
        return _rescaling_to_nir(nir, layer, inner, name, features)
    if type(inner) is keras.layers.Dense:
        return _dense_to_nir(nir, layer, inner, name, features, flattened)
    return None


def _stage_to_nir(nir, stage, dt, features, flattened):
    """One parsed stage as NIR parts (nodes, internal edges, first node, last node)."""
    from kspike import graph as kgraph
    from kspike.layers import LeakyReadout
    layer = stage.layer
    inner, _ = _wrapped(layer)
    name = layer.name
    parts = None
    if isinstance(stage, kgraph.SpikingLayer) or hasattr(layer, "cell"):
        parts = _rnn_to_nir(nir, stage, layer, name, dt)
    elif isinstance(layer, LeakyReadout):
        parts = _readout_to_nir(nir, layer, name, dt)
    elif kgraph.is_neuron_layer(layer):
        parts = _neuron_layer_to_nir(nir, layer, name, dt, features)
    elif isinstance(stage, kgraph.TimeAverage):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: NIR graphs map a "
                             "sequence to a sequence and have no mean over time; export "
                             "the model without it and average the outputs over time.")
    elif isinstance(stage, kgraph.PerStepLayer):
        parts = _per_step_to_nir(nir, layer, inner, name, features, flattened)
    if parts is None:
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: kspike.nir knows "
                             "no NIR form for it. Supported: RNN layers of kspike.LIF, "
                             "kspike.LeakyReadout, kspike.IFNeurons / LIFNeurons, linear "
                             "Dense, and in TimeDistributed / kspike.FoldTime: Conv2D, "
                             "AveragePooling2D, Flatten, Dense.")
    return parts


def _flattens_image(stage, features):
    """Whether ``stage`` is a per-step Flatten of (H, W, C) images (written as NIR's Flatten
    of (C, H, W), the next Dense's rows reordered)."""
    from kspike import graph as kgraph
    layer = stage.layer
    inner, _ = _wrapped(layer)
    return (isinstance(stage, kgraph.PerStepLayer) and type(inner) is keras.layers.Flatten
            and inner is not layer and len(features) == 3)


def _check_after_flatten(nir, layer, parts, flattened):
    if flattened is not None and not isinstance(parts[0][parts[2]], (nir.Affine,
                                                                      nir.Linear)):
        raise NIRExportError(f"Cannot export {_describe(layer)} to NIR after a Flatten of "
                             f"{tuple(flattened)} features: kspike writes a Flatten "
                             "followed by a Dense (whose rows it reorders from Keras' "
                             "(H, W, C) order to NIR's (C, H, W)).")


def _stages_to_nir(nir, stages, shape, dt, nodes, edges):
    """Add the nodes and edges of ``stages`` after ``input``; returns the last node's name
    and the model's output shape."""
    previous = "input"
    flattened = None        # the (H, W, C) a Flatten just flattened, for the next Dense
    for stage in stages:
        features = shape[2:]
        shape = _output_shape(stage.layer)
        if isinstance(_wrapped(stage.layer)[0], _SKIPPED):
            continue
        parts = _stage_to_nir(nir, stage, dt, features, flattened)
        if _flattens_image(stage, features):
            flattened = features
            nodes.update(parts[0])
            edges.append((previous, stage.layer.name))
            previous = stage.layer.name
            continue
        _check_after_flatten(nir, stage.layer, parts, flattened)
        flattened = None
        layer_nodes, layer_edges, first, last = parts
        nodes.update(layer_nodes)
        edges += [(previous, first)] + layer_edges
        previous = last
    if flattened is not None:
        raise NIRExportError("Cannot export to NIR: the model ends with a Flatten of "
                             f"{tuple(flattened)} features; kspike writes a Flatten followed "
                             "by a Dense.")
    return previous, shape


def to_nir(model, dt=1.0):
    """A kspike model as a ``nir.NIRGraph`` (mapping and discretisation: docs/nir.md).

    Args:
        model: a built chain-shaped ``keras.Model`` on (B, T, n_in) or (B, T, H, W, C)
            sequences made of RNN layers of ``kspike.LIF`` cells, ``kspike.LeakyReadout``,
            ``kspike.IFNeurons`` / ``LIFNeurons``, linear ``Dense`` layers, and in
            ``TimeDistributed`` / ``kspike.FoldTime``: ``Conv2D``, ``AveragePooling2D``,
            ``Flatten``, ``Dense`` (Dropout/noise/Identity layers are skipped).
        dt: the time step written into the graph (NIR time constants are in units of it).

    Returns:
        ``nir.NIRGraph`` with nodes ``input``, ``<layer>.<part>`` ... and ``output``; image
        shapes are written channels-first (C, H, W) as NIR and PyTorch do.

    Raises:
        NIRExportError (a ValueError): a layer NIR cannot represent (ALIF: no adaptive
            threshold; refractoriness; delays; the mean over time), naming the layer and
            the reason.

    Example:

    >>> import keras, numpy as np, kspike
    >>> model = keras.Sequential([keras.Input((None, 4)),
    ...     keras.layers.RNN(kspike.LIF(6, seed=0), return_sequences=True),
    ...     kspike.LeakyReadout(2, seed=1)])
    >>> graph = kspike.nir.to_nir(model)
    >>> sorted(graph.nodes)[:3]
    ['input', 'leaky_readout.bias', 'leaky_readout.kernel']
    >>> x = (np.random.default_rng(0).random((1, 20, 4)) < 0.3).astype("float32")
    >>> bool(np.array_equal(kspike.nir.from_nir(graph)(x), model(x)))
    True
    """
    nir = _nir()
    dt = _check_dt(dt)
    shape = _check_exportable(model)
    from kspike import graph as kgraph
    stages = kgraph.parse(model, "Cannot export to NIR", error=NIRExportError,
                          flatten_nested=True)
    nodes = {"input": nir.Input(input_type={"input": np.array(_nir_shape(shape[2:]))})}
    edges = []
    previous, shape = _stages_to_nir(nir, stages, shape, dt, nodes, edges)
    nodes["output"] = nir.Output(output_type={"output": np.array(_nir_shape(shape[2:]))})
    edges.append((previous, "output"))
    return nir.NIRGraph(nodes=nodes, edges=edges,
                        metadata={"writer": "kspike", "dt": dt})


# ----------------------------------------------------------------------------- NIR -> kspike
def _uniform(node_name, field, values):
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or not np.all(values == values[0]):
        raise NIRExportError(f"Cannot import NIR node {node_name!r}: its {field} differs "
                             "between neurons, and a kspike layer has one value for all.")
    return float(values[0])


def _euler(node_name, node, dt):
    """(beta, input gain, leak term) of a LI/LIF node, forward Euler over dt."""
    tau = _uniform(node_name, "tau", node.tau)
    r = np.asarray(node.r, np.float64).ravel()
    if not tau > dt:
        raise NIRExportError(f"Cannot import NIR node {node_name!r}: tau={tau} must exceed "
                             f"dt={dt} for a decay 1 - dt/tau in (0, 1).")
    beta = 1.0 - dt / tau
    gain = _uniform(node_name, "r", r) * dt / tau
    leak = (1.0 - beta) * np.asarray(node.v_leak, np.float64).ravel()
    return beta, gain, leak


def _tau_for(beta, dt):
    # kspike's decay is exp(-dt / tau): the tau (ms, with dt in ms) giving the same beta.
    return float(-dt / np.log(beta))


def _weights(node, size_in):
    """(kernel (in, out), bias or None) of an Affine/Linear node; identity for None."""
    if node is None:
        return np.eye(size_in, dtype=np.float64), None
    kernel = np.asarray(node.weight, np.float64).T
    bias = getattr(node, "bias", None)
    return kernel, None if bias is None else np.asarray(bias, np.float64)


def _set(layer, shape, weights):
    if not layer.built:  # a layer deserialised from kspike metadata comes back built
        layer.build(shape)
    layer.set_weights([np.asarray(w, np.float32) for w in weights])


def _wrap(inner, wrapper=None):
    # Always FoldTime (the same values as TimeDistributed for these stateless layers):
    # Keras' TimeDistributed needs a static T, and imported models take any T.
    from kspike.layers import FoldTime
    return FoldTime(inner, name=inner.name)


def _layer_name(name):
    return name.replace(".", "_")


def _neuron_from_nir(name, node, dt, scale_input):
    """A NIR IF / LIF node without kspike metadata as kspike.IFNeurons / LIFNeurons (hard
    reset to v_reset, NIR's own reset), reading tau and r as snnTorch writes them.

    ``scale_input(gain, offset)`` folds X = gain I + offset into the layer before (it raises
    when there is none); returns the layer.
    """
    from kspike.layers import IFNeurons, LIFNeurons
    thr = _uniform(name, "v_threshold", node.v_threshold)
    reset = _uniform(name, "v_reset", node.v_reset)
    if not thr > 0:
        raise NIRExportError(f"Cannot import NIR node {name!r}: v_threshold={thr} must be > 0.")
    r = _uniform(name, "r", node.r)
    if isinstance(node, _nir().IF):
        gain = r * dt                               # H = V + dt r I
        if gain != 1.0:
            scale_input(gain, 0.0)
        return IFNeurons(thr=thr, v_reset=reset, name=_layer_name(name))
    tau = _uniform(name, "tau", node.tau) / dt      # in steps
    leak = _uniform(name, "v_leak", node.v_leak)
    if not tau >= 1.0:
        raise NIRExportError(f"Cannot import NIR node {name!r}: tau={tau * dt} is below "
                             f"dt={dt}; forward Euler needs tau >= dt.")
    if r == 1.0 and leak == reset:
        # H = V + (I - (V - c)) / tau: SpikingJelly's decay_input form, exactly.
        return LIFNeurons(tau=tau, thr=thr, v_reset=reset, decay_input=True,
                          name=_layer_name(name))
    # H = V - (V - c) / tau + X with X = (r I + v_leak - c) / tau; snnTorch writes
    # r = tau / dt, so X = I.
    gain, offset = r / tau, (leak - reset) / tau
    if not (np.isclose(gain, 1.0, rtol=1e-6, atol=0.0) and offset == 0.0):
        scale_input(gain, offset)
    return LIFNeurons(tau=tau, thr=thr, v_reset=reset, decay_input=False,
                      name=_layer_name(name))


def _conv_from_nir(name, node, features):
    weight = np.asarray(node.weight, np.float32)                     # (C_out, C_in/g, kh, kw)
    kh, kw = weight.shape[2:]
    stride, dilation = _pair(node.stride), _pair(node.dilation)
    padding = node.padding
    layers = []
    if isinstance(padding, str):
        mode = padding
    else:
        pad = _pair(padding)
        if np.all(pad == 0):
            mode = "valid"
        elif (np.all(stride == 1) and kh % 2 == 1 and kw % 2 == 1
              and pad[0] == dilation[0] * (kh - 1) // 2 and pad[1] == dilation[1] * (kw - 1) // 2):
            mode = "same"
        else:
            mode = "valid"
            layers.append(_wrap(keras.layers.ZeroPadding2D(tuple(int(p) for p in pad),
                                                           name=_layer_name(name) + "_pad")))
    bias = getattr(node, "bias", None)
    bias = None if bias is None or np.all(np.asarray(bias) == 0) else np.asarray(bias)
    conv = keras.layers.Conv2D(weight.shape[0], (int(kh), int(kw)),
                               strides=tuple(int(v) for v in stride), padding=mode,
                               dilation_rate=tuple(int(v) for v in dilation),
                               groups=int(node.groups), use_bias=bias is not None,
                               name=_layer_name(name))
    record = _read_metadata(node)
    layers.append(_wrap(conv, (record or {}).get("wrapper")))
    return layers, conv, [np.transpose(weight, (2, 3, 1, 0))] + ([] if bias is None else [bias])


def _build_chain(layers, features):
    """Build ``layers`` one after the other from (None, None, *features); returns the final
    features (kspike layout)."""
    shape = (None, None) + tuple(features)
    for layer in layers:
        layer.build(shape)
        shape = tuple(layer.compute_output_shape(shape))
    return shape[2:]


class _Chain:
    """The nodes of a NIR graph walked from its Input to its Output."""

    def __init__(self, nir, graph):
        self.nir = nir
        self.nodes = graph.nodes
        self.successors = {name: [] for name in graph.nodes}
        self.predecessors = {name: [] for name in graph.nodes}
        for source, target in graph.edges:
            self.successors[source].append(target)
            self.predecessors[target].append(source)
        inputs = [n for n, node in self.nodes.items() if isinstance(node, nir.Input)]
        if len(inputs) != 1:
            raise NIRExportError(f"Cannot import the NIR graph: it has {len(inputs)} Input "
                                 "nodes; kspike imports chains with one input.")
        self.input = inputs[0]

    def recurrent_of(self, name):
        """The Linear/Affine node feeding ``name`` back from itself, or None."""
        for successor in self.successors[name]:
            if name in self.successors[successor] and isinstance(
                    self.nodes[successor], (self.nir.Linear, self.nir.Affine)):
                return successor
        return None

    def next_of(self, name, skip=()):
        following = [s for s in self.successors[name] if s not in skip]
        if len(following) != 1:
            raise NIRExportError(f"Cannot import the NIR graph: node {name!r} has "
                                 f"{len(following)} successors {following}; kspike imports "
                                 "chains of layers.")
        return following[0]


class _Imported:
    """The kspike layers imported so far: their output features (kspike layout), the weight
    node waiting for its neurons (``pending``), and the last layer with weights."""

    def __init__(self, nir, features):
        self.nir = nir
        self.features = features
        self.pending = None
        self.weighted = None
        self.layers = []
        self.consumed = set()

    def add(self, layer, weights=None):
        shape = (None, None) + self.features
        if not layer.built:
            layer.build(shape)
        if weights is not None:
            layer.set_weights([np.asarray(w, np.float32) for w in weights])
        self.features = tuple(layer.compute_output_shape(shape))[2:]
        self.layers.append(layer)
        self.weighted = None

    def flush(self):
        if self.pending is not None:
            name, node = self.pending
            self.pending = None
            self.add(_dense(name, node, self.features[-1]))
            self.weighted = self.layers[-1]

    def scale_input(self, node_name):
        return lambda gain, offset: self.fold_gain(node_name, gain, offset)

    def fold_gain(self, node_name, gain, offset):
        # X = gain I + offset, folded into the weights of the layer feeding the neurons.
        if self.pending is not None:
            name, node = self.pending
            kernel, bias = _weights(node, self.features[-1])
            bias = np.zeros(kernel.shape[1]) if bias is None else bias
            self.pending = (name, self.nir.Affine(weight=(kernel * gain).T,
                                                  bias=bias * gain + offset))
            return
        layer = self.weighted
        if layer is None:
            raise NIRExportError(
                f"Cannot import NIR node {node_name!r}: its input gain {gain} (r dt / tau) "
                "or leak offset needs a weight node (Affine, Linear, Conv2d) before it, "
                "to be folded into.")
        weights = layer.get_weights()
        if len(weights) == 1 and offset != 0.0:
            raise NIRExportError(f"Cannot import NIR node {node_name!r}: its leak offset "
                                 f"needs a bias in {layer.name!r}.")
        weights = [weights[0] * gain] + [b * gain + offset for b in weights[1:]]
        layer.set_weights(weights)


def _check_import_args(nir, graph, dt, lif_reset):
    dt = _check_dt(dt)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"`graph` must be a nir.NIRGraph, received {type(graph).__name__}.")
    if lif_reset not in (None, "subtract"):
        raise ValueError(f"`lif_reset` must be None or 'subtract', received {lif_reset!r}.")
    return dt


# Importers of one NIR node: (imported, chain, name, node, record, dt, lif_reset) -> the next
# node's name, or None for the single successor of ``name``.
def _import_weights(imported, chain, name, node, record, dt, lif_reset):
    imported.flush()
    imported.pending = (name, node)


def _import_neurons_record(imported, chain, name, node, record, dt, lif_reset):
    imported.flush()
    imported.add(keras.saving.deserialize_keras_object(record["config"]))


def _import_lif_cell(imported, chain, name, node, record, dt, lif_reset):
    recurrent = chain.recurrent_of(name)
    layer, following = _import_lif(chain, name, node, imported.pending, recurrent,
                                   imported.features[-1], dt, lif_reset)
    imported.consumed.add(recurrent)
    imported.pending = None
    imported.add(layer)
    return following


def _import_neurons(imported, chain, name, node, record, dt, lif_reset):
    if chain.recurrent_of(name) is not None:
        raise NIRExportError(f"Cannot import NIR node {name!r}: a recurrent hard-reset "
                             f"{type(node).__name__} has no kspike layer (kspike.LIF "
                             "cells reset by subtraction: lif_reset='subtract').")
    layer = _neuron_from_nir(name, node, dt, imported.scale_input(name))
    imported.flush()
    imported.add(layer)


def _import_leaky(imported, chain, name, node, record, dt, lif_reset):
    from kspike.layers import LeakyReadout
    new_layers, following = _import_li(chain, name, node, imported.pending,
                                       imported.features[-1], dt, LeakyReadout)
    imported.pending = None
    for layer in new_layers:
        imported.add(layer, None)
    return following


def _import_conv(imported, chain, name, node, record, dt, lif_reset):
    imported.flush()
    new_layers, conv, weights = _conv_from_nir(name, node, imported.features)
    for layer in new_layers[:-1]:
        imported.add(layer)
    imported.add(new_layers[-1])
    conv.set_weights([np.asarray(w, np.float32) for w in weights])
    imported.weighted = conv


def _import_pool(imported, chain, name, node, record, dt, lif_reset):
    imported.flush()
    if np.any(_pair(node.padding) != 0):
        raise NIRExportError(f"Cannot import NIR node {name!r}: pooling with padding "
                             f"{node.padding} has no kspike form; use padding 0.")
    size = tuple(int(v) for v in _pair(node.kernel_size))
    imported.add(_wrap(keras.layers.AveragePooling2D(
        size, strides=tuple(int(v) for v in _pair(node.stride)),
        name=_layer_name(name)), (record or {}).get("wrapper")))
    if isinstance(node, imported.nir.SumPool2d):
        # The sum is the average times the window size (exact for spikes).
        imported.add(_wrap(keras.layers.Rescaling(float(size[0] * size[1]),
                                                  name=_layer_name(name) + "_sum")))


def _import_scale(imported, chain, name, node, record, dt, lif_reset):
    imported.flush()
    imported.add(_wrap(keras.layers.Rescaling(_uniform(name, "scale", node.scale),
                                              name=_layer_name(name)),
                       (record or {}).get("wrapper")))


def _import_flatten(imported, chain, name, node, record, dt, lif_reset):
    nir = imported.nir
    imported.flush()
    chw = _nir_shape(imported.features)
    following = chain.next_of(name)
    if len(chw) == 3 and isinstance(chain.nodes[following], (nir.Affine, nir.Linear)):
        # NIR flattens (C, H, W), Keras (H, W, C): the next weights' columns are
        # reordered instead of the data.
        nxt = chain.nodes[following]
        kernel = _chw_rows_to_hwc(np.asarray(nxt.weight, np.float64).T, chw)
        bias = getattr(nxt, "bias", None)
        imported.pending = (following, nir.Linear(weight=kernel.T) if bias is None
                            else nir.Affine(weight=kernel.T, bias=np.asarray(bias)))
        imported.add(_wrap(keras.layers.Flatten(name=_layer_name(name)),
                           (record or {}).get("wrapper")))
        return chain.next_of(following)
    if len(chw) == 3:
        imported.add(_wrap(keras.layers.Permute((3, 1, 2), name=_layer_name(name) + "_chw")))
    imported.add(_wrap(keras.layers.Flatten(name=_layer_name(name))))
    return None


def _node_importer(nir, name, node, kind, lif_reset, features):
    """The importer of one NIR node (the first of these that applies)."""
    if isinstance(node, (nir.Affine, nir.Linear)):
        return _import_weights
    if isinstance(node, (nir.IF, nir.LIF)) and kind in ("IFNeurons", "LIFNeurons"):
        return _import_neurons_record
    if isinstance(node, nir.LIF) and (kind == "LIF" or (
            lif_reset == "subtract" and len(features) == 1)):
        return _import_lif_cell
    table = [((nir.IF, nir.LIF), _import_neurons), (nir.LI, _import_leaky),
             (nir.Conv2d, _import_conv), ((nir.AvgPool2d, nir.SumPool2d), _import_pool),
             (nir.Scale, _import_scale), (nir.Flatten, _import_flatten)]
    for types, importer in table:
        if isinstance(node, types):
            return importer
    raise NIRExportError(f"Cannot import NIR node {name!r} ({type(node).__name__}): "
                         "kspike imports Affine, Linear, Scale, IF, LIF (optionally "
                         "recurrent), LI, Conv2d, AvgPool2d, SumPool2d and Flatten "
                         "nodes.")


def from_nir(graph, dt=1.0, lif_reset=None):
    """A Keras model of kspike layers from a ``nir.NIRGraph`` (mapping: docs/nir.md).

    Args:
        graph: ``nir.NIRGraph`` (e.g. from ``to_nir`` or ``nir.read``), a chain of
            ``Affine``/``Linear``/``Scale``, ``IF``, ``LIF`` (optionally with a recurrent
            ``Linear``), ``LI``, ``Conv2d``, ``AvgPool2d``/``SumPool2d`` and ``Flatten``
            nodes between one ``Input`` and one ``Output``.
        dt: the time step to discretise with (forward Euler, as snnTorch); kspike cells get
            ``dt`` as their step in ms, neuron layers tau / dt steps.
        lif_reset: how to read a 1-D ``LIF`` node that carries no kspike metadata: None
            (NIR's own hard reset to ``v_reset``: a ``kspike.LIFNeurons`` layer, exact) or
            ``"subtract"`` (the writer meant reset by subtraction of the threshold, as
            snnTorch's default Leaky: imported as a ``kspike.LIF`` cell, ``v_reset``
            ignored).

    Returns:
        ``keras.Sequential`` on (B, T, *features) sequences (T free); images channels-last
        (B, T, H, W, C) for NIR's (C, H, W).

    Raises:
        NIRExportError (a ValueError): a node or graph shape kspike cannot import, named.
    """
    nir = _nir()
    dt = _check_import_args(nir, graph, dt, lif_reset)
    chain = _Chain(nir, graph)
    input_shape = tuple(int(d) for d in
                        np.asarray(chain.nodes[chain.input].input_type["input"]).ravel())
    imported = _Imported(nir, _kspike_shape(input_shape))
    name = chain.next_of(chain.input)
    while not isinstance(chain.nodes[name], nir.Output):
        node = chain.nodes[name]
        record = _read_metadata(node)
        importer = _node_importer(nir, name, node, (record or {}).get("kind"), lif_reset,
                                  imported.features)
        following = importer(imported, chain, name, node, record, dt, lif_reset)
        name = following or chain.next_of(name, skip=imported.consumed)
    imported.flush()
    return keras.Sequential([keras.Input((None,) + _kspike_shape(input_shape))]
                            + imported.layers)


def _kspike_shape(nir_shape):
    """NIR's channels-first (C, H, W) as kspike's (H, W, C); other shapes unchanged."""
    nir_shape = tuple(int(d) for d in nir_shape)
    if len(nir_shape) == 3:
        return (nir_shape[1], nir_shape[2], nir_shape[0])
    return nir_shape


def _dense(name, node, size_in):
    kernel, bias = _weights(node, size_in)
    layer = keras.layers.Dense(kernel.shape[1], use_bias=bias is not None,
                               name=name.replace(".", "_"))
    _set(layer, (None, None, size_in), [kernel] + ([] if bias is None else [bias]))
    return layer


def _import_lif(chain, name, node, pending, recurrent, size_in, dt, lif_reset):
    from kspike.cells import LIF
    record = _read_metadata(node)
    w_in, bias = _weights(None if pending is None else pending[1], size_in)
    w_rec = None if recurrent is None else _weights(chain.nodes[recurrent], None)[0]
    units = int(np.asarray(node.tau).size)
    if w_rec is not None and np.any(np.diag(w_rec) != 0):
        raise NIRExportError(f"Cannot import NIR node {recurrent!r}: its recurrent weights "
                             "have a nonzero diagonal (self-connections), and kspike cells "
                             "have none (zero diagonal, docs/neurons.md).")
    if record is not None and record.get("kind") == "LIF":
        config = dict(record["config"])
        inner = dict(config["config"])
        # Rewired (DEEP R) kernels come back dense with the same effective weights.
        inner.update(connectivity=None, dale=None)
        config["config"] = inner
        cell = keras.saving.deserialize_keras_object(config)
        rnn = record.get("rnn", "RNN")
        return_sequences = record.get("return_sequences", True)
        layer_name = record.get("layer")
    else:
        beta, gain, leak = _euler(name, node, dt)
        thr = _uniform(name, "v_threshold", node.v_threshold)
        if not thr > 0:
            raise NIRExportError(f"Cannot import NIR node {name!r}: v_threshold={thr} must "
                                 "be > 0 for a kspike.LIF cell.")
        if np.any(leak != 0) and bias is None:
            bias = np.zeros(units)
        cell = LIF(units, tau=_tau_for(beta, dt), thr=thr, dt=dt, recurrent=w_rec is not None,
                   use_bias=bias is not None)
        # kspike integrates (1 - alpha) I: the gain of the graph is folded into the weights.
        scale = gain / (1.0 - cell.alpha)
        w_in = w_in * scale
        w_rec = None if w_rec is None else w_rec * scale
        if bias is not None:
            bias = (gain * bias + leak) / (1.0 - cell.alpha)
        rnn, return_sequences, layer_name = "RNN", True, name.replace(".", "_")
    if w_rec is None and cell.recurrent:
        raise NIRExportError(f"Cannot import NIR node {name!r}: its kspike metadata says "
                             "recurrent, but the graph has no recurrent Linear node.")
    wrapper = keras.layers.RNN
    if rnn == "SpikingRNN":
        from kspike.engine import SpikingRNN as wrapper
    layer = wrapper(cell, return_sequences=return_sequences, name=layer_name)
    layer.build((None, None, size_in))
    weights = [w_in] + ([w_rec] if cell.recurrent else []) + ([bias] if cell.use_bias else [])
    if cell.use_bias and bias is None:
        weights[-1] = np.zeros(units)
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return layer, None


def _import_li(chain, name, node, pending, size_in, dt, readout_class):
    record = _read_metadata(node)
    units = int(np.asarray(node.tau).size)
    w, bias = _weights(None if pending is None else pending[1], size_in)
    if record is not None and record.get("kind") == "LeakyReadout":
        layer = keras.saving.deserialize_keras_object(record["config"])
        following = chain.next_of(name)
        weights = [w]
        if layer.use_bias:
            bias_node = chain.nodes[following]
            weights.append(np.asarray(bias_node.bias))
            following = chain.next_of(following)
        _set(layer, (None, None, size_in), weights)
        return [layer], following
    beta, gain, leak = _euler(name, node, dt)
    readout = readout_class(units, tau=_tau_for(beta, dt), dt=dt, use_bias=False,
                            name=name.replace(".", "_"))
    scale = gain / (1.0 - readout.kappa)
    dense = keras.layers.Dense(units, name=name.replace(".", "_") + "_input")
    full_bias = np.zeros(units) if bias is None else bias
    # A per-step Dense carries the weights (and the bias inside the filter, as NIR's Affine
    # before LI); the readout is the pure filter with an identity kernel.
    _set(dense, (None, None, size_in), [w * scale, (gain * full_bias + leak) / (1.0 - readout.kappa)])
    _set(readout, (None, None, units), [np.eye(units)])
    return [dense, readout], None
