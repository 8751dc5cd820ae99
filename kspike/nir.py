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
- refused with an error naming the layer: ALIF cells (NIR has no adaptive threshold), cells
  with ``n_refractory > 0`` (no refractory period in NIR), ``n_delay > 1``, ``output="all"``,
  any other layer.

NIR -> kspike: the kspike graphs above exactly (weights are copied, sparse DEEP R cells come
back as dense cells with the same effective weights), and graphs of other writers made of
``Affine``/``Linear``, ``LIF`` (with optional recurrent ``Linear``) and ``LI`` nodes in a
chain. A ``LIF`` node without kspike metadata has NIR's hard reset; kspike imports it as a
``kspike.LIF`` cell (reset by subtraction) only when told that the writer meant subtraction
(``lif_reset="subtract"``, e.g. snnTorch's default ``Leaky``). The hard-reset import belongs
to ``kspike.LIFNeurons`` and is not available yet.
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


def _layers(model):
    """The layers of a chain-shaped model in order (nested models flattened)."""
    from kspike import export
    # StreamingModel refuses non-chains and unsupported layers with errors naming them.
    export.StreamingModel(model)
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model) and not hasattr(layer, "cell"):
            layers.extend(_layers(layer))
        else:
            layers.append(layer)
    return layers


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
def _neuron_layer_to_nir(layer, dt):
    """HOOK for kspike.IFNeurons / kspike.LIFNeurons (hard reset, SpikingJelly semantics):
    they map to NIR IF / LIF exactly. To be written with those layers;
    return (nodes dict, internal edges, first node name, last node name)."""
    raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: the IF/LIF neuron layers "
                         "are not supported by kspike.nir yet.")


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


