"""S-TLLR on feed-forward deep SNNs (Dense / Conv2D synapses followed by kspike.IFNeurons /
kspike.LIFNeurons) against an independent NumPy implementation of docs/stllr.md and
docs/neuron_layers.md."""
import numpy as np
import pytest
import keras
import tensorflow as tf

import kspike
from kspike.learning import STLLR

RTOL = 1e-8   # float64


@pytest.fixture(autouse=True)
def _eager():
    """The rule's per-step graph takes seconds to trace; eagerly the same code runs in a
    fraction of that on these small shapes (the tutorial's --quick run covers the graph)."""
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def mse(y_true, y_pred, sample_weight=None):
    return tf.reduce_mean(tf.square(y_pred - y_true))


# ----------------------------------------------------------------------------- NumPy maths
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def surrogate(x):                      # kspike "sigmoid", gamma = s = 1
    return 4.0 * sigmoid(4.0 * x) * (1.0 - sigmoid(4.0 * x))


def psi_linear(x):
    return 1.0 / (100.0 * np.abs(x) + 1.0) ** 2


def psi_conv(x):
    return 0.3 * np.maximum(0.0, 1.0 - np.abs(x))


def conv_same(x, k, b):
    """3x3 (odd) 'same' convolution, stride 1, channels last, by explicit sums."""
    kh, kw = k.shape[:2]
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = np.zeros(x.shape[:3] + (k.shape[3],))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,co->bhwo", xp[:, i:i + x.shape[1], j:j + x.shape[2]], k[i, j])
    return out + (0 if b is None else b)


def conv_input_vjp(g, k, shape):
    kh, kw = k.shape[:2]
    ph, pw = kh // 2, kw // 2
    dxp = np.zeros((shape[0], shape[1] + 2 * ph, shape[2] + 2 * pw, shape[3]))
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + shape[1], j:j + shape[2]] += np.einsum("bhwo,co->bhwc", g, k[i, j])
    return dxp[:, ph:ph + shape[1], pw:pw + shape[2]]


def conv_kernel_grad(x, g, kshape):
    kh, kw = kshape[:2]
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    dk = np.zeros(kshape)
    for i in range(kh):
        for j in range(kw):
            dk[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + x.shape[1], j:j + x.shape[2]], g)
    return dk


def bn_forward(h, op):
    axes = tuple(range(h.ndim - 1))
    mean, var = h.mean(axes), h.var(axes)
    xhat = (h - mean) / np.sqrt(var + op["eps"])
    return op["gamma"] * xhat + op["beta"], xhat, var


def bn_input_vjp(g, xhat, var, op):
    axes = tuple(range(g.ndim - 1))
    gx = g * op["gamma"]
    return (gx - gx.mean(axes) - xhat * (gx * xhat).mean(axes)) / np.sqrt(var + op["eps"])


def neuron_step(v, x, op):
    if op["tau"] is None:
        h = v + x
    else:
        h = v + (x - v) / op["tau"]
    s = (h >= op["thr"]).astype(float)
    v = h - op["thr"] * s if op["v_reset"] is None else h * (1 - s) + op["v_reset"] * s
    return s, v, h


def forward_step(ops, x, voltages):
    """One step; returns the output and, per op, its input and what the backward needs."""
    h, recs, k, new_v = x, [], 0, []
    for op in ops:
        rec = {"in": h}
        kind = op["type"]
        if kind in ("dense", "readout"):
            h = h @ op["W"] + (0 if op["b"] is None else op["b"])
        elif kind == "conv":
            h = conv_same(h, op["W"], op["b"])
        elif kind == "bn":
            h, rec["xhat"], rec["var"] = bn_forward(h, op)
        elif kind == "neuron":
            s, v, hh = neuron_step(voltages[k], h, op)
            rec["h"] = hh
            new_v.append(v)
            k += 1
            h = s
        elif kind == "avgpool":
            b, hh, ww, c = h.shape
            h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean((2, 4))
        elif kind == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif kind == "reshape":
            h = h.reshape((h.shape[0],) + op["shape"])
        rec["out"] = h
        recs.append(rec)
    return h, recs, new_v


