"""kspike.graph: the layer predicates and the chain parser shared by rules and export."""
import keras
import pytest

import kspike
from kspike import graph


def test_predicates():
    cell = kspike.ALIF(4)
    rnn = keras.layers.RNN(cell, return_sequences=True)
    fast = kspike.SpikingRNN(kspike.LIF(3), return_sequences=True)
    assert graph.is_spiking_cell(cell) and isinstance(cell, kspike.cells.SpikingCell)
    assert not graph.is_spiking_cell(keras.layers.LSTMCell(3))
    assert graph.spiking_cell_of(cell) is cell and graph.spiking_cell_of(rnn) is cell
    assert graph.spiking_cell_of(fast) is fast.cell
    assert graph.spiking_cell_of(keras.layers.LSTM(3)) is None
    assert graph.is_spiking_layer(rnn) and graph.is_spiking_layer(fast)
    assert not graph.is_spiking_layer(cell) and not graph.is_spiking_layer(keras.layers.LSTM(3))
    assert graph.is_readout(kspike.LeakyReadout(2)) and not graph.is_readout(rnn)
    assert graph.is_specialised_cell(cell)

    class Custom(kspike.LIF):
        def call(self, inputs, states, training=None):
            return super().call(inputs, states, training)

    assert graph.is_spiking_cell(Custom(2)) and not graph.is_specialised_cell(Custom(2))


def test_cell_properties():
    assert kspike.ALIF(3).adaptive and not kspike.LIF(3).adaptive
    assert not kspike.LIF(3).rewired and kspike.LIF(3, connectivity=0.5).rewired
    cell = kspike.ALIF(4, dale=0.5, seed=0)
    keras.layers.RNN(cell).build((None, 5, 2))
    assert set(cell.rewired_kernels) == {"input", "recurrent"}
    with pytest.raises(TypeError):
        cell.rewired_kernels["input"] = None


def test_parse_stage_types_and_sequence_flags():
    model = keras.Sequential([
        keras.Input((10, 3)),
        keras.layers.Dense(4),
        keras.layers.RNN(kspike.LIF(4), return_sequences=True, name="spiking"),
        keras.layers.LSTM(3, return_sequences=True),
        keras.layers.TimeDistributed(keras.layers.Dense(3)),
        keras.layers.LayerNormalization(),
        kspike.LeakyReadout(2, name="readout"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
        keras.layers.Softmax(axis=1),
    ])
    stages = graph.parse(model, "test")
    assert [type(s).__name__ for s in stages] == [
        "PerStepLayer", "SpikingLayer", "RecurrentLayer", "PerStepLayer", "PerStepLayer",
        "Readout", "TimeAverage", "PerStepLayer", "PerStepLayer"]
    assert stages[1].cell is model.get_layer("spiking").cell and stages[1].name == "spiking"
    assert stages[3].inner is model.layers[3].layer
    assert [s.sequence_in for s in stages] == [True] * 7 + [False] * 2
    # Softmax over axis 1 of a (B, n) step is the last axis.
    seq = keras.Sequential([keras.Input((10, 3)), keras.layers.Softmax(axis=1),
                            keras.layers.Conv1D(2, 3)])
    first, second = graph.parse(seq, "test")
    assert isinstance(first, graph.UnsupportedLayer) and "axis=1" in first.reason
    assert isinstance(second, graph.UnsupportedLayer) and second.reason is None
    with pytest.raises(ValueError, match=r"my rule does not support layer 'conv1d' \(Conv1D\)"
                                         r"\. Supported: X"):
        graph.refuse(second, "my rule", "X")


def test_parse_nested_models():
    inner = keras.Sequential([keras.Input((10, 3)), keras.layers.Dense(4, name="inner_dense")],
                             name="inner")
    model = keras.Sequential([keras.Input((10, 3)), inner, kspike.LeakyReadout(2)])
    nested = graph.parse(model, "test")
    assert isinstance(nested[0], graph.UnsupportedLayer) and nested[0].reason == "a nested model"
    flat = graph.parse(model, "test", flatten_nested=True)
    assert [s.name for s in flat] == ["inner_dense", model.layers[1].name]


def test_parse_errors_name_the_layer():
    with pytest.raises(TypeError, match="my rule needs a keras.Model"):
        graph.parse(kspike.LIF(3), "my rule")
    with pytest.raises(ValueError, match="not built"):
        graph.parse(keras.Sequential([keras.layers.Dense(2)]), "my rule")
    inputs = keras.Input((10, 3))
    h = keras.layers.RNN(kspike.LIF(4), return_sequences=True)(inputs)
    skip = keras.layers.Dense(4, name="skip")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="add")([h, skip]))
    with pytest.raises(ValueError,
                       match=r"my rule: layer '\w+' \((Dense|RNN)\) of model .* not fed"):
        graph.parse(model, "my rule")
    shared = keras.layers.Dense(3, name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match="'shared' \\(Dense\\) is used 2 times"):
        graph.parse(model, "my rule")
    a, b = keras.Input((10, 3)), keras.Input((10, 3))
    with pytest.raises(ValueError, match="2 inputs and 1 outputs"):
        graph.parse(keras.Model([a, b], keras.layers.Add()([a, b])), "my rule")

    class Refused(ValueError):
        pass

    with pytest.raises(Refused):
        graph.parse(keras.Model([a, b], keras.layers.Add()([a, b])), "my rule", error=Refused)


