#!/usr/bin/env python
"""Time of one recurrent S-TLLR gradient against the BPTT gradient, in one run, and the memory of
S-TLLR's two forms at growing T.

    python bin/bench_stllr.py                  # timing at B=64, T=784; memory at T=300, 3000
    python bin/bench_stllr.py --skip-memory    # timing only

Timing: B=64 Poisson inputs (80 channels, 5% per step), one kspike.SpikingRNN layer of 256
neurons (128 LIF + 128 ALIF, the native C++ loops), LeakyReadout(10), MSE on the last 56
steps (a (B, T) sample weight). Each gradient function is one ``tf.function``; the median over
``--repeats`` calls after one warm-up call, the rules interleaved (each repeat times every
rule once) so that all see the same load; wall and process CPU time. Rows: BPTT
(``kspike.learning.BPTT``), STLLR(online=False) (the whole sequence at once), the same with
``last_steps=56`` and STLLR() (the default online form in chunks, one pass for this MSE,
whose memory does not depend on T); the ratio columns are each time over BPTT's in this run.

Memory: ``bin/bench_local_rules.py`` (every configuration in its own subprocess, peak
resident memory) for STLLR() (online, the default) and STLLR(online=False) at T = 300 and 3000, B=32, 128
neurons; the ratio peak(T=3000) / peak(T=300) is printed per form.
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timing(batch, steps, repeats):
    import numpy as np
    import keras
    import tensorflow as tf
    import kspike
    import kspike.learning

    keras.utils.set_random_seed(0)
    n_in, units, n_out, window = 80, 256, 10, 56
    cell = kspike.ALIF(units, n_adaptive=units // 2, tau_adaptation=700.0, thr=0.01, seed=0)
    model = keras.Sequential([keras.Input((steps, n_in)),
                              kspike.SpikingRNN(cell, return_sequences=True),
                              kspike.LeakyReadout(n_out, seed=1)])
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((batch, steps, n_in)) < 0.05).astype("float32"))
    y = tf.constant(rng.standard_normal((batch, steps, n_out)).astype("float32"))
    mask = np.zeros((batch, steps), "float32")
    mask[:, -window:] = 1.0
    mask = tf.constant(mask)
    loss = keras.losses.MeanSquaredError()
    rules = [("BPTT", kspike.learning.BPTT()),
             ("STLLR online=False", kspike.learning.STLLR(online=False)),
             (f"STLLR last_steps={window}", kspike.learning.STLLR(online=False, last_steps=window)),
             ("STLLR (online, default)", kspike.learning.STLLR(online=True))]
    functions = []
    for name, rule in rules:
        @tf.function
        def gradients(x, y, mask, rule=rule):
            return rule.compute(model, x, y, loss, sample_weight=mask).gradients

        _ = [g.numpy() for g in gradients(x, y, mask) if g is not None]       # trace, warm up
        functions.append((name, gradients))
    # Interleaved: every repeat times each rule once, so all rows see the same load.
    wall = {name: [] for name, _ in functions}
    cpu = {name: [] for name, _ in functions}
    for _ in range(repeats):
        for name, gradients in functions:
            start, start_cpu = time.perf_counter(), time.process_time()
            _ = [g.numpy() for g in gradients(x, y, mask) if g is not None]
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    results = [(name, float(np.median(wall[name])), float(np.median(cpu[name])))
               for name, _ in functions]
    base, base_cpu = results[0][1], results[0][2]
    print(f"\nB={batch}, T={steps}, 80 inputs, {units} neurons (half ALIF), LeakyReadout(10), "
          f"MSE on the last {window} steps; median of {repeats} interleaved calls "
          f"(wall time and process CPU time)")
    print(f"{'rule':28s} {'s/gradient':>10s} {'x BPTT':>7s} {'CPU s':>8s} {'x BPTT':>7s}")
    for name, seconds, cpu_seconds in results:
        print(f"{name:28s} {seconds:10.3f} {seconds / base:7.2f} {cpu_seconds:8.3f} "
              f"{cpu_seconds / base_cpu:7.2f}")


def memory(steps_list, repeats, rules=("stllr_online", "stllr")):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_local_rules.py")
    rows = []
    for rule in rules:
        for steps in steps_list:
            out = subprocess.run([sys.executable, script, "--worker", rule, str(steps), "32",
                                  "128", str(repeats)], capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"memory run {rule} T={steps} failed")
            rows.append(json.loads(lines[-1]))
    print(f"\nB=32, 40 inputs, 128 neurons (half ALIF); peak resident memory per configuration")
    print(f"{'form':14s} {'T':>5s} {'peak MB':>8s} {'extra MB':>9s} {'peak/peak(T0)':>14s}")
    for r in rows:
        first = next(f for f in rows if f["rule"] == r["rule"])
        print(f"{r['rule']:14s} {r['T']:5d} {r['peak_mb']:8.1f} {r['extra_mb']:9.1f} "
              f"{r['peak_mb'] / first['peak_mb']:14.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    timing(args.batch, args.steps, args.repeats)
    if not args.skip_memory:
        memory(args.memory_steps, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
