#!/usr/bin/env python
"""Per-step overhead of kspike.Trainer against a bare tf.function GradientTape step.

Both loops train the same model (an ALIF layer and a leaky readout) on the same tf.data
pipeline. Blocks of steps alternate between the two loops so that machine load affects both
alike; the script prints median milliseconds per step and the ratio Trainer / bare.

    python bin/bench_trainer.py --units 100 --time-steps 100 --batch 32 --steps 20 --repeats 15

Wall and CPU time per step are printed, each as the median and the minimum over blocks; on a
loaded machine the CPU-time figures are the steadier ones.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kspike  # noqa: E402


def build(args):
    inp = keras.Input((args.time_steps, args.inputs))
    z = keras.layers.RNN(kspike.ALIF(args.units, thr=0.05, seed=0), return_sequences=True,
                         name="alif")(inp)
    y = kspike.LeakyReadout(args.outputs, seed=1)(z)
    logits = keras.layers.Lambda(lambda t: t[:, -1])(y)
    return keras.Model(inp, logits)


def data(args):
    rng = np.random.default_rng(0)
    n = args.batch * 8
    x = (rng.random((n, args.time_steps, args.inputs)) < 0.05).astype("float32")
    y = rng.integers(0, args.outputs, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).cache().repeat()


def clocks():
    """(wall time, CPU time of this process) in seconds. CPU time is the steadier figure when
    other processes load the machine."""
    return np.array([time.perf_counter(), time.process_time()])


class StepTimer(keras.callbacks.Callback):
    """Clocks from the first batch's start to the last batch's end inside fit."""

    def on_train_batch_begin(self, batch, logs=None):
        if not hasattr(self, "start"):
            self.start = clocks()

    def on_train_batch_end(self, batch, logs=None):
        self.end = clocks()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--inputs", type=int, default=20)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--time-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per loop")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1),
                        help="Trainer progress bar (1) or silent (0)")
    parser.add_argument("--metrics", action="store_true", help="Trainer also tracks accuracy")
    args = parser.parse_args()

    model = build(args)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ds = data(args)

    bare_optimizer = keras.optimizers.Adam(1e-3)
    bare_optimizer.build(model.trainable_variables)

    @tf.function
    def bare_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        bare_optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    bare_iterator = iter(ds)

    def bare_block(n):
        start = clocks()
        for _ in range(n):
            x, y = next(bare_iterator)
            loss = bare_step(x, y)
        float(loss)
        return (clocks() - start) / n

    trainer = kspike.Trainer(model, keras.optimizers.Adam(1e-3), loss_fn,
                             metrics=["accuracy"] if args.metrics else None,
                             verbose=args.verbose)
    # One fit per block on the infinite dataset; timing inside fit excludes its set-up.
    def trainer_block(n):
        timer = StepTimer()
        trainer.fit(ds, steps=trainer.step + n, steps_per_epoch=n, callbacks=[timer])
        return (timer.end - timer.start) / n

    print(f"model: ALIF {args.units} units, T={args.time_steps}, batch {args.batch}, "
          f"{args.inputs} inputs; {args.repeats} blocks of {args.steps} steps per loop")
    bare_block(3)       # traces
    trainer_block(3)    # traces
    bare_times, trainer_times = [], []
    for repeat in range(args.repeats):
        bare_times.append(bare_block(args.steps))
        trainer_times.append(trainer_block(args.steps))
        print(f"block {repeat + 1}: bare {1000 * bare_times[-1][0]:.2f} ms/step "
              f"(CPU {1000 * bare_times[-1][1]:.2f}), Trainer {1000 * trainer_times[-1][0]:.2f} "
              f"ms/step (CPU {1000 * trainer_times[-1][1]:.2f})", flush=True)
    for column, clock in enumerate(("wall", "CPU")):
        bare = [t[column] for t in bare_times]
        fit = [t[column] for t in trainer_times]
        for name, reduce in (("median", statistics.median), ("minimum", min)):
            b, f = reduce(bare), reduce(fit)
            print(f"{clock:4s} {name:7s}: bare {1000 * b:7.2f} ms/step, Trainer {1000 * f:7.2f} "
                  f"ms/step, Trainer / bare = {f / b:.3f} (overhead {100 * (f / b - 1):+.1f}%)")
    print(f"traces: {trainer.trace_counts}")


if __name__ == "__main__":
    main()
