"""The local rules' native helper ops: kspike.engine.linear_filter (KspikeLinearFilter) against
a NumPy recursion and the tf.scan it replaces (bit for bit), its gradient against autodiff of
the scan; kspike.engine.sparse_transpose_matmul (KspikeSparseTransposeProduct) against NumPy;
S-TLLR's modulation (KspikeStllrModulation) against its TensorFlow form and NumPy; dispatch."""
import numpy as np
import pytest
import tensorflow as tf

from kspike import engine, native
from kspike.learning import stllr

pytestmark = pytest.mark.skipif(not native.available(), reason="native library unavailable")


def numpy_filter(seq, decay, gain, initial, reverse):
    seq = np.asarray(seq)
    dtype = seq.dtype.type
    decay, gain = dtype(decay), dtype(gain)
    out = np.empty_like(seq)
    carry = np.asarray(initial, seq.dtype).copy()
    order = range(len(seq) - 1, -1, -1) if reverse else range(len(seq))
    for t in order:
        carry = decay * carry + gain * seq[t]
        out[t] = carry
    return out


def scan_filter(seq, decay, gain, initial, reverse):
    if gain == 1.0:
        step = lambda carry, s: decay * carry + s
    else:
        step = lambda carry, s: decay * carry + gain * s
    return tf.scan(step, seq, initializer=initial, reverse=reverse)


CASES = [  # shape, decay, gain, reverse, with_initial
    ((120, 4, 300), 0.75, 1.0, False, False),
    ((120, 4, 300), 0.75, 1.0, True, False),
    ((50, 3, 10), 0.951229424500714, 1.0 - 0.951229424500714, False, True),
    ((50, 3, 10), 0.951229424500714, 1.0 - 0.951229424500714, True, True),
    ((1, 2, 5), 0.2, 1.0, False, True),
    ((37,), 0.99, 0.5, True, True),
    ((20, 2, 1100), 0.5, 2.0, False, True),        # columns over several blocks and threads
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,decay,gain,reverse,with_initial", CASES)
def test_native_filter_equals_the_scan_bit_for_bit(dtype, shape, decay, gain, reverse,
                                                    with_initial):
    rng = np.random.default_rng(0)
    seq = rng.standard_normal(shape).astype(dtype)
    initial = rng.standard_normal(shape[1:]).astype(dtype) if with_initial else None
    got = engine.linear_filter(tf.constant(seq), decay, gain, initial=initial,
                               reverse=reverse).numpy()
    start = np.zeros(shape[1:], dtype) if initial is None else initial
    want = numpy_filter(seq, decay, gain, start, reverse)
    np.testing.assert_array_equal(got, want)
    scanned = scan_filter(tf.constant(seq), decay, gain, tf.constant(start), reverse).numpy()
    np.testing.assert_array_equal(got, scanned)
    fallback = engine.linear_filter(tf.constant(seq), decay, gain, initial=initial,
                                    reverse=reverse, native=False).numpy()
    np.testing.assert_array_equal(fallback, scanned)


def test_native_filter_runs_inside_tf_function_and_the_op_is_used():
    seq = tf.constant(np.random.default_rng(1).random((30, 2, 7)), tf.float32)

    @tf.function
    def run(s):
        return engine.linear_filter(s, 0.9, 0.1, reverse=True)

    graph = run.get_concrete_function(seq).graph
    assert "KspikeLinearFilter" in {op.type for op in graph.get_operations()}
    np.testing.assert_array_equal(run(seq).numpy(),
                                  numpy_filter(seq.numpy(), 0.9, 0.1, np.zeros((2, 7)), True))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gain", [1.0, 0.3])
def test_gradient_equals_autodiff_of_the_scan(reverse, gain):
    rng = np.random.default_rng(2)
    seq = tf.constant(rng.standard_normal((40, 3, 6)))
    initial = tf.constant(rng.standard_normal((3, 6)))
    weights = tf.constant(rng.standard_normal((40, 3, 6)))
    grads = []
    for fn in (lambda s, i: engine.linear_filter(s, 0.8, gain, initial=i, reverse=reverse),
               lambda s, i: scan_filter(s, 0.8, gain, i, reverse)):
        with tf.GradientTape() as tape:
            tape.watch([seq, initial])
            loss = tf.reduce_sum(weights * fn(seq, initial) ** 2)
        grads.append([g.numpy() for g in tape.gradient(loss, [seq, initial])])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(grads[0][1]).max() > 0.1


def test_native_false_and_xla_use_the_scan():
    seq = tf.ones((5, 2), tf.float32)

    @tf.function(jit_compile=True)
    def compiled(s):
        return engine.linear_filter(s, 0.5)

    graph = compiled.get_concrete_function(seq).graph
    assert "KspikeLinearFilter" not in {op.type for op in graph.get_operations()}
    np.testing.assert_allclose(compiled(seq).numpy()[-1], [2 - 0.5 ** 4] * 2, rtol=1e-6)

    @tf.function
    def plain(s):
        return engine.linear_filter(s, 0.5, native=False)

    graph = plain.get_concrete_function(seq).graph
    assert "KspikeLinearFilter" not in {op.type for op in graph.get_operations()}


def test_initial_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"initial.*\(2, 3\).*\(3, 2\)"):
        engine.linear_filter(tf.ones((4, 2, 3)), 0.5, initial=tf.zeros((3, 2)))


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.6])
@pytest.mark.parametrize("shape", [(3000, 80, 256), (513, 300, 64), (7, 5, 100)])
def test_sparse_transpose_matmul_equals_numpy(density, shape):
    rows, p, q = shape
    rng = np.random.default_rng(3)
    a = np.where(rng.random((rows, p)) < density, rng.choice([1.0, 0.5, -2.0], (rows, p)),
                 0.0).astype("float32")
    b = rng.standard_normal((rows, q)).astype("float32")
    want = a.astype("float64").T @ b.astype("float64")
    got = engine.sparse_transpose_matmul(tf.constant(a), tf.constant(b)).numpy()
    scale = np.abs(a).T.astype("float64") @ np.abs(b).astype("float64") + 1e-30
    assert got.shape == (p, q) and got.dtype == np.float32
    assert np.max(np.abs(got - want) / np.maximum(scale, 1.0)) < 1e-5
    if density == 0.0:
        assert not got.any()


