"""kspike.nir: kspike -> NIR -> kspike reproduces outputs exactly; a hand-built snnTorch-style
graph imports with NumPy-computed spikes; what NIR cannot represent is refused clearly."""
import numpy as np
import pytest
import keras

import kspike

nir = pytest.importorskip("nir")


def _spikes(batch, steps, n_in, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.uniform(size=(batch, steps, n_in)) < 0.3)
            * rng.uniform(0.5, 1.5, size=(batch, steps, n_in))).astype("float32")


def _model(*layers, n_in=5):
    return keras.Sequential([keras.Input((None, n_in)), *layers])


def _rnn(cell):
    return keras.layers.RNN(cell, return_sequences=True)


CASES = {
    "lif": lambda: _model(_rnn(kspike.LIF(10, thr=0.02, seed=1))),
    "lif_bias_feedforward": lambda: _model(_rnn(kspike.LIF(10, thr=0.02, tau=10.0,
                                                           use_bias=True, recurrent=False,
                                                           seed=1))),
    "deep_r_sparse": lambda: _model(_rnn(kspike.LIF(10, thr=0.02, connectivity=0.2, seed=1))),
    "dense_two_layers_readout": lambda: _model(
        keras.layers.Dense(8),
        _rnn(kspike.LIF(10, thr=0.02, seed=1)), keras.layers.Dropout(0.3),
        _rnn(kspike.LIF(6, thr=0.02, dt=0.5, seed=2)),
        kspike.LeakyReadout(3, tau=10.0, seed=4)),
    "readout_without_bias": lambda: _model(kspike.LeakyReadout(3, use_bias=False, seed=4)),
    "spiking_rnn": lambda: _model(kspike.SpikingRNN(kspike.LIF(10, thr=0.02, seed=1),
                                                    return_sequences=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case, tmp_path):
    model = CASES[case]()
    x = _spikes(2, 40, 5)
    graph = kspike.nir.to_nir(model)
    expected = model(x).numpy()
    assert np.abs(expected).sum() > 1
    np.testing.assert_array_equal(kspike.nir.from_nir(graph)(x).numpy(), expected)
    # through the file format too (metadata survives nir.write / nir.read)
    nir.write(tmp_path / "graph.nir", graph)
    reread = kspike.nir.from_nir(nir.read(tmp_path / "graph.nir"))
    np.testing.assert_array_equal(reread(x).numpy(), expected)


def test_graph_uses_snntorch_reading():
    cell = kspike.LIF(4, tau=20.0, thr=0.5, seed=1)
    model = _model(_rnn(cell), kspike.LeakyReadout(2, tau=10.0, seed=2), n_in=3)
    graph = kspike.nir.to_nir(model, dt=1.0)
    lif = graph.nodes["rnn.lif"]
    alpha = np.exp(-1.0 / 20.0)
    np.testing.assert_allclose(lif.tau, 1.0 / (1.0 - alpha), rtol=1e-6)
    np.testing.assert_allclose(lif.r, 1.0)
    np.testing.assert_allclose(lif.v_threshold, 0.5)
    np.testing.assert_allclose(graph.nodes["rnn.input"].weight, np.asarray(cell.input_kernel).T)
    assert ("rnn.lif", "rnn.recurrent") in graph.edges
    assert ("rnn.recurrent", "rnn.lif") in graph.edges
    kappa = np.exp(-1.0 / 10.0)
    np.testing.assert_allclose(graph.nodes["leaky_readout.li"].tau, 1.0 / (1.0 - kappa),
                               rtol=1e-6)
    assert graph.edges[-1] == ("leaky_readout.bias", "output")


def _snntorch_style_graph(rng, n_in=4, n_hidden=7, n_out=3, beta=0.9, beta_out=0.8, thr=1.0):
    """Affine -> LIF -> Affine -> LI as snnTorch writes Leaky(beta): tau = dt/(1-beta),
    r = tau/dt (input gain 1), v_leak = 0."""
    w1 = rng.normal(0, 1.0, (n_hidden, n_in)).astype(np.float32)
    b1 = rng.normal(0, 0.1, n_hidden).astype(np.float32)
    w2 = rng.normal(0, 1.0, (n_out, n_hidden)).astype(np.float32)
    b2 = rng.normal(0, 0.1, n_out).astype(np.float32)
    tau, tau_out = 1.0 / (1.0 - beta), 1.0 / (1.0 - beta_out)
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=w1, bias=b1),
        nir.LIF(tau=np.full(n_hidden, tau), r=np.full(n_hidden, tau),
                v_leak=np.zeros(n_hidden), v_threshold=np.full(n_hidden, thr)),
        nir.Affine(weight=w2, bias=b2),
        nir.LI(tau=np.full(n_out, tau_out), r=np.full(n_out, tau_out), v_leak=np.zeros(n_out)))
    return graph, (w1, b1, w2, b2, beta, beta_out, thr)


