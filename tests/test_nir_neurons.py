"""kspike.nir for the deep-SNN layers: IFNeurons / LIFNeurons <-> NIR IF / LIF (hard reset
exactly, soft reset through kspike's metadata record), Conv2d, AvgPool2d / SumPool2d, Flatten
(NIR's (C, H, W) order), Affine, Scale; a conv graph written as snnTorch / Norse write them
imports with NumPy-computed spikes; what NIR cannot represent is named."""
import keras
import numpy as np
import pytest

import kspike

nir = pytest.importorskip("nir")


def _images(batch, steps, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(batch, steps, 8, 8, 1)) < 0.4).astype("float32")


def _normal(seed):
    return keras.initializers.RandomNormal(0.0, 1.0, seed=seed)


def _conv_model(soft_reset=True):
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input((None, 8, 8, 1)),
        kspike.FoldTime(keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=_normal(0),
                                            bias_initializer=_normal(1)), name="conv"),
        kspike.LIFNeurons(tau=2.0, thr=0.5, name="lif1"),
        keras.layers.TimeDistributed(keras.layers.AveragePooling2D(2), name="pool"),
        kspike.FoldTime(keras.layers.Rescaling(4.0), name="sum"),
        keras.layers.TimeDistributed(keras.layers.Flatten(), name="flatten"),
        keras.layers.Dense(10, kernel_initializer=_normal(2), name="dense"),
        kspike.IFNeurons(thr=0.4, v_reset=None if soft_reset else -0.1, name="if2"),
        kspike.LIFNeurons(tau=3.0, decay_input=False, thr=0.3, v_reset=0.1, name="lif3"),
        keras.layers.TimeDistributed(keras.layers.Dense(3), name="readout")])


@pytest.mark.parametrize("soft_reset", [False, True])
def test_conv_round_trip_is_exact(soft_reset, tmp_path):
    model = _conv_model(soft_reset)
    x = _images(2, 6)
    graph = kspike.nir.to_nir(model)
    assert [type(graph.nodes[n]).__name__ for n in
            ("conv", "lif1", "pool", "sum", "flatten", "dense", "if2", "lif3", "readout")] == [
        "Conv2d", "LIF", "AvgPool2d", "Scale", "Flatten", "Affine", "IF", "LIF", "Affine"]
    # Channels-first shapes, PyTorch's conventions.
    assert tuple(graph.nodes["input"].input_type["input"]) == (1, 8, 8)
    assert graph.nodes["conv"].weight.shape == (4, 1, 3, 3)
    assert graph.nodes["lif1"].tau.shape == (4, 8, 8)
    expected = model(x).numpy()
    spikes = keras.Model(model.inputs, model.get_layer("if2").output)(x).numpy()
    assert 0.05 < spikes.mean() < 0.95
    np.testing.assert_array_equal(kspike.nir.from_nir(graph)(x).numpy(), expected)
    nir.write(tmp_path / "conv.nir", graph)
    reread = kspike.nir.from_nir(nir.read(tmp_path / "conv.nir"))
    np.testing.assert_array_equal(reread(x).numpy(), expected)
    if2 = reread.get_layer("if2")
    assert isinstance(if2, kspike.IFNeurons) and if2.v_reset == (None if soft_reset else -0.1)


def test_hard_reset_nodes_without_metadata_are_exact():
    # Stripped of kspike's records, the graph is read with NIR's own semantics, which the
    # hard-reset layers match exactly.
    model = _conv_model(soft_reset=False)
    graph = kspike.nir.to_nir(model)
    for node in graph.nodes.values():
        node.metadata = {}
    x = _images(1, 6, seed=1)
    np.testing.assert_array_equal(kspike.nir.from_nir(graph)(x).numpy(), model(x).numpy())
    lif3 = graph.nodes["lif3"]
    np.testing.assert_allclose(lif3.tau, 3.0)            # tau dt, r = tau (no input decay)
    np.testing.assert_allclose(lif3.r, 3.0)
    np.testing.assert_allclose(lif3.v_leak, 0.1)
    np.testing.assert_allclose(graph.nodes["if2"].v_reset, -0.1)