def test_sparse_transpose_matmul_in_a_graph_and_its_fallbacks():
    a = tf.constant((np.arange(12).reshape(4, 3) % 5 == 0).astype("float32"))
    b = tf.constant(np.arange(8, dtype="float32").reshape(4, 2))

    @tf.function
    def run(a, b):
        return engine.sparse_transpose_matmul(a, b)

    ops = {op.type for op in run.get_concrete_function(a, b).graph.get_operations()}
    assert "KspikeSparseTransposeProduct" not in ops          # narrow b: tf.matmul
    wide = tf.tile(b, (1, 40))
    wide_ops = {op.type for op in run.get_concrete_function(a, wide).graph.get_operations()}
    assert "KspikeSparseTransposeProduct" in wide_ops
    np.testing.assert_array_equal(run(a, wide).numpy(), a.numpy().T @ wide.numpy())
    want = a.numpy().T @ b.numpy()
    np.testing.assert_array_equal(run(a, b).numpy(), want)
    np.testing.assert_array_equal(
        engine.sparse_transpose_matmul(tf.cast(a, tf.float64), tf.cast(b, tf.float64)).numpy(),
        want)
    np.testing.assert_array_equal(engine.sparse_transpose_matmul(a, b, native=False).numpy(),
                                  want)


def numpy_modulation(psi, signal, before, factors):
    lambda_post, lambda_pre, alpha_post, alpha_pre = (psi.dtype.type(f) for f in factors)
    post, m = before.copy(), np.empty_like(psi)
    for t in range(len(psi)):
        m[t] = (alpha_post * post) * signal[t]
        post = lambda_post * post + psi[t]
    ubar = np.zeros_like(before)
    for t in range(len(psi) - 1, -1, -1):
        ubar = lambda_pre * ubar + (alpha_pre * psi[t]) * signal[t]
        m[t] = m[t] + ubar
    return m, ubar


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(100, 4, 70), (1, 2, 3), (40, 3, 600)])
def test_stllr_modulation_native_equals_its_tensorflow_form_bit_for_bit(dtype, shape):
    rng = np.random.default_rng(4)
    psi = rng.random(shape).astype(dtype)
    signal = rng.standard_normal(shape).astype(dtype)
    before = rng.random(shape[1:]).astype(dtype)
    factors = (0.2, 0.75, -1.0, 1.0)
    args = [tf.constant(a) for a in (psi, signal, before)]
    ops = engine.native_rule_ops(dtype)
    m, u0 = ops.kspike_stllr_modulation(*args, tf.constant(factors, dtype))
    want_m, want_u0 = numpy_modulation(psi, signal, before, factors)
    np.testing.assert_array_equal(m.numpy(), want_m)
    np.testing.assert_array_equal(u0.numpy(), want_u0)
    native_m, native_u0 = stllr._modulation(*args, factors)
    np.testing.assert_array_equal(native_m.numpy(), want_m)
    from unittest import mock
    with mock.patch.object(engine, "native_rule_ops", lambda dtype: None):
        tf_m, tf_u0 = stllr._modulation(*args, factors)
    np.testing.assert_array_equal(tf_m.numpy(), want_m)
    np.testing.assert_array_equal(tf_u0.numpy(), want_u0)


@pytest.mark.parametrize("surrogate", [None, "triangular", "sigmoid", "multi_gaussian"])
@pytest.mark.parametrize("adaptive,refractory", [(True, True), (False, False), (False, True)])
def test_native_pseudo_derivative_equals_the_rule_psi(surrogate, adaptive, refractory):
    import kspike
    from kspike import dynamics
    rng = np.random.default_rng(5)
    shape = (30, 4, 50)
    thr = 0.05
    v = rng.uniform(-0.02, 0.12, shape).astype("float32")
    A = (thr + rng.uniform(0.0, 0.05, shape)).astype("float32") if adaptive else thr
    allowed = (rng.random(shape) < 0.8).astype("uint8") if refractory else None
    cell = kspike.ALIF(50, n_adaptive=50 if adaptive else 0, thr=thr,
                       n_refractory=2 if refractory else 0,
                       surrogate=surrogate or "triangular")
    params = cell.parameters("float32")
    rule = kspike.learning.STLLR(online=False,
                                 secondary_activation=None if surrogate is None else "surrogate")
    rec = {"v": tf.constant(v), "A": A if not adaptive else tf.constant(A),
           "allowed": None if allowed is None else tf.constant(allowed.astype(bool)),
           "allowed_u8": None if allowed is None else tf.constant(allowed)}
    got = rule._native_psi(rec, params)
    assert got is not None
    state = dynamics.NeuronState(v=rec["v"], b=None, z=None, r=None)
    want = rule._psi(state, rec["A"], params, rec["allowed"]).numpy()
    if surrogate in (None, "triangular"):
        np.testing.assert_array_equal(got.numpy(), want)          # no transcendental functions
    else:
        # exp and 1 - sigmoid: float32 round-off of std::exp against Eigen's exp.
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert (want != 0).any()
    if refractory:
        assert not got.numpy()[allowed == 0].any()
