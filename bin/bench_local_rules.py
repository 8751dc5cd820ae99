#!/usr/bin/env python
"""Memory and time of one gradient computation: BPTT vs e-prop vs S-TLLR at growing T.

    python bin/bench_local_rules.py            # T = 300, 1000, 3000
    python bin/bench_local_rules.py --rules bptt eprop eprop1p   # e-prop: two passes vs one
    python bin/bench_local_rules.py --quick    # T = 50, 100, 200, tiny batch, one repeat

Every (rule, T) configuration runs in a fresh subprocess so that its memory is its own. Memory is
read from /proc/self/status (Linux; works on CPU where tf.config.experimental.get_memory_info
does not): VmRSS just before the first gradient call (TensorFlow, model and data loaded) and VmHWM,
the resident-set high-water mark, after all calls. "peak" is VmHWM; "extra" is VmHWM minus that
baseline, i.e. what computing gradients adds. Time is the median over ``--repeats`` calls after one
warm-up call (tracing), divided by T: milliseconds per time step. Each rule's gradient function is
wrapped in one ``tf.function``. Rules: "bptt", "eprop" (two passes: outputs, then traces),
"eprop1p" (e-prop in a single pass, ``EProp(single_pass=True)``: network, readout, per-step error
and traces forward in time, the traces advanced by the native op in chunks of steps),
"eprop1p_tf" (the same as one TensorFlow loop, ``native=False``), "stllr" (S-TLLR on the stored sequences) and "stllr_online"
(``STLLR(online=True)``, the chunked online form). The network: B x T Poisson inputs (n_in = 40 at 20 Hz), one layer of
100 neurons (50 LIF + 50 ALIF, kspike.SpikingRNN), a 2-unit LeakyReadout, MSE on a random target.

The machine may be shared: compare the ratios printed (each rule against BPTT at the same T, each
T against the first T of the same rule), not the absolute figures.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def worker(rule_name, steps, batch, units, repeats):
    """Runs one configuration and prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import keras
    import tensorflow as tf
    import kspike
    import kspike.learning

    keras.utils.set_random_seed(0)
    n_in, n_out = 40, 2
    cell = kspike.ALIF(units, n_adaptive=units // 2, tau_adaptation=700.0, thr=0.01, seed=0)
    model = keras.Sequential([keras.Input((steps, n_in)),
                              kspike.SpikingRNN(cell, return_sequences=True),
                              kspike.LeakyReadout(n_out, seed=1)])
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((batch, steps, n_in)) < 0.02).astype("float32"))
    y = tf.constant(rng.standard_normal((batch, steps, n_out)).astype("float32"))
    loss = keras.losses.MeanSquaredError()
    rule = {"bptt": kspike.learning.BPTT, "eprop": kspike.learning.EProp,
            "eprop1p": lambda: kspike.learning.EProp(single_pass=True),
            "eprop1p_tf": lambda: kspike.learning.EProp(single_pass=True, native=False),
            "stllr": lambda: kspike.learning.STLLR(online=False),
            "stllr_online": lambda: kspike.learning.STLLR(online=True)}[rule_name]()

    @tf.function
    def gradients(x, y):
        return rule.compute(model, x, y, loss).gradients

    baseline = _proc_status_kb("VmRSS")
    grads = gradients(x, y)
    _ = [g.numpy() for g in grads if g is not None]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grads = gradients(x, y)
        _ = [g.numpy() for g in grads if g is not None]
        times.append(time.perf_counter() - start)
    peak = _proc_status_kb("VmHWM")
    print(json.dumps({"rule": rule_name, "T": steps, "batch": batch, "units": units,
                      "ms_per_step": 1000.0 * float(np.median(times)) / steps,
                      "peak_mb": peak / 1024.0, "baseline_mb": baseline / 1024.0,
                      "extra_mb": (peak - baseline) / 1024.0}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--rules", nargs="+", default=["bptt", "eprop", "stllr"],
                        choices=["bptt", "eprop", "eprop1p", "eprop1p_tf", "stllr",
                                 "stllr_online"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="T = 50, 100, 200, batch 4")
    parser.add_argument("--worker", nargs=5, metavar=("RULE", "T", "B", "UNITS", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rule, steps, batch, units, repeats = args.worker
        worker(rule, int(steps), int(batch), int(units), int(repeats))
        return 0
    if args.json and os.path.exists(args.json):
        raise SystemExit(f"{args.json} exists; choose another --json path (results are never "
                         "overwritten).")
    steps_list = args.steps or ([50, 100, 200] if args.quick else [300, 1000, 3000])
    batch = 4 if args.quick else args.batch
    repeats = 1 if args.quick else args.repeats
    rows = []
    for rule in args.rules:
        for steps in steps_list:
            print(f"running {rule} T={steps} ...", flush=True)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", rule,
                                  str(steps), str(batch), str(args.units), str(repeats)],
                                 capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"configuration {rule} T={steps} failed "
                                 f"(exit code {out.returncode})")
            rows.append(json.loads(lines[-1]))
    by = {(r["rule"], r["T"]): r for r in rows}
    print()
    print(f"B={batch}, 40 inputs, {args.units} neurons (half ALIF), {repeats} timed calls; "
          "machine possibly loaded: read the ratios")
    header = (f"{'rule':10s} {'T':>5s} {'ms/step':>8s} {'x BPTT':>7s} {'peak MB':>8s} "
              f"{'extra MB':>9s} {'peak/peak(T0)':>14s} {'extra/extra(T0)':>16s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        first = by[(r["rule"], steps_list[0])]
        bptt = by.get(("bptt", r["T"]))
        speed = f"{r['ms_per_step'] / bptt['ms_per_step']:7.2f}" if bptt else f"{'-':>7s}"
        extra_ratio = r["extra_mb"] / max(first["extra_mb"], 1e-9)
        print(f"{r['rule']:10s} {r['T']:5d} {r['ms_per_step']:8.3f} {speed} {r['peak_mb']:8.1f} "
              f"{r['extra_mb']:9.1f} {r['peak_mb'] / first['peak_mb']:14.3f} "
              f"{extra_ratio:16.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