def _norse_style_conv_graph(rng, beta=0.8, thr=1.0):
    """Conv2d(1->3, 3x3, padding 1) -> LIF -> SumPool2d(2) -> Flatten -> Affine(48->5) -> IF,
    channels-first, per-neuron parameter arrays, as snnTorch / Norse write them (LIF: tau =
    dt / (1 - beta), r = tau / dt, v_leak = 0; IF: r = 1 / dt)."""
    conv_w = rng.normal(0, 1.0, (3, 1, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.2, 3).astype(np.float32)
    fc_w = rng.normal(0, 0.5, (5, 48)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, 5).astype(np.float32)
    tau = 1.0 / (1.0 - beta)
    nodes = {
        "input": nir.Input(input_type={"input": np.array([1, 8, 8])}),
        "conv": nir.Conv2d(input_shape=(8, 8), weight=conv_w, stride=1, padding=1, dilation=1,
                           groups=1, bias=conv_b),
        "lif": nir.LIF(tau=np.full((3, 8, 8), tau), r=np.full((3, 8, 8), tau),
                       v_leak=np.zeros((3, 8, 8)), v_threshold=np.full((3, 8, 8), thr),
                       v_reset=np.zeros((3, 8, 8))),
        "pool": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                              padding=np.array([0, 0])),
        "flatten": nir.Flatten(input_type={"input": np.array([3, 4, 4])}, start_dim=0),
        "fc": nir.Affine(weight=fc_w, bias=fc_b),
        "if": nir.IF(r=np.ones(5), v_threshold=np.full(5, thr), v_reset=np.zeros(5)),
        "output": nir.Output(output_type={"output": np.array([5])}),
    }
    names = list(nodes)
    graph = nir.NIRGraph(nodes=nodes, edges=list(zip(names[:-1], names[1:])))
    return graph, (conv_w, conv_b, fc_w, fc_b, beta, thr)


def test_norse_style_conv_graph_gives_numpy_spikes():
    graph, (conv_w, conv_b, fc_w, fc_b, beta, thr) = _norse_style_conv_graph(
        np.random.default_rng(11))
    model = kspike.nir.from_nir(graph)
    x = _images(2, 8, seed=2)                       # (B, T, H, W, C): channels-last
    # NumPy reference in NIR's channels-first layout (float64).
    images = np.transpose(x, (0, 1, 4, 2, 3))[:, :, 0]           # (B, T, 8, 8)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    v1, v2, out, margins = np.zeros((2, 3, 8, 8)), np.zeros((2, 5)), [], []
    for t in range(8):
        current = np.zeros((2, 3, 8, 8)) + conv_b[None, :, None, None]
        for i in range(3):
            for j in range(3):
                current += (padded[:, t, None, i:i + 8, j:j + 8]
                            * conv_w[None, :, 0, i, j, None, None])
        v1 = beta * v1 + current                    # snnTorch's Leaky: v = beta v + I
        margins.append(np.abs(v1 - thr).min())
        s1 = (v1 >= thr).astype(float)
        v1 = np.where(s1 > 0, 0.0, v1)              # NIR's reset to v_reset, at once
        pooled = s1.reshape(2, 3, 4, 2, 4, 2).sum(axis=(3, 5))   # SumPool2d
        v2 = v2 + pooled.reshape(2, 48) @ fc_w.T + fc_b          # (C, H, W) flatten order
        margins.append(np.abs(v2 - thr).min())
        s2 = (v2 >= thr).astype(float)
        v2 = np.where(s2 > 0, 0.0, v2)
        out.append(s2)
    expected = np.stack(out, 1)
    assert min(margins) > 1e-4, "a float32 tie at the threshold would make the test fragile"
    assert 0.05 < expected.mean() < 0.9
    np.testing.assert_array_equal(model(x).numpy(), expected)
    # And the imported model exports again (kspike -> NIR) with the same outputs.
    again = kspike.nir.from_nir(kspike.nir.to_nir(model))
    np.testing.assert_array_equal(again(x).numpy(), expected)


def test_unsupported_layers_are_named():
    def refused(layer, match, shape=(None, 4)):
        model = keras.Sequential([keras.Input(shape), layer])
        with pytest.raises(kspike.nir.NIRExportError, match=match):
            kspike.nir.to_nir(model)

    refused(keras.layers.GlobalAveragePooling1D(name="mean"), r"'mean'.*mean over time")
    refused(keras.layers.TimeDistributed(keras.layers.MaxPooling2D(), name="maxpool"),
            r"'maxpool'.*Supported", shape=(None, 8, 8, 1))
    refused(keras.layers.TimeDistributed(keras.layers.Conv2D(2, 2, padding="same"),
                                         name="even"), r"'even'.*asymmetrically",
            shape=(None, 8, 8, 1))
    refused(kspike.LIFNeurons(output="all", name="both"), r"'both'.*output='spikes'")
    refused(keras.layers.TimeDistributed(keras.layers.Flatten(), name="flat"),
            r"ends with a Flatten", shape=(None, 8, 8, 1))
    graph = nir.NIRGraph.from_list(nir.Threshold(threshold=np.ones(3)))
    with pytest.raises(kspike.nir.NIRExportError, match=r"\(Threshold\)"):
        kspike.nir.from_nir(graph)
