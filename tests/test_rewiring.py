"""DEEP R rewiring: sparse sign-fixed kernels, the DeepR optimizer wrapper, saving, export.

Reference values come from independent NumPy re-implementations of docs/deep_r.md
written here (the random numbers of a step are taken from ``rewiring_draws``, the maths never).
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import rewiring

pytestmark = pytest.mark.heavy(100)

# --------------------------------------------------------------------------- helpers


def numpy_rewiring(thetas, masks, lr, l1, temperature, noise, keys, allowed):
    """docs/deep_r.md, steps 2-3, in NumPy (float32 like the variables)."""
    f32 = np.float32
    new_thetas, alive = [], []
    n_died = 0
    for theta, mask, eps in zip(thetas, masks, noise):
        theta = theta.astype(f32)
        was = mask > 0
        upd = theta
        if l1 > 0:
            upd = upd - f32(lr) * f32(l1)
        if temperature > 0:
            upd = upd + np.sqrt(f32(2.0) * f32(lr) * f32(temperature)) * eps.astype(f32)
        still = was & (upd > 0)
        n_died += int(was.sum() - still.sum())
        new_thetas.append(np.where(still, upd, f32(0)))
        alive.append(still)
    flat_free = np.concatenate([(~s & a).ravel() for s, a in zip(alive, allowed)])
    cand = np.flatnonzero(flat_free)
    order = cand[np.argsort(keys[cand], kind="stable")]
    born_flat = np.zeros(flat_free.size, bool)
    born_flat[order[:n_died]] = True
    out_t, out_m, start = [], [], 0
    for theta, still in zip(new_thetas, alive):
        born = born_flat[start:start + theta.size].reshape(theta.shape)
        start += theta.size
        out_t.append(np.where(born, f32(1e-12), theta))
        out_m.append((still | born).astype(f32))
    return out_t, out_m, n_died


def small_model(units=12, n_in=5, connectivity=0.3, dale=None, seed=0, steps=8, readout=2,
                layer=keras.layers.RNN, cell_cls=kspike.ALIF):
    cell = cell_cls(units, connectivity=connectivity, dale=dale, seed=seed, thr=0.05)
    return keras.Sequential([keras.Input((steps, n_in)),
                             layer(cell, return_sequences=True),
                             kspike.LeakyReadout(readout, seed=seed)])


def cell_of(model):
    return model.layers[0].cell


def state(model):
    kernels = rewiring.rewired_kernels(model)
    return [(k.magnitude.numpy().copy(), k.sign.numpy().copy(), k.mask.numpy().copy())
            for k in kernels]


def data(batch=8, steps=8, n_in=5, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((batch, steps, n_in)) < 0.3).astype("float32")
    y = rng.standard_normal((batch, steps, n_out)).astype("float32")
    return x, y


# --------------------------------------------------------------------------- initial state


def test_initial_connectivity_counts_signs_and_scale():
    magnitude, sign, mask = rewiring.initial_connectivity((40, 50), connectivity=0.12, seed=1)
    assert mask.sum() == int(40 * 50 * 0.12) == 240
    assert np.all(magnitude[mask == 0] == 0) and np.all(magnitude[mask == 1] > 0)
    assert set(np.unique(sign)) == {-1.0, 1.0}
    # abs(N(0,1))/sqrt(n_in) has mean sqrt(2/pi)/sqrt(40); 240 samples -> std error ~4%.
    assert abs(magnitude[mask == 1].mean() / (np.sqrt(2 / np.pi) / np.sqrt(40)) - 1) < 0.15
    again = rewiring.initial_connectivity((40, 50), connectivity=0.12, seed=1)
    for a, b in zip((magnitude, sign, mask), again):
        np.testing.assert_array_equal(a, b)

    magnitude, sign, mask = rewiring.initial_connectivity((30, 30), connectivity=1.0, dale=0.8,
                                                          zero_diagonal=True, seed=2)
    assert np.all(np.diag(mask) == 0) and mask.sum() == 30 * 29
    assert np.all(sign == sign[:, :1])                    # one sign per presynaptic neuron (row)
    assert (sign[:, 0] > 0).sum() == 24                   # round(0.8 * 30)
    # Float error in n * m * p must not lose a connection: 100 * 100 * 0.07 = 700.
    assert rewiring.initial_connectivity((100, 100), 0.07, seed=0)[2].sum() == 700


@pytest.mark.parametrize("kwargs, error", [
    (dict(shape=(3,), connectivity=0.1), ValueError),
    (dict(shape=(4, 4), connectivity=0.0), ValueError),
    (dict(shape=(4, 4), connectivity=1.5), ValueError),
    (dict(shape=(4, 4), connectivity="0.1"), TypeError),
    (dict(shape=(4, 4), dale=1.0), ValueError),
    (dict(shape=(4, 5), zero_diagonal=True), ValueError),
    (dict(shape=(4, 4), connectivity=0.01), ValueError),    # no connection left
    (dict(shape=(4, 4), seed=-1), TypeError),
])
def test_initial_connectivity_rejects_bad_input(kwargs, error):
    with pytest.raises(error) as info:
        rewiring.initial_connectivity(**kwargs)
    name = [k for k in kwargs if k != "shape"] or ["shape"]
    assert any(f"`{n}`" in str(info.value) for n in name + ["shape"])


def test_cell_kernels_are_sign_times_magnitude_on_active_entries_and_exact_zero_elsewhere():
    model = small_model(units=10, connectivity=0.25, dale=0.7, seed=4)
    cell = cell_of(model)
    w_in, w_rec, _ = cell.effective_kernels("float32")
    for kernel, w in zip(rewiring.rewired_kernels(model), (w_in, w_rec)):
        theta, sign, mask = kernel.magnitude.numpy(), kernel.sign.numpy(), kernel.mask.numpy()
        np.testing.assert_array_equal(w.numpy(), np.where(mask > 0, sign * theta, 0.0))
        assert np.all(np.sign(w.numpy())[mask > 0] == sign[mask > 0])
        assert np.all(sign == sign[:, :1])
    assert np.all(np.diag(w_rec.numpy()) == 0) and np.all(np.diag(cell._rewired[
        "recurrent"].mask.numpy()) == 0)
    assert rewiring.active_connections(model) == int(5 * 10 * 0.25) + int(10 * 10 * 0.25)
    assert rewiring.active_connections_per_matrix(model) == {
        "sequential/rnn/alif/input_kernel": 12, "sequential/rnn/alif/recurrent_kernel": 25}
    # Even a negative magnitude (plain optimizer, no DeepR) never flips a sign.
    kernel = rewiring.rewired_kernels(model)[0]
    kernel.magnitude.assign(-tf.abs(kernel.magnitude) - 1.0)
    assert np.all(kernel.effective().numpy() == 0)


def test_gradient_of_magnitude_is_sign_times_weight_gradient_on_all_entries():
    model = small_model(units=8, connectivity=0.3, seed=5)
    x, y = data(n_in=5)
    kernels = rewiring.rewired_kernels(model)
    cell = cell_of(model)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, [k.magnitude for k in kernels])
    # Same network with the effective weights in dense variables: dE/dW on every entry.
    dense = rewiring.to_dense(model)
    dense_cell = cell_of(dense)
    with tf.GradientTape() as tape:
        loss_dense = tf.reduce_mean((dense(x) - y) ** 2)
    dense_grads = tape.gradient(loss_dense, [dense_cell._input_kernel,
                                             dense_cell._recurrent_kernel])
    np.testing.assert_allclose(loss.numpy(), loss_dense.numpy(), rtol=0, atol=0)
    for g, gd, k in zip(grads, dense_grads, kernels):
        expected = k.sign.numpy() * gd.numpy()
        if k.zero_diagonal:    # the dense cell masks its diagonal, so dE/dW_ii is 0 there
            np.fill_diagonal(expected, 0.0)
            g = g.numpy() * (1 - np.eye(g.shape[0]))
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-8)
        # Dormant entries do receive a gradient (for the optimizer's moments).
        assert np.any(np.asarray(g)[k.mask.numpy() == 0] != 0)
    assert [tuple(w.shape) for w in cell.effective_kernels("float32")[:2]] == [(5, 8), (8, 8)]


# --------------------------------------------------------------------------- the step


@pytest.mark.parametrize("l1, temperature, lr", [(0.5, 0.0, 0.1), (0.02, 0.3, 0.05),
                                                 (0.0, 0.5, 0.2)])
def test_rewiring_step_matches_numpy(l1, temperature, lr):
    rng = np.random.default_rng(7)
    shapes = [(6, 9), (9, 9)]
    thetas, masks, allowed = [], [], [np.ones((6, 9), bool), ~np.eye(9, dtype=bool)]
    for shape, allow in zip(shapes, allowed):
        mask = (rng.random(shape) < 0.4) & allow
        thetas.append((np.abs(rng.standard_normal(shape)) * 0.1 * mask).astype("float32"))
        masks.append(mask.astype("float32"))
    # Optimizer moved dormant entries: they must come back to exactly 0.
    thetas = [(t + (m == 0) * 0.3).astype("float32") for t, m in zip(thetas, masks)]
    noise, keys = rewiring.rewiring_draws([3, 11], shapes)
    result = rewiring.rewiring_step(thetas, masks, lr, l1=l1, temperature=temperature,
                                    allowed=[None, allowed[1]], seed=[3, 11])
    exp_t, exp_m, died = numpy_rewiring(thetas, masks, lr, l1, temperature,
                                        [n.numpy() for n in noise], keys.numpy(), allowed)
    assert died > 0 and int(result.rewired) == died
    for got_t, got_m, e_t, e_m in zip(result.magnitudes, result.masks, exp_t, exp_m):
        np.testing.assert_array_equal(got_m.numpy(), e_m)
        np.testing.assert_allclose(got_t.numpy(), e_t, rtol=1e-6, atol=0)
    assert sum(m.sum() for m in exp_m) == sum(m.sum() for m in masks)
    assert np.all(np.diag(result.masks[1].numpy()) == 0)


def test_rewiring_step_rejects_bad_input():
    theta, mask = np.ones((2, 3), "float32"), np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match="`l1`"):
        rewiring.rewiring_step([theta], [mask], 0.1, l1=-1.0, seed=[0, 0])
    with pytest.raises(ValueError, match="same length"):
        rewiring.rewiring_step([theta], [mask, mask], 0.1, seed=[0, 0])
    with pytest.raises(ValueError, match="shape"):
        rewiring.rewiring_step([theta], [mask.T], 0.1, seed=[0, 0])
    with pytest.raises(ValueError, match="`seed`"):
        rewiring.rewiring_step([theta], [mask], 0.1)


def test_deepr_sgd_step_matches_numpy_reference():
    model = small_model(units=8, connectivity=0.3, seed=6)
    x, y = data()
    lr, l1, temperature = 0.05, 0.5, 0.01
    opt = kspike.DeepR(keras.optimizers.SGD(lr), l1=l1, temperature=temperature, seed=9)
    kernels = rewiring.rewired_kernels(model)
    for step in range(3):
        before = state(model)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        by_var = {id(v): g.numpy() for v, g in zip(model.trainable_variables, grads)}
        opt.apply(grads, model.trainable_variables)
        shapes = [k.shape for k in kernels]
        noise, keys = rewiring.rewiring_draws([9, step], shapes)
        after_sgd = [t - np.float32(lr) * by_var[id(k.magnitude)]
                     for (t, _, _), k in zip(before, kernels)]
        exp_t, exp_m, died = numpy_rewiring(after_sgd, [m for _, _, m in before], lr, l1,
                                            temperature, [n.numpy() for n in noise],
                                            keys.numpy(), [k.allowed for k in kernels])
        for k, e_t, e_m, (_, sign, _) in zip(kernels, exp_t, exp_m, before):
            np.testing.assert_array_equal(k.mask.numpy(), e_m)
            np.testing.assert_allclose(k.magnitude.numpy(), e_t, rtol=1e-5, atol=1e-9)
            np.testing.assert_array_equal(k.sign.numpy(), sign)
    assert int(opt.iterations.numpy()) == 3


def test_200_random_steps_keep_budget_signs_zeros_and_diagonal():
    model = small_model(units=10, connectivity=0.3, seed=1)
    x, y = data()
    opt = kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.05, temperature=0.01, seed=3)
    kernels = rewiring.rewired_kernels(model)
    signs = [k.sign.numpy().copy() for k in kernels]
    total = rewiring.active_connections(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb) - yb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return rewiring.active_connections(model)

    rng = np.random.default_rng(0)
    previous_masks = [k.mask.numpy() for k in kernels]
    changed = 0
    for _ in range(200):
        xb = (rng.random(x.shape) < 0.3).astype("float32")
        yb = rng.standard_normal(y.shape).astype("float32")
        assert int(train_step(xb, yb)) == total
        weights = cell_of(model).effective_kernels("float32")[:2]
        for k, sign, w, prev in zip(kernels, signs, weights, previous_masks):
            mask, w = k.mask.numpy(), w.numpy()
            np.testing.assert_array_equal(k.sign.numpy(), sign)
            assert np.all(w[mask == 0] == 0) and np.all(k.magnitude.numpy()[mask == 0] == 0)
            assert np.all(np.sign(w[mask > 0]) == sign[mask > 0])
            assert np.all(k.magnitude.numpy()[mask > 0] > 0)
            changed += int((mask != prev).sum())
        assert np.all(np.diag(kernels[1].mask.numpy()) == 0)
        previous_masks = [k.mask.numpy() for k in kernels]
    assert changed > 0 and int(opt.rewired_connections.numpy()) > 0
    assert rewiring.active_connections(model) == total


# The twin model is trained by the bare optimizer on purpose.
@pytest.mark.filterwarnings("ignore:The rewired kernel.*not wrapped in kspike.DeepR")
def test_without_noise_l1_or_deaths_the_update_is_the_wrapped_optimizers():
    model = small_model(units=8, connectivity=0.4, seed=2)
    twin = small_model(units=8, connectivity=0.4, seed=2)
    x, y = data()
    opt = kspike.DeepR(keras.optimizers.Adam(1e-4), l1=0.0, temperature=0.0, seed=0)
    plain = keras.optimizers.Adam(1e-4)
    for _ in range(5):
        for m, o in ((model, opt), (twin, plain)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((m(x) - y) ** 2)
            o.apply(tape.gradient(loss, m.trainable_variables), m.trainable_variables)
    assert int(opt.rewired_connections.numpy()) == 0          # precondition: nobody died
    for k, kt in zip(rewiring.rewired_kernels(model), rewiring.rewired_kernels(twin)):
        active = k.mask.numpy() > 0
        np.testing.assert_array_equal(k.mask.numpy(), kt.mask.numpy())
        np.testing.assert_allclose(k.magnitude.numpy()[active], kt.magnitude.numpy()[active],
                                   rtol=1e-6, atol=1e-9)
        # Adam moved dormant magnitudes of the twin; DeepR keeps them at exactly 0.
        assert np.all(k.magnitude.numpy()[~active] == 0)
        assert np.any(kt.magnitude.numpy()[~active] != 0)
    for a, b in zip(model.layers[1].weights, twin.layers[1].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)


def test_connections_die_and_are_reborn_when_the_task_pushes_weights_to_zero():
    model = small_model(units=10, connectivity=0.3, seed=8)
    x, _ = data()
    y = np.zeros((8, 8, 2), "float32")
    opt = kspike.DeepR(keras.optimizers.SGD(0.1), l1=0.2, temperature=0.0, seed=1)
    model.compile(optimizer=opt, loss="mse")
    total = rewiring.active_connections(model)
    first = [k.mask.numpy().copy() for k in rewiring.rewired_kernels(model)]
    model.fit(x, y, batch_size=8, epochs=15, verbose=0)
    deaths = int(opt.rewired_connections.numpy())
    assert deaths > 0
    assert rewiring.active_connections(model) == total
    reborn = sum(int(((k.mask.numpy() > 0) & (m == 0)).sum())
                 for k, m in zip(rewiring.rewired_kernels(model), first))
    assert reborn > 0
    # Connections reborn at the last step start from the tiny rebirth magnitude.
    mags = np.concatenate([k.magnitude.numpy().ravel() for k in rewiring.rewired_kernels(model)])
    assert np.any(mags == np.float32(1e-12))


def test_dale_law_per_presynaptic_neuron_after_training():
    model = small_model(units=12, connectivity=0.4, dale=0.8, seed=3)
    x, y = data()
    model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.05,
                                         temperature=0.05, seed=2), loss="mse")
    model.fit(x, y, batch_size=4, epochs=10, verbose=0)
    assert int(model.optimizer.rewired_connections.numpy()) > 0    # connections did move
    for w in cell_of(model).effective_kernels("float32")[:2]:
        w = w.numpy()
        assert np.all((w >= 0).all(axis=1) | (w <= 0).all(axis=1))   # one sign per row
        assert (w > 0).any() and (w < 0).any()


# --------------------------------------------------------------------------- optimizers


def test_learning_rate_schedules_and_adamw_in_model_fit():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = small_model(units=6, connectivity=0.5, seed=0)
    kernels = rewiring.rewired_kernels(model)
    opt = kspike.DeepR(keras.optimizers.SGD(schedule), l1=0.1, seed=0)
    x, _ = data()
    # A loss with zero gradient everywhere isolates the rewiring step: theta -= lr(t) * l1.
    for step in range(3):
        before = [k.magnitude.numpy() for k in kernels]
        grads = [tf.zeros_like(v) for v in model.trainable_variables]
        opt.apply(grads, model.trainable_variables)
        lr = np.float32(0.1 * 0.5 ** step)
        for k, b in zip(kernels, before):
            expected = np.where(b - lr * np.float32(0.1) > 0, b - lr * np.float32(0.1), 0)
            active = (expected > 0)
            np.testing.assert_allclose(k.magnitude.numpy()[active], expected[active],
                                       rtol=1e-6)

    model = small_model(units=6, connectivity=0.5, seed=0)
    x, y = data()
    opt = kspike.DeepR(keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(
        0.01, 10), weight_decay=0.01), l1=0.01, temperature=0.01, seed=0)
    model.compile(optimizer=opt, loss="mse")
    total = rewiring.active_connections(model)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert rewiring.active_connections(model) == total and int(opt.iterations.numpy()) == 4


def test_deepr_config_round_trip_and_validation():
    opt = kspike.DeepR(keras.optimizers.Adam(3e-3), l1=1e-3, temperature=1e-4, seed=5)
    clone = kspike.DeepR.from_config(json.loads(json.dumps(opt.get_config())))
    assert (clone.l1, clone.temperature, clone.seed) == (1e-3, 1e-4, 5)
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(float(clone.learning_rate.numpy()), 3e-3, rtol=1e-6)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, kspike.DeepR) and restored.seed == 5
    assert kspike.DeepR("sgd").inner_optimizer.__class__ is keras.optimizers.SGD
    with pytest.raises(TypeError, match="`optimizer`"):
        kspike.DeepR(object())
    with pytest.raises(TypeError, match="once"):
        kspike.DeepR(opt)
    with pytest.raises(ValueError, match="`l1`"):
        kspike.DeepR("adam", l1=-1.0)
    with pytest.raises(ValueError, match="`temperature`"):
        kspike.DeepR("adam", temperature=float("nan"))
    with pytest.raises(TypeError, match="`seed`"):
        kspike.DeepR("adam", seed=1.5)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        kspike.DeepR(keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="clipnorm"):
        kspike.DeepR("adam", clipnorm=1.0)


def test_model_without_rewired_kernels_is_plain_optimizer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    twin = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    twin.set_weights(model.get_weights())
    opt, plain = kspike.DeepR(keras.optimizers.Adam(0.1), seed=0), keras.optimizers.Adam(0.1)
    x = np.ones((4, 3), "float32")
    for m, o in ((model, opt), (twin, plain)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x) ** 2)
        grads = zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables)
        if o is opt:
            # Said clearly: DeepR over a model with nothing sparse does no rewiring at all.
            with pytest.warns(UserWarning, match="without any rewired kernel.*connectivity="):
                o.apply_gradients(grads)
        else:
            o.apply_gradients(grads)
    for a, b in zip(model.weights, twin.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert rewiring.active_connections(model) == 0


def test_active_connections_count_only_entries_with_positive_magnitude():
    model = small_model(units=10, connectivity=0.25, seed=4)
    kernel = rewiring.rewired_kernels(model)[1]
    total = rewiring.active_connections(model)
    mask = kernel.mask.numpy()
    rows, cols = np.nonzero(mask)
    theta = kernel.magnitude.numpy()
    theta[rows[:3], cols[:3]] = -0.5          # what a plain optimizer step can do
    theta[rows[3], cols[3]] = 0.0
    kernel.magnitude.assign(theta)
    assert rewiring.active_connections(model) == total - 4
    per_matrix = rewiring.active_connections_per_matrix(model)
    assert per_matrix[kernel.path] == int(np.sum((mask > 0) & (theta > 0))) == 25 - 4
    assert np.count_nonzero(kernel.effective().numpy()) == 25 - 4


def test_rewired_model_fit_without_deepr_warns_once_and_with_deepr_not():
    x, y = data()
    model = small_model(units=10, connectivity=0.25, seed=4)
    model.compile(keras.optimizers.SGD(50.0), "mse")
    with pytest.warns(UserWarning, match="not wrapped in kspike.DeepR") as record:
        model.fit(x, y, epochs=3, verbose=0)
    assert sum("not wrapped in kspike.DeepR" in str(w.message) for w in record) == 2  # 2 kernels
    # The large plain step pushes magnitudes below 0: the count says those entries are gone.
    kernels = rewiring.rewired_kernels(model)
    live = sum(int(np.sum((k.mask.numpy() > 0) & (k.magnitude.numpy() > 0))) for k in kernels)
    assert rewiring.active_connections(model) == live < 12 + 25
    model = small_model(units=10, connectivity=0.25, seed=4)
    model.compile(kspike.DeepR(keras.optimizers.SGD(50.0), seed=0), "mse")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=3, verbose=0)
    assert not [w for w in record if "DeepR" in str(w.message)]
    assert rewiring.active_connections(model) == 12 + 25


# --------------------------------------------------------------------------- saving, export


def _continue(model, x, y, steps=2):
    for _ in range(steps):
        model.train_on_batch(x, y)
    return state(model)


def test_keras_file_round_trip_continues_with_the_same_budget(tmp_path):
    model = small_model(units=8, connectivity=0.3, seed=2)
    x, y = data()
    model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1, temperature=0.01,
                                         seed=4), loss="mse")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    path = tmp_path / "sparse.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for (a, b, c), (d, e, f) in zip(state(model), state(loaded)):
        np.testing.assert_array_equal(a, d)
        np.testing.assert_array_equal(b, e)
        np.testing.assert_array_equal(c, f)
    assert isinstance(loaded.optimizer, kspike.DeepR)
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    total = rewiring.active_connections(model)
    assert rewiring.active_connections(loaded) == total
    # Same seed and iteration: the reloaded model rewires exactly like the original.
    for (a, b, c), (d, e, f) in zip(_continue(model, x, y), _continue(loaded, x, y)):
        np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(c, f)
    assert rewiring.active_connections(loaded) == total


def test_checkpoint_round_trip(tmp_path):
    x, y = data()

    def make(seed):
        model = small_model(units=8, connectivity=0.3, seed=seed)
        model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1,
                                             temperature=0.01, seed=4), loss="mse")
        return model

    model = make(2)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    other = make(3)                   # other signs, masks and magnitudes until restored
    other.train_on_batch(x, y)        # builds the optimizer
    tf.train.Checkpoint(model=other, optimizer=other.optimizer).restore(prefix).assert_consumed()
    assert int(other.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    assert int(other.optimizer.rewired_connections.numpy()) == int(
        model.optimizer.rewired_connections.numpy())
    for (a, b, c), (d, e, f) in zip(state(model), state(other)):
        np.testing.assert_array_equal(a, d)
        np.testing.assert_array_equal(b, e)
        np.testing.assert_array_equal(c, f)
    for (a, _, c), (d, _, f) in zip(_continue(model, x, y), _continue(other, x, y)):
        np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(c, f)


def test_dense_export_gives_identical_outputs(tmp_path):
    model = small_model(units=10, connectivity=0.2, dale=0.8, seed=7, cell_cls=kspike.LIF)
    x, y = data()
    model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.05, seed=1),
                  loss="mse")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    dense = rewiring.to_dense(model)
    assert cell_of(dense).connectivity is None and cell_of(dense).dale is None
    assert rewiring.rewired_kernels(dense) == []
    np.testing.assert_array_equal(dense(x).numpy(), model(x).numpy())
    path = tmp_path / "dense.keras"
    dense.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(reloaded(x).numpy(), model(x).numpy())
    with pytest.raises(TypeError, match="`model`"):
        rewiring.to_dense("not a model")
    unbuilt = keras.Sequential([keras.layers.RNN(kspike.LIF(4, connectivity=0.5))])
    with pytest.raises(ValueError, match="built"):
        rewiring.to_dense(unbuilt)
    with pytest.raises(ValueError, match="built"):
        rewiring.active_connections(unbuilt)
    with pytest.raises(TypeError, match="Keras model"):
        rewiring.active_connections("not a model")


def test_saved_model_export_of_a_rewired_model(tmp_path):
    model = small_model(units=8, connectivity=0.3, dale=0.8, seed=5)
    x, y = data()
    model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1, seed=0),
                  loss="mse")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    loaded = tf.saved_model.load(kspike.export.saved_model(model, str(tmp_path / "sm")))
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), model(x).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_spiking_rnn_engine_and_keras_rnn_agree_on_a_rewired_cell():
    keras_model = small_model(units=8, connectivity=0.3, seed=3)
    engine_model = small_model(units=8, connectivity=0.3, seed=3, layer=kspike.SpikingRNN)
    for a, b in zip(keras_model.weights, engine_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x, y = data()
    np.testing.assert_allclose(engine_model(x).numpy(), keras_model(x).numpy(),
                               rtol=1e-5, atol=1e-6)
    engine_model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1, seed=0),
                         loss="mse")
    total = rewiring.active_connections(engine_model)
    engine_model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert rewiring.active_connections(engine_model) == total


# --------------------------------------------------------------------------- distribution

_MIRRORED = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, kspike
    from kspike import rewiring
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 5)),
            keras.layers.RNN(kspike.ALIF(10, connectivity=0.3, seed=1, thr=0.05),
                             return_sequences=True),
            kspike.LeakyReadout(2, seed=0)])
        opt = kspike.DeepR(keras.optimizers.Adam(0.05), l1=1.0, temperature=0.05, seed=3)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
    total = rewiring.active_connections(model)
    rng = np.random.default_rng(0)
    x = (rng.random((16, 8, 5)) < 0.3).astype("float32")
    y = rng.standard_normal((16, 8, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert rewiring.active_connections(model) == total, "budget"
    assert int(opt.rewired_connections.numpy()) > 0, "no rewiring happened"
    def agree(model):
        for k in rewiring.rewired_kernels(model):
            for var in (k.magnitude, k.mask, k.sign):
                copies = [v.numpy() for v in var.value.values]
                assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), var.path

    agree(model)
    # The same through kspike.Trainer with the strategy.
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 5)),
            kspike.SpikingRNN(kspike.ALIF(10, connectivity=0.3, seed=2, thr=0.05),
                              return_sequences=True),
            kspike.LeakyReadout(2, seed=0)])
        opt = kspike.DeepR(keras.optimizers.Adam(0.05), l1=1.0, temperature=0.05, seed=3)
    total = rewiring.active_connections(model)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    kspike.Trainer(model, opt, keras.losses.MeanSquaredError(), strategy=strategy,
                   verbose=0).fit(ds, epochs=2)
    assert rewiring.active_connections(model) == total, "budget (Trainer)"
    assert int(opt.rewired_connections.numpy()) > 0, "no rewiring happened (Trainer)"
    agree(model)
    print("REPLICAS_AGREE", total)
""")