def input_vjp(op, rec, g):
    kind = op["type"]
    if kind in ("dense", "readout"):
        return g @ op["W"].T
    if kind == "conv":
        return conv_input_vjp(g, op["W"], rec["in"].shape)
    if kind == "bn":
        return bn_input_vjp(g, rec["xhat"], rec["var"], op)
    if kind == "neuron":
        gain = 1.0 if op["tau"] is None else 1.0 / op["tau"]
        return g * surrogate(rec["h"] - op["thr"]) * gain
    if kind == "avgpool":
        return np.repeat(np.repeat(g, 2, axis=1), 2, axis=2) / 4.0
    return g.reshape(rec["in"].shape)


def numpy_stllr(ops, x, target, factors, last_steps, feedback, secondary, matrices=None):
    lam_post, lam_pre, a_post, a_pre = factors
    batch, steps = x.shape[:2]
    neurons = [i for i, op in enumerate(ops) if op["type"] == "neuron"]

    def initial():
        return [np.full_like(np.zeros(1), 0.0 if ops[i]["v_reset"] is None else
                             ops[i]["v_reset"]) for i in neurons]

    # pass 1
    v = initial()
    ys = []
    for t in range(steps):
        y_t, _, v = forward_step(ops, x[:, t], v)
        ys.append(y_t)
    ybar = np.mean(ys, axis=0)
    loss = np.mean((ybar - target) ** 2)
    err = 2 * (ybar - target) / ybar.size / steps
    grads = {id(op): {"W": 0.0, "b": 0.0, "gamma": 0.0, "beta": 0.0} for op in ops}
    first = 0 if last_steps is None else steps - last_steps
    synapse_of = {}
    for i in neurons:
        j = i - 1
        while ops[j]["type"] not in ("dense", "conv"):
            j -= 1
        synapse_of[i] = j
    tr_pre, tr_post, tr_one = {}, {}, 0.0
    v = initial()
    for t in range(steps):
        y_t, recs, v = forward_step(ops, x[:, t], v)
        active = t >= first
        # readout: exact local gradient at every step
        ro = ops[-1]
        grads[id(ro)]["W"] += recs[-1]["in"].T @ err
        grads[id(ro)]["b"] += err.sum(0)
        # same-step backpropagation; dE/dS of every neuron op
        signal = {}
        g = err
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if op["type"] == "neuron":
                signal[i] = g
            if op["type"] == "bn" and active:
                axes = tuple(range(g.ndim - 1))
                grads[id(op)]["gamma"] += (g * recs[i]["xhat"]).sum(axes)
                grads[id(op)]["beta"] += g.sum(axes)
            g = input_vjp(op, recs[i], g)
        if feedback == "dfa":
            signal = {i: (err @ m).reshape(recs[i]["out"].shape)
                      for i, m in zip(neurons, matrices)}
        tr_one = lam_pre * tr_one + 1.0
        for i in neurons:
            syn = synapse_of[i]
            op = ops[i]
            x_thr = recs[i]["h"] - op["thr"]
            if secondary == "surrogate":
                psi = surrogate(x_thr)
            else:
                psi = psi_conv(x_thr) if ops[syn]["type"] == "conv" else psi_linear(x_thr)
            pre = recs[syn]["in"]
            tr_pre[syn] = pre if syn not in tr_pre else lam_pre * tr_pre[syn] + pre
            if active:
                g1 = a_pre * psi * signal[i]
                g2 = a_post * tr_post.get(syn, 0.0) * signal[i]
                # back through the layers between synapse and neuron (BatchNorm)
                for j in range(i - 1, syn, -1):
                    g1 = input_vjp(ops[j], recs[j], g1)
                    g2 = input_vjp(ops[j], recs[j], g2)
                if ops[syn]["type"] == "conv":
                    dw = (conv_kernel_grad(tr_pre[syn], g1, ops[syn]["W"].shape)
                          + conv_kernel_grad(pre, g2, ops[syn]["W"].shape))
                else:
                    dw = tr_pre[syn].T @ g1 + pre.T @ g2
                axes = tuple(range(g1.ndim - 1))
                grads[id(ops[syn])]["W"] += dw
                grads[id(ops[syn])]["b"] += tr_one * g1.sum(axes) + g2.sum(axes)
            tr_post[syn] = psi if syn not in tr_post else lam_post * tr_post[syn] + psi
    return loss, ybar, grads


def expected_list(model_ops, ops, grads):
    """NumPy gradients in the order of model.trainable_variables (built from ``model_ops``,
    pairs of (keras layer, numpy op))."""
    out = []
    for layer, op in model_ops:
        if op["type"] == "bn":
            out += [grads[id(op)]["gamma"], grads[id(op)]["beta"]]
        else:
            out.append(grads[id(op)]["W"])
            if op["b"] is not None:
                out.append(grads[id(op)]["b"])
    return out


