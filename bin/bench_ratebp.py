#!/usr/bin/env python
"""Time and memory of one training step: rate-based backpropagation vs BPTT, T = 10, 100, 1000.

Model: ``Input(T, 40) -> LIF(units, recurrent=False) -> LIF(units) (recurrent) ->
kspike.LeakyReadout(10)``, B = 32, softmax cross-entropy on the time-averaged readout, Adam.
- BPTT: ``tf.GradientTape`` over the whole sequence (the layers' engine, ``kspike.SpikingRNN``
  when available, else ``keras.layers.RNN``).
- RateBP: ``kspike.learning.RateBP().compute`` (spike phase without tape, one-step rate phase).

Each (method, T) runs in a fresh subprocess: it traces and warms up the step, resets the
resident-set high-water mark (``/proc/self/clear_refs``), runs one step and reads ``VmHWM``;
glibc returns freed buffers at once (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows
the live tensors. "step MB" is the high-water mark minus the resident set before that step,
i.e. what one warmed-up step allocates on top of weights and data; "train MB" is the process's
high-water mark minus its resident set once model and data exist (tracing, first steps and
optimizer state included; no reset). "ms/step" is the median of
``--repeats`` steps. Ratios RateBP / BPTT are taken between figures measured in the same run;
on a loaded machine compare the ratios, not absolute times.

With ``--network conv`` the model is the network of ``bin/tutorial_conv_snn_mnist.py`` (two
FoldTime(Conv2D)-FoldTime(BatchNorm)-LIFNeurons-MaxPool blocks, Dense(128)-LIFNeurons,
Dense(10), time mean), random images repeated over T (direct encoding), and the summary also
prints how each figure grows from the first to the last T.

Usage:
    bin/bench_ratebp.py                 # T in (10, 100, 1000), 128 units, 10 repeats
    bin/bench_ratebp.py --network conv --steps 4 8 16 32 --batch 64 --repeats 3
    bin/bench_ratebp.py --quick         # 64 units, 3 repeats
    bin/bench_ratebp.py --json out.json # also write the figures (never overwrites a file)
"""
import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _conv_args(steps):
    """The defaults of bin/tutorial_conv_snn_mnist.py (FoldTime weight layers) at T = steps."""
    import tutorial_conv_snn_mnist as tutorial
    args = tutorial.parse_args(["--mnist-path", __file__, "--time-steps", str(steps)])
    return args


