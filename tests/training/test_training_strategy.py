"""kspike.Trainer under tf.distribute, bad input: a strategy it cannot use, a model built
outside the scope, a global batch the replicas cannot share: clear errors before any step,
nothing saved is touched. An uneven partial last batch is weighted exactly. Runs in a
subprocess with 2 logical CPU devices (they must be set before TensorFlow initialises)."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kspike.training import Trainer, arguments

pytestmark = pytest.mark.heavy(50)

_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    import kspike
    from kspike.training import Trainer

    T, N_IN, TMP = 6, 3, {tmp!r}
    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def model():
        inputs = keras.Input((T, N_IN))
        h = keras.layers.RNN(kspike.LIF(5, thr=0.05, seed=0), return_sequences=True)(inputs)
        out = kspike.LeakyReadout(2, seed=1)(h)
        return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(out))

    def error(fn):
        try:
            fn()
        except (TypeError, ValueError) as e:
            return f"{{type(e).__name__}}: {{e}}"
        return None

    def snapshot(directory):
        found = {{}}
        for root, _, files in os.walk(directory):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, directory)] = hashlib.sha256(
                        handle.read()).hexdigest()
        return found

    rng = np.random.default_rng(0)
    x = (rng.random((21, T, N_IN)) < 0.4).astype("float32")
    y = rng.integers(0, 2, 21).astype("int32")
    results = {{}}
    with strategy.scope():
        m = model()
    results["central"] = error(lambda: Trainer(
        m, "adam", LOSS, strategy=tf.distribute.experimental.CentralStorageStrategy()))
    results["outside"] = error(lambda: Trainer(model(), "adam", LOSS, strategy=strategy))

    # 21 samples in batches of 6: the last batch of 3 splits 2 + 1 over the replicas. The
    # mirrored run saves a checkpoint, which the reruns below must leave alone.
    ckpt = os.path.join(TMP, "ckpt")
    weights = {{}}
    for name in ("single", "mirrored"):
        with strategy.scope() if name == "mirrored" else tf.name_scope("single"):
            net = model()
            optimizer = keras.optimizers.SGD(0.5)
        trainer = Trainer(net, optimizer, LOSS, strategy=strategy if name == "mirrored"
                          else None, checkpoint_dir=ckpt if name == "mirrored" else None,
                          verbose=0)
        history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(6), epochs=1)
        weights[name] = [w.numpy().tolist() for w in net.trainable_variables]
        results[name + "_loss"] = history.history["loss"]
    results["weights"] = weights

    # Reruns whose batches the 2 replicas cannot share: refused before any step or restore.
    before = snapshot(ckpt)
    rerun = Trainer(net, keras.optimizers.SGD(0.5), LOSS, strategy=strategy,
                    checkpoint_dir=ckpt, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    results["dataset"] = error(lambda: rerun.fit(ds, epochs=3))
    results["arrays"] = error(lambda: rerun.fit(x, y, batch_size=6, epochs=3))
    results["validation"] = error(lambda: rerun.fit(x[:8], y[:8], batch_size=4, epochs=3,
                                                    validation_data=(x[:3], y[:3])))
    results["evaluate"] = error(lambda: rerun.evaluate(ds))
    results["untouched"] = snapshot(ckpt) == before and len(before) >= 3 and rerun.step == 0
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategy")
    script = tmp / "run.py"
    script.write_text(_SCRIPT.format(tmp=str(tmp)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_unsupported_strategies_are_refused_by_name(results):
    assert results["central"].startswith("TypeError: `strategy` CentralStorageStrategy is not "
                                         "supported by kspike.Trainer; use one of "
                                         "MirroredStrategy, MultiWorkerMirroredStrategy")


def test_model_built_outside_the_scope_names_its_variables(results):
    assert results["outside"].startswith("ValueError: With `strategy`, build the model")
    assert "kernel" in results["outside"] and "were created outside it" in results["outside"]


def test_indivisible_global_batches_fail_before_any_step_and_touch_nothing(results):
    for key, name, size in (("dataset", "train_ds", 5), ("arrays", "train_ds", 3),
                            ("validation", "validation_data", 3), ("evaluate", "ds", 5)):
        assert results[key] == (
            f"ValueError: The global batch of {size} samples of `{name}` is not divisible by "
            "the 2 replicas of the strategy: use a batch size that is a multiple of 2 (and "
            "drop_remainder=True, or a number of samples that the batch size divides)."), key
    assert results["untouched"]


def test_an_uneven_last_batch_is_weighted_as_on_one_device(results):
    single, mirrored = results["weights"]["single"], results["weights"]["mirrored"]
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results["mirrored_loss"], results["single_loss"], rtol=1e-5)


def test_the_default_and_one_device_strategies_are_accepted():
    arguments.check_strategy(None)
    arguments.check_strategy(tf.distribute.get_strategy())
    arguments.check_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"))
    with pytest.raises(TypeError, match="`strategy` must be a tf.distribute.Strategy"):
        Trainer(_tiny(), "adam", "mse", strategy="mirrored")


def _tiny():
    inputs = keras.Input((4, 2))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))
