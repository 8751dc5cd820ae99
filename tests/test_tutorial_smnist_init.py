"""LSNN's sign-constrained initialisation used by bin/tutorial_sequential_mnist_with_LSNN.py."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tutorial():
    path = os.path.join(ROOT, "bin", "tutorial_sequential_mnist_with_LSNN.py")
    spec = importlib.util.spec_from_file_location("tutorial_smnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signs(n, excitatory, seed):
    sign = -np.ones(n)
    sign[np.random.default_rng(seed).permutation(n)[:excitatory]] = 1.0
    return sign


def test_square_matrix_is_balanced_per_neuron_with_unit_spectral_radius(tutorial):
    sign = _signs(40, 30, 0)
    theta = tutorial.balanced_magnitudes(sign, 40, np.random.default_rng(1))
    assert theta.shape == (40, 40)
    assert (theta > 0).all()
    w = sign[:, None] * theta
    # Every postsynaptic neuron receives as much excitation as inhibition.
    np.testing.assert_allclose(w.sum(axis=0), 0.0, atol=1e-10)
    assert abs(np.max(np.abs(np.linalg.eigvals(w))) - 1.0) < 1e-9
    # Inhibitory rows were scaled up to balance the 3:1 excitatory majority.
    assert theta[sign < 0].mean() > 2.0 * theta[sign > 0].mean()


def test_rectangular_matrices_take_columns_of_the_balanced_square(tutorial):
    sign = _signs(12, 9, 2)
    wide = tutorial.balanced_magnitudes(sign, 30, np.random.default_rng(3))
    narrow = tutorial.balanced_magnitudes(sign, 5, np.random.default_rng(3))
    square = tutorial.balanced_magnitudes(sign, 12, np.random.default_rng(3))
    assert wide.shape == (12, 30) and narrow.shape == (12, 5)
    np.testing.assert_array_equal(narrow, square[:, :5])
    np.testing.assert_allclose((sign[:, None] * wide).sum(axis=0), 0.0, atol=1e-10)
    # Each wide column is one of the square's columns.
    for k in range(30):
        assert np.min(np.abs(square - wide[:, k:k + 1]).sum(axis=0)) < 1e-12


def test_one_sign_only_skips_balancing(tutorial):
    theta = tutorial.balanced_magnitudes(np.ones(6), 6, np.random.default_rng(4))
    assert (theta > 0).all()
    assert abs(np.max(np.abs(np.linalg.eigvals(theta))) - 1.0) < 1e-9


def test_model_uses_balanced_sparse_kernels_and_lsnn_sign_order(tutorial):
    import kspike
    args = tutorial.parse_args(["--quick"])
    model = tutorial.build_model(args)
    cell = model.get_layer("lsnn").cell
    readout = model.get_layer("readout")
    recurrent = cell._rewired["recurrent"]
    n = cell.units
    row = recurrent.sign.numpy()[:, 0]
    n_inhibitory = int(np.sum(row < 0))
    np.testing.assert_array_equal(row, np.r_[-np.ones(n_inhibitory), np.ones(n - n_inhibitory)])
    np.testing.assert_array_equal(readout._sparse_kernel.sign.numpy()[:, 0], row)
    assert n - n_inhibitory == 15                             # round(0.75 * 20), the default
    for sign_count, n_in_excitatory, n_rec_excitatory in (("lsnn", 61, 16),
                                                          ("kspike", 60, 15)):
        for cue_sign in ("excitatory", "random"):
            for seed in range(4):
                other = tutorial.parse_args(["--quick", "--seed", str(seed), "--cue-sign",
                                             cue_sign, "--sign-count", sign_count])
                other_cell = tutorial.build_model(other).get_layer("lsnn").cell
                input_row = other_cell._rewired["input"].sign.numpy()[:, 0]
                rec_row = other_cell._rewired["recurrent"].sign.numpy()[:, 0]
                # int(0.75 * 80) + 1 (LSNN) or round(0.75 * 80) (kspike), cue swap included
                assert int(np.sum(input_row > 0)) == n_in_excitatory
                assert int(np.sum(rec_row > 0)) == n_rec_excitatory
                assert set(np.unique(input_row)) == {-1.0, 1.0}
                if cue_sign == "excitatory":
                    assert input_row[-1] == 1.0              # the cue is the last channel
    counts = kspike.rewiring.active_connections_per_matrix(model)
    assert counts[readout._sparse_kernel.path] == int(n * 10 * args.connectivity)
    for kernel in list(cell._rewired.values()) + [readout._sparse_kernel]:
        theta, mask = kernel.magnitude.numpy(), kernel.mask.numpy()
        assert (theta[mask == 0] == 0).all() and (theta[mask > 0] > 0).all()


def test_excitatory_counts(tutorial):
    assert [tutorial.lsnn_excitatory_count(0.75, n) for n in (80, 220, 20, 4)] == [61, 166, 16, 4]
    import keras
    sign = keras.Variable(np.repeat(_signs(10, 5, 7)[:, None], 3, axis=1).astype("float32"))
    before = sign.numpy()[:, 0].copy()
    for target in (8, 2):
        tutorial.set_excitatory_count(sign, target, seed=0)
        row = sign.numpy()
        assert int(np.sum(row[:, 0] > 0)) == target
        np.testing.assert_array_equal(row, np.repeat(row[:, :1], 3, axis=1))
    tutorial.set_excitatory_count(sign, 5, seed=0)
    assert int(np.sum(sign.numpy()[:, 0] > 0)) == 5
    # Only the rows needed change sign: going 5 -> 8 keeps the 5 excitatory rows.
    sign.assign(np.repeat(before[:, None], 3, axis=1))
    tutorial.set_excitatory_count(sign, 8, seed=1)
    assert (sign.numpy()[before > 0, 0] == 1.0).all()


def test_stllr_defaults_and_window_checks(tutorial):
    args = tutorial.parse_args(["--quick", "--rule", "stllr"])
    assert tuple(args.stllr_factors) == tutorial.STLLR_FACTORS
    assert args.stllr_secondary_activation == tutorial.STLLR_SECONDARY_ACTIVATION
    # The loss, and S-TLLR's updates, cover the window the class is read from.
    assert args.loss_window == args.readout_window == args.stllr_last_steps == 28
    assert args.loss_average == "logits"
    assert args.learning_rate == tutorial.STLLR_LEARNING_RATE
    assert tutorial.parse_args(["--quick"]).learning_rate == 1e-2
    args = tutorial.parse_args(["--quick", "--rule", "stllr", "--loss-window", "420",
                                "--loss-average", "loss"])
    assert args.loss_window == args.stllr_last_steps == 420
    for flag, value in (("--loss-window", "0"), ("--readout-window", "841"),
                        ("--stllr-last-steps", "-1")):
        with pytest.raises(SystemExit):
            tutorial.parse_args(["--quick", flag, value])


@pytest.mark.parametrize("readout_only", [False, True])
def test_train_readout_only_freezes_the_spiking_layer(tutorial, readout_only):
    import keras
    import tensorflow as tf
    argv = ["--quick", "--rule", "stllr"] + (["--train-readout-only"] if readout_only else [])
    args = tutorial.parse_args(argv)
    keras.utils.set_random_seed(3)
    model = tutorial.build_model(args)
    trainer, rule = tutorial.make_trainer(args, model)
    assert rule.factors == tutorial.STLLR_FACTORS
    assert rule.secondary_activation == "surrogate" and rule.last_steps == 28
    rng = np.random.default_rng(0)
    x = (rng.random((8, 60, 80)) < 0.2).astype("float32")
    y = rng.integers(0, 10, 8).astype("int32")
    lsnn, readout = model.get_layer("lsnn"), model.get_layer("readout")
    before = [w.numpy().copy() for w in lsnn.weights], [w.numpy().copy() for w in readout.weights]
    trainer.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps=2, verbose=0)
    changed = [[not np.array_equal(a, w.numpy()) for a, w in zip(old, layer.weights)]
               for old, layer in zip(before, (lsnn, readout))]
    assert any(changed[1])                            # the readout learns in both cases
    assert any(changed[0]) != readout_only            # S-TLLR moves the spiking layer's weights