def test_snntorch_style_graph_imports_with_numpy_spikes():
    rng = np.random.default_rng(3)
    graph, (w1, b1, w2, b2, beta, beta_out, thr) = _snntorch_style_graph(rng)
    model = kspike.nir.from_nir(graph, dt=1.0, lif_reset="subtract")
    x = _spikes(2, 50, 4, seed=5)
    # NumPy reference (float64): snnTorch Leaky with reset by subtraction, then a leaky LI.
    v = np.zeros((2, 7))
    z = np.zeros((2, 7))
    readout = np.zeros((2, 3))
    spikes, outputs, margins = [], [], []
    for t in range(50):
        v = beta * v + x[:, t] @ w1.T + b1 - thr * z
        z = (v > thr).astype(np.float64)
        margins.append(np.abs(v - thr).min())
        readout = beta_out * readout + z @ w2.T + b2
        spikes.append(z)
        outputs.append(readout)
    spikes, outputs = np.stack(spikes, 1), np.stack(outputs, 1)
    assert min(margins) > 1e-4, "a float32 tie at threshold would make the test fragile"
    assert 0.05 < spikes.mean() < 0.6
    hidden = keras.Sequential([keras.Input((None, 4)), model.layers[0]])
    np.testing.assert_array_equal(hidden(x).numpy(), spikes)
    np.testing.assert_allclose(model(x).numpy(), outputs, rtol=1e-4, atol=1e-4)


def test_plain_lif_reads_as_hard_reset_neuron_layer():
    # Without lif_reset a LIF node has NIR's own reset to v_reset: kspike.LIFNeurons.
    rng = np.random.default_rng(3)
    graph, (w1, b1, *_, beta, _, thr) = _snntorch_style_graph(rng)
    model = kspike.nir.from_nir(graph)
    lif = model.layers[1]
    assert isinstance(lif, kspike.LIFNeurons) and lif.v_reset == 0.0 and not lif.decay_input
    x = _spikes(2, 50, 4, seed=5)
    v, spikes = np.zeros((2, 7)), []
    for t in range(50):
        v = beta * v + x[:, t] @ w1.T + b1
        z = (v >= thr).astype(np.float64)
        assert np.abs(v - thr).min() > 1e-4
        v = np.where(z > 0, 0.0, v)
        spikes.append(z)
    spikes = np.stack(spikes, 1)
    assert 0.05 < spikes.mean() < 0.6
    hidden = keras.Sequential([keras.Input((None, 4))] + model.layers[:2])
    np.testing.assert_array_equal(hidden(x).numpy(), spikes)
    with pytest.raises(ValueError, match="lif_reset"):
        kspike.nir.from_nir(graph, lif_reset="zero")


def test_alif_refused_with_reason():
    model = _model(keras.layers.RNN(kspike.ALIF(8, seed=1), return_sequences=True,
                                    name="adaptive"))
    with pytest.raises(kspike.nir.NIRExportError, match=r"'adaptive'.*adaptive threshold"):
        kspike.nir.to_nir(model)


@pytest.mark.parametrize("cell, reason", [
    (lambda: kspike.LIF(8, n_refractory=2), "refractory"),
    (lambda: kspike.LIF(8, output="all"), "output='all'"),
])
def test_other_refusals(cell, reason):
    with pytest.raises(kspike.nir.NIRExportError, match=reason):
        kspike.nir.to_nir(_model(_rnn(cell())))
    with pytest.raises(kspike.nir.NIRExportError, match="activation 'relu'"):
        kspike.nir.to_nir(_model(keras.layers.Dense(3, activation="relu")))


def test_arguments_checked():
    model = CASES["lif"]()
    with pytest.raises(ValueError, match="`dt`"):
        kspike.nir.to_nir(model, dt=0.0)
    with pytest.raises(TypeError, match="`model`"):
        kspike.nir.to_nir("model")
    with pytest.raises(TypeError, match="`graph`"):
        kspike.nir.from_nir(model)


def test_missing_package_names_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "nir" or name.startswith("nir."):
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"kspike\[nir\]"):
        kspike.nir.to_nir(CASES["lif"]())


def test_recurrent_snntorch_style_graph_imports():
    # input -> Affine -> LIF <-> Linear (recurrent) -> output, snnTorch's RLeaky-like cycle.
    rng = np.random.default_rng(7)
    w_in = rng.normal(0, 1.0, (5, 3)).astype(np.float32)
    w_rec = rng.normal(0, 0.5, (5, 5)).astype(np.float32)
    beta, thr = 0.85, 1.0
    tau = 1.0 / (1.0 - beta)

    def graph_with(w_rec):
        return nir.NIRGraph(
            nodes={"input": nir.Input(input_type={"input": np.array([3])}),
                   "fc": nir.Linear(weight=w_in),
                   "lif": nir.LIF(tau=np.full(5, tau), r=np.full(5, tau), v_leak=np.zeros(5),
                                  v_threshold=np.full(5, thr)),
                   "rec": nir.Linear(weight=w_rec),
                   "output": nir.Output(output_type={"output": np.array([5])})},
            edges=[("input", "fc"), ("fc", "lif"), ("lif", "rec"), ("rec", "lif"),
                   ("lif", "output")])

    with pytest.raises(kspike.nir.NIRExportError, match="'rec'.*self-connections"):
        kspike.nir.from_nir(graph_with(w_rec), lif_reset="subtract")
    np.fill_diagonal(w_rec, 0.0)        # kspike cells have no self-connections
    model = kspike.nir.from_nir(graph_with(w_rec), lif_reset="subtract")
    x = _spikes(1, 40, 3, seed=8)
    v, z, spikes = np.zeros((1, 5)), np.zeros((1, 5)), []
    for t in range(40):
        v = beta * v + x[:, t] @ w_in.T + z @ w_rec.T - thr * z
        z = (v > thr).astype(np.float64)
        assert np.abs(v - thr).min() > 1e-4
        spikes.append(z)
    spikes = np.stack(spikes, 1)
    assert spikes.sum() > 5
    np.testing.assert_array_equal(model(x).numpy(), spikes)
