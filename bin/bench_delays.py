#!/usr/bin/env python
"""Cost of LSNN's synaptic delays (``n_delay``) in a training step of the sequential-MNIST LSNN.

One BPTT training step (forward, backward, Adam update) of ``[kspike.SpikingRNN(ALIF) ->
kspike.LeakyReadout(10)]`` with a softmax cross-entropy over the last 28 steps, the shapes of
``bin/tutorial_sequential_mnist_with_LSNN.py`` (220 neurons of which 100 adaptive, 80 inputs,
5 ms refractory, DEEP R kernels of 12% connectivity and Dale's law, spike inputs at ~2% rate)
by default. Variants, timed in interleaved rounds in the same run:

- ``n_delay=1`` (the baseline): SpikingRNN's native C++ loops (where they compile);
- ``n_delay=1, native=False``: SpikingRNN's TensorFlow loops;
- ``n_delay=D``: delayed cells run Keras' generic RNN loop over ``cell.call`` (the native and
  the fused TensorFlow loops have no future-current buffer; ``kspike.engine.why_not_native``
  says so), differentiated by TensorFlow.

Ratios are printed against the baseline step.

Usage:
    bin/bench_delays.py [--batch 256] [--steps 840] [--n-delay 10] [--repeats 3]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(n_delay, native, args, seed=0):
    import keras
    import tensorflow as tf
    import kspike
    cell = kspike.ALIF(220, n_adaptive=100, n_refractory=5, connectivity=0.12, dale=0.75,
                       seed=seed, n_delay=n_delay)
    model = keras.Sequential([keras.Input((args.steps, 80)),
                              kspike.SpikingRNN(cell, return_sequences=True, native=native),
                              kspike.LeakyReadout(10, seed=seed)])
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.reduce_mean(model(x)[:, -28:], axis=1)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=840)
    parser.add_argument("--n-delay", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import numpy as np
    import tensorflow as tf
    import kspike
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((args.batch, args.steps, 80)) < 0.02).astype("float32"))
    y = tf.constant(rng.integers(0, 10, args.batch))
    variants = {"n_delay=1 (native)": build(1, "auto", args),
                "n_delay=1, native=False": build(1, False, args),
                f"n_delay={args.n_delay}": build(args.n_delay, "auto", args)}
    reason = kspike.engine.why_not_native(kspike.ALIF(4, n_delay=args.n_delay), "float32",
                                          "float32", masked=False)
    print(f"why_not_native for n_delay={args.n_delay}: {reason}")
    for step in variants.values():          # trace and warm up
        step(x, y)
        step(x, y)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            float(step(x, y))
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["n_delay=1 (native)"]))
    print(f"B={args.batch}, T={args.steps}, 220 ALIF/LIF, 80 inputs, median of "
          f"{args.repeats} steps")
    for name, values in times.items():
        median = float(np.median(values))
        print(f"  {name:28s} {median:8.3f} s/step   {median / base:6.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