def to_nir(model, dt=1.0):
    """A kspike model as a ``nir.NIRGraph`` (mapping and discretisation: docs/nir.md).

    Args:
        model: a built chain-shaped ``keras.Model`` on (B, T, n_in) sequences made of RNN
            layers of ``kspike.LIF`` cells, ``kspike.LeakyReadout``, linear ``Dense`` layers
            (and Dropout/noise/Identity layers, skipped).
        dt: the time step written into the graph (NIR time constants are in units of it).

    Returns:
        ``nir.NIRGraph`` with nodes ``input``, ``<layer>.<part>`` ... and ``output``.

    Raises:
        NIRExportError (a ValueError): a layer NIR cannot represent (ALIF: no adaptive
            threshold; refractoriness; delays), naming the layer and the reason.

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
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, received {type(model).__name__}.")
    from kspike.layers import LeakyReadout
    n_in = int(model.inputs[0].shape[-1]) if getattr(model, "inputs", None) else None
    layers = _layers(model)
    nodes = {"input": nir.Input(input_type={"input": np.array([n_in])})}
    edges = []
    previous = "input"
    for layer in layers:
        if isinstance(layer, _SKIPPED):
            continue
        name = layer.name
        if hasattr(layer, "cell"):
            if getattr(layer.cell, "n_delay", 1) > 1:
                raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: synaptic "
                                     f"delays (n_delay={layer.cell.n_delay}) have no NIR form; "
                                     "expected n_delay=1.")
            if not layer.return_sequences:
                raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: "
                                     "return_sequences=False has no NIR form (NIR graphs "
                                     "map a sequence to a sequence).")
            parts = _lif_to_nir(nir, layer, name, dt)
        elif isinstance(layer, LeakyReadout):
            parts = _readout_to_nir(nir, layer, name, dt)
        elif type(layer).__name__ in ("IFNeurons", "LIFNeurons"):
            parts = _neuron_layer_to_nir(layer, dt)
        elif isinstance(layer, keras.layers.Dense):
            if layer.activation not in (None, keras.activations.linear):
                raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: activation "
                                     f"{layer.activation.__name__!r}; NIR's Affine is linear.")
            bias = None if layer.bias is None else np.asarray(layer.bias)
            parts = ({name: _affine(nir, np.asarray(layer.kernel), bias)}, [], name, name)
        else:
            raise NIRExportError(f"Cannot export {_describe(layer)} to NIR: kspike.nir knows "
                                 "no NIR form for it. Supported: RNN layers of kspike.LIF, "
                                 "kspike.LeakyReadout, linear Dense.")
        layer_nodes, layer_edges, first, last = parts
        nodes.update(layer_nodes)
        edges += [(previous, first)] + layer_edges
        previous = last
    size = _output_size(nodes[previous]) if previous != "input" else n_in
    nodes["output"] = nir.Output(output_type={"output": np.array([size])})
    edges.append((previous, "output"))
    return nir.NIRGraph(nodes=nodes, edges=edges,
                        metadata={"writer": "kspike", "dt": dt})


def _output_size(node):
    if hasattr(node, "weight"):
        return int(node.weight.shape[0])
    return int(np.asarray(node.tau).shape[0])


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


def _hard_reset_lif(node_name, node, dt):
    """HOOK for kspike.LIFNeurons / IFNeurons (hard reset to v_reset): NIR LIF / IF nodes map
    to them exactly. To be written with those layers."""
    raise NotImplementedError(
        f"Cannot import NIR node {node_name!r}: a NIR {type(node).__name__} resets to v_reset "
        "(hard reset), whose kspike layer (kspike.LIFNeurons) is not supported by kspike.nir "
        "yet. If the graph's writer meant reset by subtraction (snnTorch's default Leaky), "
        "pass lif_reset='subtract' to import it as a kspike.LIF cell.")


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


def from_nir(graph, dt=1.0, lif_reset=None):
    """A Keras model of kspike layers from a ``nir.NIRGraph`` (mapping: docs/nir.md).

    Args:
        graph: ``nir.NIRGraph`` (e.g. from ``to_nir`` or ``nir.read``), a chain of
            ``Affine``/``Linear``, ``LIF`` (optionally with a recurrent ``Linear``) and ``LI``
            nodes between one ``Input`` and one ``Output``.
        dt: the time step to discretise with (forward Euler, as snnTorch); kspike cells get
            ``dt`` as their step in ms.
        lif_reset: how to read a ``LIF`` node that carries no kspike metadata: None (NIR's own
            hard reset; not available yet, raises NotImplementedError) or ``"subtract"`` (the
            writer meant reset by subtraction of the threshold, as snnTorch's default Leaky:
            imported as a ``kspike.LIF`` cell, ``v_reset`` ignored).

    Returns:
        ``keras.Sequential`` on (B, T, n_in) sequences (T free).

    Raises:
        NIRExportError (a ValueError): a node or graph shape kspike cannot import, named.
    """
    nir = _nir()
    dt = _check_dt(dt)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"`graph` must be a nir.NIRGraph, received {type(graph).__name__}.")
    if lif_reset not in (None, "subtract"):
        raise ValueError(f"`lif_reset` must be None or 'subtract', received {lif_reset!r}.")
    from kspike.layers import LeakyReadout
    chain = _Chain(nir, graph)
    n_in = int(np.asarray(chain.nodes[chain.input].input_type["input"]).ravel()[-1])
    layers, size, name = [], n_in, chain.next_of(chain.input)
    pending = None          # an Affine/Linear waiting to see whether a neuron node follows
    consumed = set()
    while True:
        node = chain.nodes[name]
        if isinstance(node, nir.Output):
            break
        following = None
        if isinstance(node, (nir.Affine, nir.Linear)):
            if pending is not None:
                layers.append(_dense(*pending, size))
                size = int(pending[1].weight.shape[0])
            pending = (name, node)
        elif isinstance(node, nir.LIF):
            recurrent = chain.recurrent_of(name)
            layer, following = _import_lif(chain, name, node, pending, recurrent, size, dt,
                                           lif_reset)
            consumed.add(recurrent)
            layers.append(layer)
            size, pending = int(np.asarray(node.tau).size), None
        elif isinstance(node, nir.LI):
            new_layers, following = _import_li(chain, name, node, pending, size, dt,
                                               LeakyReadout)
            layers.extend(new_layers)
            size, pending = int(np.asarray(node.tau).size), None
        elif isinstance(node, nir.IF):
            _hard_reset_lif(name, node, dt)
        else:
            raise NIRExportError(f"Cannot import NIR node {name!r} ({type(node).__name__}): "
                                 "kspike imports Affine, Linear, LIF and LI nodes.")
        name = following or chain.next_of(name, skip=consumed)
    if pending is not None:
        layers.append(_dense(*pending, size))
    model = keras.Sequential([keras.Input((None, n_in))] + layers)
    return model


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
        if lif_reset != "subtract":
            _hard_reset_lif(name, node, dt)
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
