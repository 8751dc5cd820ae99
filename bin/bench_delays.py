#!/usr/bin/env python
"""Cost of LSNN's synaptic delays (``n_delay``) in a training step of an sMNIST-sized LSNN.

One BPTT training step (forward, backward, Adam update) of ``[kspike.SpikingRNN(ALIF) ->
kspike.LeakyReadout(10)]`` with a softmax cross-entropy over the last 28 steps: 256 neurons of
which 128 adaptive, 80 inputs, 5 ms refractory, DEEP R kernels of 12% connectivity and Dale's
law, spike inputs at ~2% rate, B=64, T=784 by default (``--quick``: B=16, T=100). Variants,
timed in interleaved rounds in the same run:

- ``n_delay=1, native`` (the baseline): SpikingRNN's native C++ loops;
- ``n_delay=D, native``: the native delayed loops (a ring of future currents per batch row,
  docs/engine.md);
- ``n_delay=D, native=False``: the fallback, Keras' generic RNN loop over ``cell.call`` with
  the delay-widened kernels, differentiated by TensorFlow.

Ratios are printed against the baseline step, and the fallback against the native delayed one.

Then the forward pass alone, without a gradient tape (inference), of the n_delay=1 and
n_delay=D models, timed in interleaved rounds of their own:

- ``predict``: ``model.predict_on_batch``, i.e. Keras' predict function, where SpikingRNN runs
  its native forward op alone (as in ``model.evaluate`` and kspike's Trainer evaluation);
- ``user tf.function``: ``model(x)`` in a ``tf.function`` of the user, which may be exported,
  so it runs TensorFlow ops only (the TensorFlow forward loop without delays, Keras' generic
  loop over ``cell.call`` with the delay-widened kernels with them; docs/engine.md).

Ratios are printed against the undelayed ``predict`` forward of the same run.

Usage:
    bin/bench_delays.py [--batch 64] [--steps 784] [--n-delay 10] [--repeats 3] [--threads 1]
    bin/bench_delays.py --quick --threads 1
    bin/bench_delays.py --inference-only --batch 256 --steps 840 --threads 1
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
    cell = kspike.ALIF(256, n_adaptive=128, n_refractory=5, connectivity=0.12, dale=0.75,
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
    return model, train_step


def timed_rounds(variants, repeats, *args):
    """{name: median seconds} of ``variants`` ({name: callable}), warmed up twice, then called
    in ``repeats`` interleaved rounds."""
    import numpy as np
    for run in variants.values():           # trace and warm up
        run(*args)
        run(*args)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            np.asarray(run(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--quick: 16)")
    parser.add_argument("--steps", type=int, default=None, help="default 784 (--quick: 100)")
    parser.add_argument("--n-delay", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra-op threads (default: TensorFlow's)")
    parser.add_argument("--quick", action="store_true", help="a reduced size: B=16, T=100")
    parser.add_argument("--inference-only", action="store_true",
                        help="time the forward passes without a tape only")
    args = parser.parse_args(argv)
    if args.n_delay < 2:
        parser.error(f"--n-delay must be >= 2, received {args.n_delay}")
    args.batch = args.batch or (16 if args.quick else 64)
    args.steps = args.steps or (100 if args.quick else 784)
    import numpy as np
    import tensorflow as tf
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((args.batch, args.steps, 80)) < 0.02).astype("float32"))
    y = tf.constant(rng.integers(0, 10, args.batch))
    d = args.n_delay
    undelayed, train_undelayed = build(1, True, args)
    delayed, train_delayed = build(d, True, args)
    threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    print(f"B={args.batch}, T={args.steps}, 256 ALIF (128 adaptive), 80 inputs, intra-op "
          f"threads {threads}")
    if not args.inference_only:
        variants = {"n_delay=1, native": train_undelayed,
                    f"n_delay={d}, native": train_delayed,
                    f"n_delay={d}, native=False": build(d, False, args)[1]}
        medians = timed_rounds(variants, args.repeats, x, y)
        base = medians["n_delay=1, native"]
        print(f"training step, median of {args.repeats}")
        for name, median in medians.items():
            print(f"  {name:26s} {median:8.3f} s/step   {median / base:6.2f}x n_delay=1, "
                  f"native")
        fallback = medians[f"n_delay={d}, native=False"] / medians[f"n_delay={d}, native"]
        print(f"  the native delayed loops are {fallback:.2f}x faster than the fallback")

    forward = {}
    for delays, model in ((1, undelayed), (d, delayed)):
        forward[f"n_delay={delays}, predict"] = model.predict_on_batch
        forward[f"n_delay={delays}, user tf.function"] = tf.function(lambda v, m=model: m(v))
    medians = timed_rounds(forward, args.repeats, x)
    base = medians["n_delay=1, predict"]
    print(f"forward pass without a tape (inference), median of {args.repeats} calls")
    for name, median in medians.items():
        print(f"  {name:32s} {median:8.3f} s   {median / base:6.2f}x n_delay=1, predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
