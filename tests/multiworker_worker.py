"""One worker of the multi-worker tests (tests/test_multiworker.py,
tests/test_multiworker_conv.py), or the single-process reference when TF_CONFIG is unset (the
tests call main() in their own process for it): a small network trained by kspike.Trainer for
a few steps; the final weights and sparsity patterns go to a JSON file.

    python tests/multiworker_worker.py OUT.json CKPT_DIR STEPS [PAUSE_AT_STEP] [--model conv]

Models: "alif" (default), a recurrent ALIF network with DEEP R rewiring; "conv", a
convolutional SNN on 8x8 images (kspike.FoldTime(Conv2D) -> kspike.LIFNeurons ->
TimeDistributed(Dense) -> mean over time, as bin/tutorial_conv_snn_mnist.py in small).

With PAUSE_AT_STEP the worker writes OUT.json.paused when it reaches that step and then
sleeps, so that the test can kill it at a known point after a checkpoint.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kspike  # noqa: E402
from kspike.distribute import multi_worker_strategy  # noqa: E402

GLOBAL_BATCH = 8
TIME_STEPS = 12
N_IN, N_REC, N_OUT = 6, 16, 2
CONV_STEPS, SIDE = 4, 8


def dataset():
    rng = np.random.default_rng(3)
    x = (rng.random((4 * GLOBAL_BATCH, TIME_STEPS, N_IN)) < 0.3).astype("float32")
    y = rng.integers(0, N_OUT, (4 * GLOBAL_BATCH,)).astype("int32")
    # Unshuffled and repeating: every epoch, and a resumed run, see the same batches.
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)


def conv_dataset():
    rng = np.random.default_rng(4)
    # Intensities in [0, 4) so that the LIF neurons (threshold 1) spike within T=4 steps.
    images = (4.0 * rng.random((4 * GLOBAL_BATCH, SIDE * SIDE))).astype("float32")
    # The same image at every step (direct input, as the tutorial's static images).
    x = np.repeat(images[:, None], CONV_STEPS, axis=1)
    y = rng.integers(0, N_OUT, (4 * GLOBAL_BATCH,)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)


def build_conv():
    inputs = keras.Input((CONV_STEPS, SIDE * SIDE))
    h = keras.layers.Reshape((CONV_STEPS, SIDE, SIDE, 1))(inputs)
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False,
                               kernel_initializer=keras.initializers.GlorotUniform(seed=0))
    h = kspike.FoldTime(conv)(h)
    h = kspike.LIFNeurons(tau=2.0)(h)
    h = keras.layers.TimeDistributed(keras.layers.Flatten())(h)
    dense = keras.layers.Dense(N_OUT, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    scores = keras.layers.TimeDistributed(dense)(h)
    logits = keras.layers.GlobalAveragePooling1D()(scores)
    return keras.Model(inputs, logits, name="multiworker_conv"), keras.optimizers.Adam(5e-2)


def build():
    inputs = keras.Input((TIME_STEPS, N_IN))
    cell = kspike.ALIF(N_REC, n_adaptive=N_REC // 2, tau_adaptation=50.0, connectivity=0.3,
                       seed=0)
    hidden = kspike.SpikingRNN(cell, return_sequences=True)(inputs)
    outputs = kspike.LeakyReadout(N_OUT, seed=1)(hidden)
    logits = keras.layers.GlobalAveragePooling1D()(outputs)
    model = keras.Model(inputs, logits, name="multiworker_alif")
    # A large L1 and learning rate make connections die and reborn within a few steps.
    optimizer = kspike.DeepR(keras.optimizers.Adam(5e-2), l1=5e-2, temperature=1e-4, seed=7)
    return model, optimizer


class _Pause(keras.callbacks.Callback):
    def __init__(self, trainer, step, marker):
        super().__init__()
        self.trainer, self.step, self.marker = trainer, step, marker

    def on_train_batch_begin(self, batch, logs=None):
        if self.trainer.step >= self.step:
            with open(self.marker, "w") as handle:
                handle.write(str(self.trainer.step))
            while True:
                time.sleep(1)


def main(out, checkpoint_dir, steps, pause_at=None, model_name="alif"):
    strategy = multi_worker_strategy(timeout=60) if os.environ.get("TF_CONFIG") else None
    scope = strategy.scope() if strategy is not None else tf.name_scope("single")
    with scope:
        model, optimizer = build_conv() if model_name == "conv" else build()
    trainer = kspike.Trainer(model, optimizer,
                             keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             strategy=strategy, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=1, seed=5, verbose=2)
    initial = {k.path: np.asarray(k.mask.numpy()).astype(int).tolist()
               for k in kspike.rewiring.rewired_kernels(model)}
    initial_weights = {w.path: w.numpy().tolist() for w in model.trainable_variables}
    callbacks = [_Pause(trainer, pause_at, out + ".paused")] if pause_at else None
    data = conv_dataset() if model_name == "conv" else dataset()
    trainer.fit(data, steps=steps, callbacks=callbacks)
    result = {"step": trainer.step,
              "weights": {w.path: w.numpy().tolist() for w in model.trainable_variables},
              "active": {k.path: np.asarray(k.mask.numpy()).astype(int).tolist()
                         for k in kspike.rewiring.rewired_kernels(model)},
              "initial_active": initial,
              "initial_weights": initial_weights,
              "active_connections": kspike.rewiring.active_connections(model)}
    with open(out + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    args = sys.argv[1:]
    model_name = "alif"
    if "--model" in args:
        at = args.index("--model")
        model_name = args[at + 1]
        del args[at:at + 2]
    if model_name not in ("alif", "conv"):
        sys.exit(f"--model must be 'alif' or 'conv', received {model_name!r}")
    main(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else None, model_name)
