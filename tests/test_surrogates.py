"""Surrogate spike functions against their formulas (docs/surrogates.md), written here in
NumPy independently of kspike."""
import math

import keras

import numpy as np
import pytest
import tensorflow as tf

import kspike
from kspike import surrogates

GAMMA, S, Q = 0.7, 2.5, 2.3


def _normal(x, mu, sd):
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * np.sqrt(2.0 * np.pi))


def _multi_gaussian(x, g, s):
    h, sigma = 0.15, 0.5 / s

    def bracket(u):
        return ((1 + h) * _normal(u, 0.0, sigma) - h * _normal(u, sigma, 6 * sigma)
                - h * _normal(u, -sigma, 6 * sigma))

    return g * bracket(x) / bracket(0.0)


def _sig(u):
    return 1.0 / (1.0 + np.exp(-u))


# psi(x) of docs/surrogates.md, gamma = g, sharpness = s, tail = q.
FORMULAS = {
    "rectangular": lambda x, g, s, q: g * (np.abs(2 * s * x) < 1).astype(float),
    "triangular": lambda x, g, s, q: g * np.maximum(0.0, 1 - np.abs(s * x)),
    "exponential": lambda x, g, s, q: g * np.exp(-2 * np.abs(s * x)),
    "gaussian": lambda x, g, s, q: g * np.exp(-np.pi * (s * x) ** 2),
    "sigmoid": lambda x, g, s, q: 4 * g * _sig(4 * s * x) * (1 - _sig(4 * s * x)),
    "fast_sigmoid": lambda x, g, s, q: g / (1 + 2 * np.abs(s * x)) ** 2,
    "ntail": lambda x, g, s, q: g * (1 + 2 * np.abs(s * x) / (q - 1)) ** (-q),
    "cauchy": lambda x, g, s, q: g / (1 + (np.pi * s * x) ** 2),
    "multi_gaussian": lambda x, g, s, q: _multi_gaussian(x, g, s),
}
ALIASES = {"superspike": "fast_sigmoid", "arctan": "cauchy", "q_pseudospike": "ntail"}


def _points(s):
    """Many points including 0, the support edges (+-1/(2s), +-1/s) and just inside/outside."""
    grid = np.linspace(-3.0, 3.0, 601) / s
    edges = np.array([1 / (2 * s), 1 / s])
    eps = 1e-4 / s
    special = np.concatenate([[0.0], edges, -edges, edges - eps, edges + eps,
                              -edges + eps, -edges - eps, [1e-7, -1e-7, 10.0, -10.0]])
    return np.concatenate([grid, special])


def _make(name, gamma=GAMMA, s=S, q=Q):
    params = {"dampening": gamma, "sharpness": s}
    if name == "ntail":
        params["tail"] = q
    return surrogates.get(name, **params)


def test_catalogue_is_complete():
    assert surrogates.available() == sorted(FORMULAS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pseudo_derivative_matches_formula(dtype):
    for name in sorted(FORMULAS):
        _check_formula(name, dtype)


def _check_formula(name, dtype):
    x = _points(S)
    f = _make(name)
    got = f.pseudo_derivative(tf.constant(x, dtype)).numpy()
    assert got.dtype == np.dtype(dtype)
    want = FORMULAS[name](x.astype(dtype).astype(np.float64), GAMMA, S, Q)
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * GAMMA, err_msg=name)
    # Peak gamma at 0 for every function of the catalogue.
    assert f.pseudo_derivative(tf.constant(0.0, dtype)).numpy() == pytest.approx(GAMMA, rel=tol)


def test_default_parameters():
    x = _points(1.0)
    for name in sorted(FORMULAS):
        f = surrogates.get(name)
        np.testing.assert_allclose(f.pseudo_derivative(tf.constant(x, "float64")).numpy(),
                                   FORMULAS[name](x, 0.3, 1.0, 1.56), rtol=1e-12, atol=1e-14,
                                   err_msg=name)


