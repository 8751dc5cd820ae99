#!/usr/bin/env python
"""Time of ONE BPTT training step of an LSNN on sequential-MNIST-sized inputs.

The network: ``keras.layers.RNN(kspike.ALIF(256, n_adaptive=128, n_refractory=5))`` on
(B=64, T=784, 80) inputs, then ``kspike.LeakyReadout(10)``; loss: softmax cross-entropy of the
readout averaged over the last 56 steps (or all steps if T < 56). One step = forward + backward
+ Adam update inside one ``tf.function``; the figure is the median of ``--repeats`` timed steps
after ``--warmup`` untimed ones.

In the same run, as baselines:

- ``keras.layers.LSTM(units)`` + ``Dense(10)``, same loss, same step;
- a dense-matmul bound: the matmuls of the spiking network's forward and backward pass with
  the same FLOPs, done as a few large products (no time loop), timed. It is the time the step
  would take if it were nothing but perfectly batched matrix products.

Prints a table and a JSON line (and writes the JSON with ``--json PATH``). Times depend on the
machine and its load; the ratios are measured in the same run and compare better.

Usage:
    bin/bench_step.py                          # the default configuration (~1-2 minutes)
    bin/bench_step.py --batch 32 --steps 200 --units 128 --repeats 7
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size B (default 64)")
    parser.add_argument("--steps", type=int, default=784, help="time steps T (default 784)")
    parser.add_argument("--inputs", type=int, default=80, help="input channels (default 80)")
    parser.add_argument("--units", type=int, default=256, help="ALIF neurons (default 256)")
    parser.add_argument("--adaptive", type=int, default=None,
                        help="adaptive neurons among them (default units // 2)")
    parser.add_argument("--classes", type=int, default=10, help="readout size (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--rnn", choices=("keras", "spiking"), default="keras",
                        help="keras.layers.RNN (default) or kspike.SpikingRNN around the cell")
    parser.add_argument("--no-lstm", action="store_true", help="skip the LSTM baseline")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "inputs", "units", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5, received {args.repeats}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1, received {args.warmup}")
    if args.adaptive is None:
        args.adaptive = args.units // 2
    if not 0 <= args.adaptive <= args.units:
        parser.error(f"--adaptive must be in [0, units={args.units}], received {args.adaptive}")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json {args.json!r} exists; choose a new file (nothing is overwritten)")
    return args


def _loss_window(steps):
    return min(56, steps)


def _training_step(model, optimizer, window):
    import tensorflow as tf

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            logits = tf.reduce_mean(tf.cast(out[:, -window:], tf.float32), axis=1)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def _time(fn, args, warmup, repeats, label):
    for _ in range(warmup):
        fn(*args).numpy()   # .numpy() waits for the step to finish
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
        print(f"  {label}: step {i + 1}/{repeats} {times[-1] * 1e3:.1f} ms", file=sys.stderr,
              flush=True)
    return statistics.median(times), times


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike

    B, T, n_in, n, k = args.batch, args.steps, args.inputs, args.units, args.classes
    rng = np.random.default_rng(0)
    x = tf.constant((rng.uniform(size=(B, T, n_in)) < 0.05).astype("float32"))
    y = tf.constant(rng.integers(0, k, size=B).astype("int32"))
    window = _loss_window(T)
    results = {"config": {"batch": B, "steps": T, "inputs": n_in, "units": n,
                          "adaptive": args.adaptive, "classes": k, "repeats": args.repeats,
                          "rnn": args.rnn, "tensorflow": tf.__version__,
                          "keras": keras.__version__, "cpu_count": os.cpu_count()}}
    rows = []

    keras.utils.set_random_seed(0)
    rnn = keras.layers.RNN if args.rnn == "keras" else kspike.SpikingRNN
    cell = kspike.ALIF(n, n_adaptive=args.adaptive, n_refractory=5, tau_adaptation=700.0,
                       beta=1.8, thr=0.01)
    lsnn = keras.Sequential([keras.Input((T, n_in)), rnn(cell, return_sequences=True),
                             kspike.LeakyReadout(k)])
    print(f"[1/3] LSNN {args.rnn} RNN: B={B} T={T} {n_in} inputs {n} ALIF ({args.adaptive} "
          "adaptive)", file=sys.stderr, flush=True)
    step = _training_step(lsnn, keras.optimizers.Adam(1e-3), window)
    lsnn_time, lsnn_all = _time(step, (x, y), args.warmup, args.repeats, "lsnn")
    rows.append(("LSNN (ALIF, " + ("keras.layers.RNN" if args.rnn == "keras"
                                    else "kspike.SpikingRNN") + ")", lsnn_time))
    results["lsnn_s"] = lsnn_time
    results["lsnn_all_s"] = lsnn_all

    if not args.no_lstm:
        keras.utils.set_random_seed(0)
        lstm = keras.Sequential([keras.Input((T, n_in)),
                                 keras.layers.LSTM(n, return_sequences=True),
                                 keras.layers.Dense(k)])
        print(f"[2/3] LSTM({n})", file=sys.stderr, flush=True)
        step = _training_step(lstm, keras.optimizers.Adam(1e-3), window)
        lstm_time, lstm_all = _time(step, (x, y), args.warmup, args.repeats, "lstm")
        rows.append((f"keras.layers.LSTM({n})", lstm_time))
        results["lstm_s"] = lstm_time
        results["lstm_all_s"] = lstm_all

    # Matmul bound: the products of the LSNN step (forward x W_in, z W_rec, zhat W_out;
    # backward g W_rec^T, g_out W_out^T and the weight gradients x^T g, z^T g, zhat^T g_out),
    # batched over all B*T rows at once.
    flops = 2 * B * T * (n_in * n + n * n + n * k) + 2 * B * T * (
        n_in * n + 2 * n * n + 2 * n * k)
    xs = tf.reshape(x, (B * T, n_in))
    zs = tf.constant((rng.uniform(size=(B * T, n)) < 0.02).astype("float32"))
    g = tf.constant(rng.normal(size=(B * T, n)).astype("float32"))
    g_out = tf.constant(rng.normal(size=(B * T, k)).astype("float32"))
    w_in = tf.constant(rng.normal(size=(n_in, n)).astype("float32"))
    w_rec = tf.constant(rng.normal(size=(n, n)).astype("float32"))
    w_out = tf.constant(rng.normal(size=(n, k)).astype("float32"))

    @tf.function
    def bound(xs, zs, g, g_out):
        forward = [tf.matmul(xs, w_in), tf.matmul(zs, w_rec), tf.matmul(zs, w_out)]
        backward = [tf.matmul(g, w_rec, transpose_b=True),
                    tf.matmul(g_out, w_out, transpose_b=True),
                    tf.matmul(xs, g, transpose_a=True), tf.matmul(zs, g, transpose_a=True),
                    tf.matmul(zs, g_out, transpose_a=True)]
        return tf.add_n([tf.reduce_sum(t) for t in forward + backward])

    print("[3/3] dense-matmul bound", file=sys.stderr, flush=True)
    bound_time, bound_all = _time(bound, (xs, zs, g, g_out), args.warmup, args.repeats,
                                  "bound")
    rows.append(("dense-matmul bound (same FLOPs)", bound_time))
    results["matmul_bound_s"] = bound_time
    results["matmul_bound_all_s"] = bound_all
    results["matmul_gflop"] = flops / 1e9
    results["lsnn_over_bound"] = lsnn_time / bound_time
    if not args.no_lstm:
        results["lsnn_over_lstm"] = lsnn_time / results["lstm_s"]

    print(f"\nOne training step (forward + backward + Adam), B={B}, T={T}, {n_in} inputs, "
          f"{n} ALIF ({args.adaptive} adaptive), {k}-class LeakyReadout; median of "
          f"{args.repeats} after {args.warmup} warm-up")
    print(f"{'model':<40} {'step (ms)':>10} {'vs LSNN':>9} {'vs bound':>9}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds * 1e3:>10.1f} {seconds / lsnn_time:>9.2f} "
              f"{seconds / bound_time:>9.1f}")
    print(f"matmul FLOPs of the LSNN step: {flops / 1e9:.2f} GFLOP "
          f"({flops / 1e9 / bound_time:.1f} GFLOP/s when batched)")
    print(json.dumps(results))
    if args.json:
        with open(args.json, "x") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
