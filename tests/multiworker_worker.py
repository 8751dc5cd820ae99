"""One worker of the multi-worker tests (tests/test_multiworker.py), or the single-process
reference when TF_CONFIG is unset: a recurrent ALIF network with DEEP R rewiring trained by
kspike.Trainer for a few steps; the final weights and sparsity patterns go to a JSON file.

    python tests/multiworker_worker.py OUT.json CKPT_DIR STEPS [PAUSE_AT_STEP]

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


def dataset():
    rng = np.random.default_rng(3)
    x = (rng.random((4 * GLOBAL_BATCH, TIME_STEPS, N_IN)) < 0.3).astype("float32")
    y = rng.integers(0, N_OUT, (4 * GLOBAL_BATCH,)).astype("int32")
    # Unshuffled and repeating: every epoch, and a resumed run, see the same batches.
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)


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


def main(out, checkpoint_dir, steps, pause_at=None):
    strategy = multi_worker_strategy(timeout=60) if os.environ.get("TF_CONFIG") else None
    scope = strategy.scope() if strategy is not None else tf.name_scope("single")
    with scope:
        model, optimizer = build()
    trainer = kspike.Trainer(model, optimizer,
                             keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             strategy=strategy, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=1, seed=5, verbose=2)
    initial = {k.path: np.asarray(k.mask.numpy()).astype(int).tolist()
               for k in kspike.rewiring.rewired_kernels(model)}
    callbacks = [_Pause(trainer, pause_at, out + ".paused")] if pause_at else None
    trainer.fit(dataset(), steps=steps, callbacks=callbacks)
    result = {"step": trainer.step,
              "weights": {w.path: w.numpy().tolist() for w in model.trainable_variables},
              "active": {k.path: np.asarray(k.mask.numpy()).astype(int).tolist()
                         for k in kspike.rewiring.rewired_kernels(model)},
              "initial_active": initial,
              "active_connections": kspike.rewiring.active_connections(model)}
    with open(out + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]),
         int(sys.argv[4]) if len(sys.argv) > 4 else None)