def worker(method, steps, units, batch, repeats, engine, network="lsnn"):
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    import kspike
    import kspike.learning

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if network == "conv":
        # the network of bin/tutorial_conv_snn_mnist.py, direct encoding of random images
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tutorial_conv_snn_mnist as tutorial
        model = tutorial.build_model(_conv_args(steps))
        images = rng.random((batch, 1, 28 * 28)).astype("float32")
        x = tf.constant(np.repeat(images, steps, axis=1))
        time_mean = False
    else:
        rnn = getattr(kspike, "SpikingRNN", None) if engine == "kspike" else None
        rnn = rnn or keras.layers.RNN
        n_in = 40
        inputs = keras.Input((steps, n_in))
        h = rnn(kspike.LIF(units, recurrent=False, seed=1), return_sequences=True)(inputs)
        h = rnn(kspike.LIF(units, seed=2), return_sequences=True)(h)
        model = keras.Model(inputs, kspike.LeakyReadout(10, seed=3)(h))
        x = tf.constant((rng.random((batch, steps, n_in)) < 0.1).astype("float32"))
        time_mean = True
    y = tf.constant(rng.integers(0, 10, batch))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    rule = kspike.learning.RateBP()
    baseline = _status("VmRSS")

    @tf.function
    def step_bptt():
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            value = loss(y, tf.reduce_mean(out, axis=1) if time_mean else out)
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return value

    @tf.function
    def step_ratebp():
        result = rule.compute(model, x, y, loss)
        optimizer.apply_gradients(zip(result.gradients, model.trainable_variables))
        return result.loss

    step = step_bptt if method == "bptt" else step_ratebp
    for _ in range(2):
        step().numpy()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    step().numpy()
    peak = _status("VmHWM") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - start)
    return {"method": method, "T": steps, "network": network, "ms_per_step": 1000.0 * float(np.median(times)),
            "peak_mb": peak, "process_peak_mb": _status("VmHWM"),
            "training_mb": max(_status("VmHWM"), peak + before) - baseline}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 units, 3 repeats")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--engine", choices=["kspike", "keras"], default="kspike",
                        help="sequence engine of the BPTT baseline (default kspike.SpikingRNN "
                             "when available)")
    parser.add_argument("--network", choices=["lsnn", "conv"], default="lsnn",
                        help="lsnn: the two-layer LIF network above; conv: the network of "
                             "bin/tutorial_conv_snn_mnist.py (use with --steps 4 8 16 32 "
                             "--batch 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow intra/inter-op threads of every worker")
    parser.add_argument("--json", default=None, help="write the figures to this new file")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.units, args.repeats = 64, 3
    if args.worker:
        method, steps = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(method, steps, args.units, args.batch, args.repeats,
                                args.engine, args.network)))
        return 0
    if args.json and os.path.exists(args.json):
        parser.error(f"--json file {args.json!r} exists; choose a new name (never overwritten)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="2",
               TF_NUM_INTRAOP_THREADS=str(args.threads), TF_NUM_INTEROP_THREADS=str(args.threads),
               OMP_NUM_THREADS=str(args.threads))
    results = {}
    for steps in args.steps:
        for method in ("bptt", "ratebp"):
            print(f"T={steps:5d} {method:7s} ...", end=" ", flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--worker", method,
                       str(steps), "--units", str(args.units), "--batch", str(args.batch),
                       "--repeats", str(args.repeats), "--engine", args.engine,
                       "--network", args.network]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print("failed")
                sys.stderr.write(out.stderr[-3000:])
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[(method, steps)] = result
            print(f"{result['ms_per_step']:9.1f} ms/step  {result['peak_mb']:8.1f} step MB "
                  f"{result['training_mb']:8.1f} train MB", flush=True)
    print(f"\nnetwork={args.network} units={args.units} batch={args.batch} "
          f"repeats={args.repeats} engine={args.engine} threads={args.threads}")
    print(f"{'T':>6} | {'BPTT ms':>9} {'RateBP ms':>9} {'time ratio':>10} | "
          f"{'BPTT step MB':>12} {'RateBP step MB':>14} | {'BPTT train MB':>13} "
          f"{'RateBP train MB':>15} {'ratio':>6}")
    for steps in args.steps:
        b, r = results[("bptt", steps)], results[("ratebp", steps)]
        mem_ratio = (r["training_mb"] / b["training_mb"] if b["training_mb"] > 0
                     else float("nan"))
        print(f"{steps:6d} | {b['ms_per_step']:9.1f} {r['ms_per_step']:9.1f} "
              f"{r['ms_per_step'] / b['ms_per_step']:10.2f} | {b['peak_mb']:12.1f} "
              f"{r['peak_mb']:14.1f} | {b['training_mb']:13.1f} {r['training_mb']:15.1f} "
              f"{mem_ratio:6.2f}")
    first, last = args.steps[0], args.steps[-1]
    if len(args.steps) > 1:
        print(f"\ngrowth from T={first} to T={last} (figure at T={last} / figure at T={first}):")
        for method in ("bptt", "ratebp"):
            a, b = results[(method, first)], results[(method, last)]
            print(f"  {method:7s} step MB x{b['peak_mb'] / a['peak_mb']:.2f}   train MB "
                  f"x{b['training_mb'] / a['training_mb']:.2f}   process peak MB "
                  f"x{b['process_peak_mb'] / a['process_peak_mb']:.2f}   ms/step "
                  f"x{b['ms_per_step'] / a['ms_per_step']:.2f}")
    if args.json:
        with open(args.json, "x") as f:
            json.dump([results[k] for k in sorted(results)], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
