#!/usr/bin/env python
"""Time of one gradient computation: native BPTT vs the forms of kspike.learning.EProp.

    python bin/bench_eprop_forms.py                 # B=64, T=784 (sequential MNIST size)
    python bin/bench_eprop_forms.py --steps 200 --repeats 1

The network: B x T inputs (80 channels, 5% active), one kspike.SpikingRNN of 256 ALIF neurons
(half adaptive, tau_adaptation 700 ms), kspike.LeakyReadout(10), MSE on the last 56 steps
(sample_weight mask). Rules, all in this process and each wrapped in one ``tf.function``:
"bptt" (kspike.learning.BPTT, the native C++ loops in float32), "eprop" (``EProp(memory_flat=False)``: two passes from
stored states), "eprop_flat" (``EProp()``, the default: two passes with
per-synapse traces, memory independent of T), "eprop1p" (``EProp(single_pass=True)``: the
single pass, its per-synapse traces advanced by the native op in chunks of steps) and
"eprop1p_tf" (``EProp(single_pass=True, native=False)``: the single pass as one TensorFlow
loop, step by step).
Time is the median over ``--repeats`` calls (``--slow-repeats`` for the TensorFlow trace forms) after
one warm-up call (tracing); the table gives
each rule's ratio to BPTT measured in the same run. The machine may be shared: read the
ratios.
"""
import argparse
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=80)
    parser.add_argument("--window", type=int, default=56, help="loss on the last steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="timed calls of the TensorFlow trace forms (eprop_flat, eprop1p_tf)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads")
    parser.add_argument("--rules", nargs="+", default=["bptt", "eprop", "eprop_flat",
                                                       "eprop1p"],
                        choices=["bptt", "eprop", "eprop_flat", "eprop1p", "eprop1p_tf"])
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import keras
    import tensorflow as tf
    import kspike
    import kspike.learning

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    steps, batch = args.steps, args.batch
    cell = kspike.ALIF(args.units, n_adaptive=args.units // 2, tau_adaptation=700.0,
                       thr=0.01, seed=0)
    model = keras.Sequential([keras.Input((steps, args.inputs)),
                              kspike.SpikingRNN(cell, return_sequences=True),
                              kspike.LeakyReadout(10, seed=1)])
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((batch, steps, args.inputs)) < 0.05).astype("float32"))
    y = tf.constant(rng.standard_normal((batch, steps, 10)).astype("float32"))
    mask = np.zeros((batch, steps), "float32")
    mask[:, -args.window:] = 1.0
    mask = tf.constant(mask)
    loss = keras.losses.MeanSquaredError()
    rules = {"bptt": kspike.learning.BPTT(), "eprop": kspike.learning.EProp(memory_flat=False),
             "eprop_flat": kspike.learning.EProp(memory_flat=True),
             "eprop1p": kspike.learning.EProp(single_pass=True),
             "eprop1p_tf": kspike.learning.EProp(single_pass=True, native=False)}
    times = {}
    grads_of = {}
    for name in args.rules:
        rule = rules[name]

        @tf.function
        def gradients(x, y, mask, rule=rule):
            return rule.compute(model, x, y, loss, sample_weight=mask).gradients

        grads_of[name] = [g.numpy() for g in gradients(x, y, mask)]
        samples = []
        repeats = args.slow_repeats if name in ("eprop_flat", "eprop1p_tf") else args.repeats
        for _ in range(repeats):
            start = time.perf_counter()
            _ = [g.numpy() for g in gradients(x, y, mask)]
            samples.append(time.perf_counter() - start)
        times[name] = float(np.median(samples))
        print(f"{name}: {times[name]:.3f} s", flush=True)
    print()
    print(f"B={batch}, {args.inputs} inputs (5% active), {args.units} ALIF (half adaptive), "
          f"T={steps}, LeakyReadout(10), MSE on the last {args.window} steps; "
          f"threads: intra {tf.config.threading.get_intra_op_parallelism_threads()}, "
          f"median of {args.repeats} calls ({args.slow_repeats} for eprop_flat, eprop1p_tf)")
    print(f"{'rule':11s} {'s/call':>8s} {'x BPTT':>8s}")
    base = times.get("bptt")
    for name in args.rules:
        ratio = f"{times[name] / base:8.2f}" if base else f"{'-':>8s}"
        print(f"{name:11s} {times[name]:8.3f} {ratio}")
    if "eprop" in grads_of and "eprop_flat" in grads_of:
        diff = max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
                   for a, b in zip(grads_of["eprop"], grads_of["eprop_flat"]))
        print(f"eprop vs eprop_flat: max relative difference {diff:.2e} (float32)")
    for other in ("eprop1p_tf", "eprop_flat", "eprop"):
        if "eprop1p" in grads_of and other in grads_of:
            diff = max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
                       for a, b in zip(grads_of["eprop1p"], grads_of[other]))
            print(f"eprop1p vs {other}: max relative difference {diff:.2e} (float32)")
            break
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