def test_support_edges_are_strict():
    # rectangular: |2 s x| < 1 is strict, so the edge itself is outside.
    rect = _make("rectangular")
    edge = 1 / (2 * S)
    vals = rect.pseudo_derivative(tf.constant([edge, -edge, edge * 0.999, 0.0], "float64"))
    np.testing.assert_array_equal(vals.numpy(), [0.0, 0.0, GAMMA, GAMMA])
    tri = _make("triangular")
    vals = tri.pseudo_derivative(tf.constant([1 / S, -1 / S, 2 / S], "float64"))
    np.testing.assert_array_equal(vals.numpy(), [0.0, 0.0, 0.0])


def _multi_gaussian_area(g, s):
    # Integral of the bracket is (1 + h) - h - h; divided by the bracket at 0 (peak scaling).
    h, sigma = 0.15, 0.5 / s
    bracket0 = ((1 + h) - 2 * h / 6 * math.exp(-1 / 72)) / (sigma * math.sqrt(2 * math.pi))
    return g * (1 - h) / bracket0


def test_area():
    # "Peak gamma at 0, area gamma/s" (ntail: the integral of (1 + u)^-q is 1/(q - 1), so its
    # area is gamma/s too); the multi-Gaussian, rescaled to peak gamma, has its own area.
    x = np.linspace(-400.0, 400.0, 2_000_001) / S
    for name in sorted(FORMULAS):
        area = np.trapezoid(_make(name).pseudo_derivative(tf.constant(x, "float64")).numpy(), x)
        want = _multi_gaussian_area(GAMMA, S) if name == "multi_gaussian" else GAMMA / S
        assert area == pytest.approx(want, rel=2e-3), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_forward_is_exact_heaviside(dtype):
    x = np.array([-2.0, -1e-3, 0.0, 1e-3, 0.5, 3.0])
    for name in sorted(FORMULAS):
        z = _make(name)(tf.constant(x, dtype))
        assert z.dtype == tf.as_dtype(dtype)
        # H(0) = 0, and exactly 0/1 (the stop-gradient bracket cancels exactly).
        np.testing.assert_array_equal(tf.cast(z, "float64").numpy(), [0, 0, 0, 1, 1, 1],
                                      err_msg=name)
    np.testing.assert_array_equal(
        tf.cast(surrogates.heaviside(tf.constant(x, dtype)), "float64").numpy(), x > 0)


def test_forward_exact_for_large_inputs():
    # x * sg(psi) - sg(x * psi) must cancel exactly even where the product is large.
    x = tf.constant(np.array([-1e6, -123.456, 1e-30, 789.0, 1e6]), "float32")
    for name in sorted(FORMULAS):
        np.testing.assert_array_equal(_make(name)(x).numpy(), [0, 0, 1, 1, 1], err_msg=name)


def test_gradient_equals_pseudo_derivative():
    x = tf.constant(_points(S), "float64")
    weights = np.linspace(0.5, 2.0, x.shape[0])
    for name in sorted(FORMULAS):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = _make(name)(x) * tf.constant(weights, "float64")
        grad = tape.gradient(y, x).numpy()
        want = FORMULAS[name](x.numpy(), GAMMA, S, Q) * weights
        np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-15, err_msg=name)


def test_gradient_inside_tf_function_float32():
    f = _make("triangular")
    x = tf.constant([-0.5, -0.1, 0.0, 0.1, 0.3], "float32")

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(f(x))
        return tape.gradient(y, x)

    np.testing.assert_allclose(grad(x).numpy(), FORMULAS["triangular"](x.numpy(), GAMMA, S, Q),
                               rtol=1e-6)


def test_get_config_round_trip():
    for name in sorted(FORMULAS) + sorted(ALIASES):
        _check_round_trip(name)


def _check_round_trip(name):
    f = _make(ALIASES.get(name, name)) if name in ALIASES else _make(name)
    if name in ALIASES:
        params = {"dampening": GAMMA, "sharpness": S}
        if ALIASES[name] == "ntail":
            params["tail"] = Q
        f_alias = surrogates.get(name, **params)
        assert f_alias == f
        assert f_alias.get_config()["name"] == ALIASES[name]
    config = f.get_config()
    g = surrogates.get(config["name"], **config)
    assert g == f and g is not f
    assert surrogates.get(config) == f
    assert surrogates.get(**config) == f
    x = tf.constant(_points(S), "float64")
    np.testing.assert_array_equal(g.pseudo_derivative(x).numpy(), f.pseudo_derivative(x).numpy())
    assert type(f).from_config(config) == f
    assert surrogates.get(f) is f
    assert eval(repr(f), {"kspike": __import__("kspike")}) == f


