#!/usr/bin/env python
"""Does a spike-sparse recurrent product pay off on this machine?

Inside a ``tf.while_loop`` of T steps (as in ``kspike.SpikingRNN``'s forward loop), the recurrent
input z_{t-1} W_rec of binary spikes z (B, n) is computed three ways, each timed per step:

- ``dense``: ``tf.matmul(z, W_rec)`` (what kspike does);
- ``gather``: the rows of W_rec of the neurons that spiked, summed per sample
  (``tf.where`` + ``tf.gather`` + ``tf.math.unsorted_segment_sum``);
- ``sparse``: a ``tf.sparse.SparseTensor`` of the spikes times W_rec
  (``tf.sparse.sparse_dense_matmul``).

for several spike probabilities per step. The three results are checked to be equal. Prints a
table of microseconds per step and the ratio to ``dense`` (all measured in the same run, in
interleaved rounds).

    python bin/bench_sparse_recurrent.py
    python bin/bench_sparse_recurrent.py --batch 1 --units 1024 --rates 0.01 0.05
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05, 0.15],
                        help="spike probabilities per neuron and step")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 5)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5, received {args.repeats}")
    for name in ("batch", "units", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    if not all(0.0 < r <= 1.0 for r in args.rates):
        parser.error(f"--rates must be in (0, 1], received {args.rates}")

    import numpy as np
    import tensorflow as tf

    B, n, T = args.batch, args.units, args.steps
    rng = np.random.default_rng(0)
    w_rec = tf.constant(rng.normal(0.0, 0.1, (n, n)).astype("float32"))

    def recurrent(kind, z):
        if kind == "dense":
            return tf.matmul(z, w_rec)
        index = tf.where(z > 0.5)
        if kind == "gather":
            rows = tf.gather(w_rec, index[:, 1])
            return tf.math.unsorted_segment_sum(rows, index[:, 0], B)
        spikes = tf.sparse.SparseTensor(index, tf.ones(tf.shape(index)[:1]), (B, n))
        return tf.sparse.sparse_dense_matmul(spikes, w_rec)

    def make(kind):
        @tf.function
        def run(spikes):
            inputs = tf.TensorArray(tf.float32, T).unstack(spikes)

            def body(t, total):
                return t + 1, total + recurrent(kind, inputs.read(t))

            return tf.while_loop(lambda t, _: t < T, body, (0, tf.zeros((B, n))))[1]
        return run

    kinds = ("dense", "gather", "sparse")
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; B={B}, {n} neurons, T={T}", flush=True)
    print(f"{'rate':>6} {'kind':>8} {'us/step':>9} {'vs dense':>9}")
    for rate in args.rates:
        spikes = tf.constant((rng.uniform(size=(T, B, n)) < rate).astype("float32"))
        functions = {kind: make(kind) for kind in kinds}
        results = {kind: f(spikes).numpy() for kind, f in functions.items()}
        for kind in kinds[1:]:
            np.testing.assert_allclose(results[kind], results["dense"], rtol=1e-4, atol=1e-3)
        times = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind, f in functions.items():
                start = time.perf_counter()
                f(spikes).numpy()
                times[kind].append((time.perf_counter() - start) / T * 1e6)
        dense = statistics.median(times["dense"])
        for kind in kinds:
            median = statistics.median(times[kind])
            print(f"{rate:>6.2f} {kind:>8} {median:>9.1f} {median / dense:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