# ----------------------------------------------------------------------------- networks
def dense_network(rng, steps):
    keras.config.set_dtype_policy("float64")
    td = keras.layers.TimeDistributed
    d1 = keras.layers.Dense(5)
    d2 = keras.layers.Dense(4, use_bias=False)
    ro = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((steps, 6)), td(d1),
                              kspike.LIFNeurons(tau=2.0), td(d2),
                              kspike.LIFNeurons(tau=1.5, thr=0.8, v_reset=None), td(ro),
                              keras.layers.GlobalAveragePooling1D()])
    ops = [{"type": "dense", "W": rng.normal(size=(6, 5)) * 1.2, "b": rng.normal(size=5) * 0.3},
           {"type": "neuron", "tau": 2.0, "thr": 1.0, "v_reset": 0.0},
           {"type": "dense", "W": rng.normal(size=(5, 4)) * 1.5, "b": None},
           {"type": "neuron", "tau": 1.5, "thr": 0.8, "v_reset": None},
           {"type": "readout", "W": rng.normal(size=(4, 3)), "b": rng.normal(size=3) * 0.1}]
    d1.set_weights([ops[0]["W"], ops[0]["b"]])
    d2.set_weights([ops[2]["W"]])
    ro.set_weights([ops[4]["W"], ops[4]["b"]])
    return model, ops, [(d1, ops[0]), (d2, ops[2]), (ro, ops[4])]


def conv_network(rng, steps):
    keras.config.set_dtype_policy("float64")
    fold = kspike.FoldTime
    conv = keras.layers.Conv2D(2, 3, padding="same")
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    dense = keras.layers.Dense(4)
    ro = keras.layers.Dense(3)
    inputs = keras.Input((steps, 36))
    h = keras.layers.Reshape((steps, 6, 6, 1))(inputs)
    h = fold(conv)(h)
    h = fold(bn)(h)
    h = kspike.IFNeurons(thr=0.7, v_reset=None)(h)
    h = fold(keras.layers.AveragePooling2D(2))(h)
    h = fold(keras.layers.Flatten())(h)
    h = fold(dense)(h)
    h = kspike.LIFNeurons()(h)
    h = fold(ro)(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(h))
    ops = [{"type": "reshape", "shape": (6, 6, 1)},
           {"type": "conv", "W": rng.normal(size=(3, 3, 1, 2)), "b": rng.normal(size=2) * 0.2},
           {"type": "bn", "gamma": 1.0 + 0.3 * rng.normal(size=2),
            "beta": 0.3 + 0.2 * rng.normal(size=2), "eps": 1e-3},
           {"type": "neuron", "tau": None, "thr": 0.7, "v_reset": None},
           {"type": "avgpool"}, {"type": "flatten"},
           {"type": "dense", "W": rng.normal(size=(18, 4)) * 1.5, "b": rng.normal(size=4) * 0.2},
           {"type": "neuron", "tau": 2.0, "thr": 1.0, "v_reset": 0.0},
           {"type": "readout", "W": rng.normal(size=(4, 3)), "b": rng.normal(size=3) * 0.1}]
    conv.set_weights([ops[1]["W"], ops[1]["b"]])
    bn.set_weights([ops[2]["gamma"], ops[2]["beta"], np.zeros(2), np.ones(2)])
    dense.set_weights([ops[6]["W"], ops[6]["b"]])
    ro.set_weights([ops[8]["W"], ops[8]["b"]])
    return model, ops, [(conv, ops[1]), (bn, ops[2]), (dense, ops[6]), (ro, ops[8])], bn


def check(model, ops, pairs, x, target, factors, last_steps, feedback, secondary):
    rule = STLLR(factors=factors, last_steps=last_steps, feedback=feedback,
                 secondary_activation=secondary, seed=5)
    result = rule.compute(model, x, target, mse)
    matrices = [w.numpy() for w in rule.feedback_weights] or None
    loss, ybar, grads = numpy_stllr(ops, x, target, factors, last_steps, feedback, secondary,
                                    matrices)
    np.testing.assert_allclose(result.predictions.numpy(), ybar, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(float(result.loss), loss, rtol=RTOL)
    expected = expected_list(pairs, ops, grads)
    assert len(result.gradients) == len(expected) == len(model.trainable_variables)
    for got, want in zip(result.gradients, expected):
        want = np.broadcast_to(want, got.shape)
        assert np.abs(want).max() > 0          # every update is exercised
        np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=1e-12)
    return result