def test_mirrored_strategy_replicas_agree():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True,
                          env=env, timeout=1200)   # generous: shared, loaded CI machines
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REPLICAS_AGREE" in proc.stdout


# --------------------------------------------------------------------------- training loops


def test_trainer_with_deepr_keeps_budget_logs_it_and_resumes(tmp_path):
    x, y = data(batch=16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def make(directory):
        model = small_model(units=8, connectivity=0.3, seed=4, layer=kspike.SpikingRNN)
        opt = kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1, temperature=0.02, seed=0)
        return model, opt, kspike.Trainer(model, opt, keras.losses.MeanSquaredError(),
                                          verbose=0, checkpoint_dir=directory)

    model, opt, trainer = make(str(tmp_path / "a"))
    total = rewiring.active_connections(model)
    history = trainer.fit(ds, epochs=3)
    assert int(opt.iterations.numpy()) == 6 and int(opt.rewired_connections.numpy()) > 0
    assert rewiring.active_connections(model) == total
    assert history.history["active_connections"] == [total] * 3

    # Two epochs, then a fresh process-like restart resuming for the third: same result.
    resumed, opt2, trainer2 = make(str(tmp_path / "b"))
    trainer2.fit(ds, epochs=2)
    resumed, opt2, trainer2 = make(str(tmp_path / "b"))
    trainer2.fit(ds, epochs=3)
    assert int(opt2.iterations.numpy()) == 6
    for (a, b, c), (d, e, f) in zip(state(model), state(resumed)):
        np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(b, e)
        np.testing.assert_array_equal(c, f)


def test_mixed_precision_model_fit_with_deepr():
    keras.config.set_dtype_policy("mixed_float16")
    model = small_model(units=8, connectivity=0.3, seed=4)
    x, y = data()
    model.compile(optimizer=kspike.DeepR(keras.optimizers.Adam(0.05), l1=0.1, seed=0),
                  loss="mse")
    # Keras puts its loss-scale wrapper around DeepR; non-finite steps then skip the rewiring.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, kspike.DeepR)
    kernel = rewiring.rewired_kernels(model)[0]
    assert kernel.magnitude.dtype == "float32" and kernel.mask.dtype == "float32"
    total = rewiring.active_connections(model)
    model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert rewiring.active_connections(model) == total
    assert int(model.optimizer.iterations.numpy()) == 6