def test_keras_serialization_round_trip():
    import keras
    f = _make("ntail")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(f))
    assert restored == f and restored.tail == Q


def test_names_are_case_insensitive():
    assert surrogates.get("Triangular") == surrogates.get("triangular")


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as info:
        surrogates.get("boxcar")
    message = str(info.value)
    assert "boxcar" in message
    for name in surrogates.available():
        assert name in message


def test_bad_parameters():
    for name in ["triangular", "ntail", "multi_gaussian"]:
        for param in ["dampening", "sharpness"]:
            for value in [0.0, -1.0, float("nan"), float("inf"), -float("inf")]:
                with pytest.raises(ValueError, match=f"`{param}`.*{value!r}"):
                    surrogates.get(name, **{param: value})
    for tail in [1.0, 0.5, -2.0, float("nan"), float("inf"), 0.0]:
        with pytest.raises(ValueError, match="tail"):
            surrogates.get("ntail", tail=tail)


def test_bad_parameter_types_and_names():
    with pytest.raises(TypeError, match="dampening"):
        surrogates.get("triangular", dampening="big")
    with pytest.raises(ValueError, match="tail"):
        surrogates.get("triangular", tail=2.0)   # only ntail has a tail
    with pytest.raises(ValueError, match="sharpness"):
        surrogates.get("gaussian", sharpnes=2.0)
    with pytest.raises(TypeError, match="surrogate"):
        surrogates.get(3.0)
    with pytest.raises(ValueError, match="Available"):
        surrogates.get()
    with pytest.raises(ValueError, match="Conflicting"):
        surrogates.get("triangular", name="gaussian")
    with pytest.raises(ValueError, match="cannot be applied"):
        surrogates.get(surrogates.get("triangular"), dampening=1.0)


def test_multi_gaussian_shape():
    # Independent facts: negative side lobes beyond ~2 sigma and symmetry.
    f = _make("multi_gaussian")
    sigma = 0.5 / S
    x = np.array([3 * sigma, -3 * sigma, 0.2 * sigma, -0.2 * sigma])
    psi = f.pseudo_derivative(tf.constant(x, "float64")).numpy()
    assert psi[0] < 0 and psi[0] == pytest.approx(psi[1], rel=1e-12)
    assert psi[2] == pytest.approx(psi[3], rel=1e-12) and psi[2] < GAMMA
    assert math.isclose(psi[0], _multi_gaussian(x[0], GAMMA, S), rel_tol=1e-12)


# ----------------------------------------------------------------------------- user registry
def test_unknown_name_lists_names_and_aliases():
    with pytest.raises(ValueError) as info:
        surrogates.get("boxcar")
    message = str(info.value)
    for alias, name in {"superspike": "fast_sigmoid", "arctan": "cauchy",
                        "q_pseudospike": "ntail"}.items():
        assert f"'{alias}': '{name}'" in message
    assert "kspike.surrogates.register" in message
    assert surrogates.aliases() == {"arctan": "cauchy", "q_pseudospike": "ntail",
                                    "superspike": "fast_sigmoid"}


def test_register_rejects_bad_input():
    class Plain:
        pass

    class Unnamed(surrogates.SpikeFunction):
        def pseudo_derivative(self, x):
            return x

    with pytest.raises(TypeError, match="SpikeFunction"):
        surrogates.register("plain_test")(Plain)
    with pytest.raises(ValueError, match="already registered.*Triangular"):
        surrogates.register("triangular")(Unnamed)
    with pytest.raises(ValueError, match="already registered"):
        surrogates.register("fresh_name_test", aliases=("superspike",))(Unnamed)
    with pytest.raises(ValueError, match="`name`.*'two words'"):
        surrogates.register("two words")
    with pytest.raises(ValueError, match="has no `name`"):
        surrogates.register(Unnamed)
    assert "fresh_name_test" not in surrogates.available()
    assert not surrogates.is_registered(Unnamed)
    assert surrogates.is_registered(surrogates.get("superspike"))


