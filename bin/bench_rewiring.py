#!/usr/bin/env python
"""Step-time cost of DEEP R rewiring against the same dense model.

Trains one ALIF layer (LSNN sMNIST shape: 80 inputs, 256 neurons, T = 784 steps, B = 64) with a
leaky readout, once with dense kernels and Adam, once with ``connectivity=0.12`` and
``kspike.DeepR(Adam)``, and prints the median time of a training step of each (forward,
backward and optimizer update) and their ratio, in wall-clock and in process CPU time. Runs
of the two models alternate so that a change of machine load affects both alike; only the
ratios are meaningful on a shared machine. ``--layer keras`` measures ``keras.layers.RNN``,
which recomputes the effective weights at every time step (the default ``kspike.SpikingRNN``
does it once per sequence).

    python bin/bench_rewiring.py            # the issue's setting (takes a few minutes)
    python bin/bench_rewiring.py --quick    # small shapes, seconds
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size B (default 64)")
    parser.add_argument("--steps", type=int, default=784, help="time steps T (default 784)")
    parser.add_argument("--units", type=int, default=256, help="neurons (default 256)")
    parser.add_argument("--inputs", type=int, default=80, help="input channels (default 80)")
    parser.add_argument("--connectivity", type=float, default=0.12,
                        help="fraction of active connections (default 0.12)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed steps per model after warm-up (>= 5, default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--layer", choices=("engine", "keras"), default="engine",
                        help="kspike.SpikingRNN (default) or keras.layers.RNN")
    parser.add_argument("--quick", action="store_true",
                        help="B=16, T=100, 64 neurons, 5 repeats: a fast smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.units, args.repeats, args.warmup = 16, 100, 64, 5, 1
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5, received {args.repeats}")
    if not 0.0 < args.connectivity <= 1.0:
        parser.error(f"--connectivity must be in (0, 1], received {args.connectivity}")
    return args


def build(args, connectivity):
    import keras
    import kspike

    cell = kspike.ALIF(args.units, n_adaptive=args.units // 2, n_refractory=5,
                       connectivity=connectivity, seed=0)
    layer_cls = kspike.SpikingRNN if args.layer == "engine" else keras.layers.RNN
    model = keras.Sequential([keras.Input((args.steps, args.inputs)),
                              layer_cls(cell, return_sequences=True),
                              kspike.LeakyReadout(10, seed=0)])
    adam = keras.optimizers.Adam(1e-3)
    optimizer = adam if connectivity is None else kspike.DeepR(adam, l1=1e-2, seed=0)
    return model, optimizer


def make_step(model, optimizer):
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.reduce_mean(model(x, training=True)[:, -56:], axis=1)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf
    import kspike

    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((args.batch, args.steps, args.inputs)) < 0.05), tf.float32)
    y = tf.constant(rng.integers(0, 10, args.batch), tf.int32)
    print(f"DEEP R step-time benchmark: B={args.batch} T={args.steps} units={args.units} "
          f"inputs={args.inputs} connectivity={args.connectivity} layer={args.layer} "
          f"repeats={args.repeats}", flush=True)

    runs = {}
    for name, connectivity in (("dense", None), ("rewired", args.connectivity)):
        model, optimizer = build(args, connectivity)
        step = make_step(model, optimizer)
        started = time.perf_counter()
        for _ in range(args.warmup):
            step(x, y).numpy()
        print(f"  {name}: traced and warmed up in {time.perf_counter() - started:.1f} s",
              flush=True)
        runs[name] = (model, step)
    active = kspike.rewiring.active_connections(runs["rewired"][0])

    # Wall time is what users see; process CPU time (all threads) is far less sensitive to
    # other processes competing for the cores, so both are reported.
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (_, step) in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            step(x, y).numpy()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
        print(f"  repeat {repeat + 1}/{args.repeats}: dense {wall['dense'][-1]:.3f} s, "
              f"rewired {wall['rewired'][-1]:.3f} s", flush=True)
    assert kspike.rewiring.active_connections(runs["rewired"][0]) == active

    print(f"{active} active connections (constant over the run)")
    for label, table in (("wall", wall), ("cpu", cpu)):
        dense = statistics.median(table["dense"])
        rewired = statistics.median(table["rewired"])
        print(f"median {label} time per step: dense {dense * 1e3:.1f} ms, rewired "
              f"{rewired * 1e3:.1f} ms, ratio rewired / dense {rewired / dense:.3f} "
              f"(cost of rewiring {100.0 * (rewired / dense - 1.0):+.1f}%; target <= +15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