def test_check_stateless():
    model = keras.Sequential([keras.Input((10, 3), batch_size=2),
                              keras.layers.RNN(kspike.LIF(3), return_sequences=True,
                                               stateful=True, name="stateful_rnn")])
    (stage,) = graph.parse(model, "my rule")
    with pytest.raises(ValueError, match="my rule does not support layer 'stateful_rnn' "
                                         r"\(RNN\) with stateful=True"):
        graph.check_stateless(stage, "my rule")
    with pytest.raises(ValueError, match="stateful=True"):
        kspike.learning.RateBP().check_model(model)
    fine = keras.Sequential([keras.Input((10, 3)),
                             keras.layers.RNN(kspike.LIF(3), return_sequences=True)])
    graph.check_stateless(graph.parse(fine, "my rule")[0], "my rule")


def test_neuron_layers_fold_time_and_time_keeping_reshape_are_stages():
    import kspike
    model = keras.Sequential([
        keras.Input((4, 12)),
        keras.layers.Reshape((4, 2, 2, 3), name="unflatten"),
        kspike.FoldTime(keras.layers.Conv2D(2, 1), name="conv"),
        kspike.LIFNeurons(name="lif"),
        keras.layers.TimeDistributed(keras.layers.Flatten(), name="flatten"),
        kspike.IFNeurons(return_sequences=False, name="last"),
        keras.layers.Dense(2, name="dense")])
    stages = kspike.graph.parse(model, "test")
    assert [type(s).__name__ for s in stages] == [
        "PerStepLayer", "PerStepLayer", "NeuronLayer", "PerStepLayer", "NeuronLayer",
        "PerStepLayer"]
    assert tuple(stages[0].inner.target_shape) == (2, 2, 3)      # one step's reshape
    assert stages[1].inner is model.get_layer("conv").layer
    assert [s.sequence_in for s in stages] == [True] * 5 + [False]
    assert kspike.graph.is_neuron_layer(model.get_layer("lif"))
    across = keras.Sequential([keras.Input((4, 12)), keras.layers.Reshape((48,), name="flat")])
    (stage,) = kspike.graph.parse(across, "test")
    assert isinstance(stage, kspike.graph.UnsupportedLayer) and "time axis" in stage.reason


def test_parse_deep_snn_stages():
    """Neuron layers, FoldTime wrappers and a time-keeping Reshape of a deep SNN."""
    T = 3
    conv = keras.layers.Conv2D(2, 3, padding="same")
    inputs = keras.Input((T, 36))
    h = keras.layers.Reshape((T, 6, 6, 1), name="unflatten")(inputs)
    h = kspike.FoldTime(conv, name="conv")(h)
    h = kspike.LIFNeurons(name="lif")(h)
    h = kspike.IFNeurons(return_sequences=False, name="last")(h)
    model = keras.Model(inputs, h)
    stages = graph.parse(model, "test")
    assert [type(s).__name__ for s in stages] == ["PerStepLayer", "PerStepLayer", "NeuronLayer",
                                                  "NeuronLayer"]
    assert tuple(stages[0].inner.target_shape) == (6, 6, 1)      # the per-step form
    assert stages[1].inner is conv
    assert stages[2].sequence_out and not stages[3].sequence_out
    assert graph.is_neuron_layer(stages[2].layer) and not graph.is_neuron_layer(conv)
    # a Reshape that moves the time axis has no per-step form
    model = keras.Sequential([keras.Input((4, 6)), keras.layers.Reshape((6, 4), name="swap")])
    stage, = graph.parse(model, "test")
    assert isinstance(stage, graph.UnsupportedLayer) and "time axis" in stage.reason


def test_parse_graph_residual_model():
    inputs = keras.Input((4, 6, 6, 1))
    h = keras.layers.Reshape((4, 36))(inputs)
    h = kspike.FoldTime(keras.layers.Dense(8), name="fold")(h)
    a = kspike.LIFNeurons(name="lif")(h)
    b = keras.layers.TimeDistributed(keras.layers.Dense(8), name="td")(a)
    merged = keras.layers.Add(name="add")([a, b])
    out = keras.layers.GlobalAveragePooling1D(name="mean")(merged)
    nodes, output = graph.parse_graph(keras.Model(inputs, out), "test")
    assert [type(n.stage).__name__ for n in nodes] == [
        "PerStepLayer", "PerStepLayer", "NeuronLayer", "PerStepLayer", "Merge", "TimeAverage"]
    assert [n.inputs for n in nodes] == [(-1,), (0,), (1,), (2,), (2, 3), (4,)]
    assert tuple(nodes[0].stage.inner.target_shape) == (36,) and output == 5
    bad = keras.layers.Reshape((36, 4))(keras.layers.Reshape((4, 36))(inputs))
    nodes, _ = graph.parse_graph(keras.Model(inputs, bad), "test")
    assert isinstance(nodes[1].stage, graph.UnsupportedLayer) and "time axis" in nodes[1].stage.reason