def test_unregistered_surrogate_warns_when_saved_and_names_register_when_loaded():
    class Unregistered(surrogates.SpikeFunction):
        def pseudo_derivative(self, x):
            return self.dampening * keras.ops.exp(-keras.ops.abs(x))

    cell = kspike.LIF(3, surrogate=Unregistered())
    with pytest.warns(UserWarning, match=r"not registered.*register\('some_name'\)"):
        config = cell.get_config()
    # Keras' from_config re-raises the cell's ValueError as a TypeError with the same text.
    with pytest.raises((ValueError, TypeError), match=r"not registered.*register\('some_name'\)"):
        kspike.LIF.from_config(config)


USER_SURROGATE = '''
import keras
import kspike


@kspike.surrogates.register("box_user_test", aliases=("box_alias_test",))
class Box(kspike.surrogates.SpikeFunction):
    def __init__(self, dampening=0.3, sharpness=1.0, width=0.5):
        super().__init__(dampening, sharpness)
        self.width = float(width)

    def pseudo_derivative(self, x):
        inside = keras.ops.less(keras.ops.abs(self.sharpness * x), self.width)
        return self.dampening * keras.ops.cast(inside, x.dtype)

    def get_config(self):
        return {**super().get_config(), "width": self.width}
'''

USER_PROBE = '''
def probe(model, x):
    import numpy as np, tensorflow as tf
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        y = model(x)
        loss = tf.reduce_sum(y * y)
    grads = tape.gradient(loss, model.trainable_variables)
    return {"y": np.asarray(y).tolist(),
            "grad_norms": [float(tf.norm(g)) for g in grads]}
'''


def test_registered_user_surrogate_round_trips_in_fresh_process(tmp_path):
    from test_saving import _fresh_python
    (tmp_path / "user_spikes.py").write_text(USER_SURROGATE + USER_PROBE)
    path = str(tmp_path)
    saved = _fresh_python(f"""
        import sys, json, keras, numpy as np
        sys.path.insert(0, {path!r})
        import kspike, user_spikes
        keras.utils.set_random_seed(0)
        x = (np.random.default_rng(0).random((4, 30, 5)) < 0.3).astype("float32")
        y = np.random.default_rng(1).normal(size=(4, 30, 2)).astype("float32")
        assert kspike.surrogates.get("BOX_ALIAS_TEST", width=0.2).width == 0.2
        cell = kspike.ALIF(6, thr=0.05, surrogate=user_spikes.Box(0.5, 2.0, width=0.3), seed=3)
        model = keras.Sequential([keras.Input((30, 5)),
                                  keras.layers.RNN(cell, return_sequences=True),
                                  kspike.LeakyReadout(2, seed=4)])
        model.compile("adam", "mse")
        history = model.fit(x, y, epochs=2, verbose=0)
        model.save({path!r} + "/user.keras")
        np.save({path!r} + "/x.npy", x)
        out = user_spikes.probe(model, x)
        out["loss"] = history.history["loss"]
        print(json.dumps(out))
    """)
    assert saved["loss"][1] < saved["loss"][0]
    assert max(saved["grad_norms"]) > 0
    loaded = _fresh_python(f"""
        import sys, json, keras, numpy as np
        sys.path.insert(0, {path!r})
        import kspike
        try:
            keras.models.load_model({path!r} + "/user.keras")
            missing = ""
        except Exception as error:
            missing = str(error)
        import user_spikes
        model = keras.models.load_model({path!r} + "/user.keras")
        f = model.layers[0].cell.spike_function
        assert type(f) is user_spikes.Box, f
        assert (f.dampening, f.sharpness, f.width) == (0.5, 2.0, 0.3), f.get_config()
        out = user_spikes.probe(model, np.load({path!r} + "/x.npy"))
        out["missing"] = missing
        print(json.dumps(out))
    """)
    assert "box_user_test" in loaded["missing"]
    assert "kspike.surrogates.register" in loaded["missing"]
    np.testing.assert_allclose(loaded["y"], saved["y"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded["grad_norms"], saved["grad_norms"], rtol=1e-5)