@pytest.mark.parametrize("feedback,last_steps,factors,secondary", [
    ("bp", None, (0.2, 0.75, -1.0, 1.0), None),
    ("bp", 3, (0.5, 0.9, 1.0, 0.5), "surrogate"),
    ("dfa", 2, (0.2, 0.75, -1.0, 1.0), None)])
def test_stllr_dense_layers_equal_numpy(rng, feedback, last_steps, factors, secondary):
    steps = 5
    model, ops, pairs = dense_network(rng, steps)
    x = rng.random((4, steps, 6)) * 2.0
    target = rng.normal(size=(4, 3))
    check(model, ops, pairs, x, target, factors, last_steps, feedback, secondary)


def test_stllr_conv2d_layers_equal_numpy(rng):
    steps = 4
    model, ops, pairs, bn = conv_network(rng, steps)
    x = rng.random((3, steps, 36)) * 2.0
    target = rng.normal(size=(3, 3))
    check(model, ops, pairs, x, target, (0.2, 0.75, -1.0, 1.0), 3, "bp", None)
    # The running statistics move once, towards the mean over steps of the step statistics.
    h = np.stack([conv_same(x[:, t].reshape(3, 6, 6, 1), ops[1]["W"], ops[1]["b"])
                  for t in range(steps)])
    mean = h.mean(axis=(1, 2, 3)).mean(0)
    var = h.var(axis=(1, 2, 3)).mean(0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-9)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-9)


# ----------------------------------------------------------------------------- bad input
def test_stllr_feedforward_refuses_unsupported_layers(rng):
    td = keras.layers.TimeDistributed
    model = keras.Sequential([keras.Input((4, 6)), td(keras.layers.Dense(5)),
                              kspike.LIFNeurons(), td(keras.layers.Dense(5), name="d2"),
                              td(keras.layers.Dropout(0.2), name="drop"), kspike.LIFNeurons(),
                              td(keras.layers.Dense(2))])
    x = rng.random((2, 4, 6)).astype("float32")
    with pytest.raises(ValueError, match=r"layer 'drop' \(TimeDistributed\).*Supported: chains"):
        STLLR().gradients(model, x, np.zeros((2, 4, 2), "float32"), "mse")
    # a neuron layer with no synapse before it
    model = keras.Sequential([keras.Input((4, 6)), td(keras.layers.Dense(5)),
                              kspike.LIFNeurons(), kspike.IFNeurons(name="lonely"),
                              td(keras.layers.Dense(2))])
    with pytest.raises(ValueError, match="neuron layer 'lonely' .IFNeurons. is not preceded by"):
        STLLR().gradients(model, x, np.zeros((2, 4, 2), "float32"), "mse")
    # two synapses in a row
    model = keras.Sequential([keras.Input((4, 6)), td(keras.layers.Dense(5), name="a"),
                              td(keras.layers.Dense(5), name="b"), kspike.LIFNeurons(),
                              td(keras.layers.Dense(2))])
    with pytest.raises(ValueError, match="synapse layer 'b'.*follows the synapse layer 'a'"):
        STLLR().gradients(model, x, np.zeros((2, 4, 2), "float32"), "mse")
    # a Dense with an activation as a synapse
    model = keras.Sequential([keras.Input((4, 6)),
                              td(keras.layers.Dense(5, activation="relu"), name="act"),
                              kspike.LIFNeurons(), td(keras.layers.Dense(2))])
    with pytest.raises(ValueError, match="'act'.*activation 'relu'"):
        STLLR().gradients(model, x, np.zeros((2, 4, 2), "float32"), "mse")


def test_stllr_feedforward_last_steps_larger_than_T(rng):
    td = keras.layers.TimeDistributed
    model = keras.Sequential([keras.Input((4, 6)), td(keras.layers.Dense(5)),
                              kspike.LIFNeurons(), td(keras.layers.Dense(2))])
    x = rng.random((2, 4, 6)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"`last_steps`=5 is larger than the 4 time steps"):
        STLLR(last_steps=5).gradients(model, x, np.zeros((2, 4, 2), "float32"), "mse")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"`x` must have shape \(None, 4, 6\)"):
        STLLR().gradients(model, x[:, :, :5], np.zeros((2, 4, 2), "float32"), "mse")
