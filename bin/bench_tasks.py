"""Generation speed of the on-the-fly tasks (store-recall, evidence accumulation).

For each task it times batches drawn from the kspike pipeline and, in the same run, two
baselines on the same shapes: a dense Bernoulli draw (``tf.random.uniform(shape) < p``, the naive
way to make Poisson inputs) and one forward pass of the tutorial's LSNN on the batch. It prints
seconds per batch and the ratios, so the figures stay meaningful on a busy machine.

    python bin/bench_tasks.py --batches 10
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timed(function, repeats):
    function()                       # warm-up (tracing, thread pools)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10, help="batches timed per task")
    args = parser.parse_args()
    import keras
    import tensorflow as tf
    import kspike
    from kspike import tasks

    cases = [
        ("store_recall", tasks.store_recall(batch_size=128, seed=0), 0.05, 20),
        ("evidence_accumulation", tasks.evidence_accumulation(batch_size=64, seed=0), 0.04, 100),
    ]
    print(f"{'task':24s} {'shape':>18s} {'s/batch':>9s} {'dense draw':>11s} {'ratio':>6s} "
          f"{'forward':>9s} {'ratio':>6s}")
    for name, dataset, p, units in cases:
        iterator = iter(dataset)
        x = next(iterator)[0]
        shape = tuple(x.shape)
        generate = timed(lambda: next(iterator), args.batches)

        @tf.function
        def dense_draw():
            return tf.cast(tf.random.uniform(shape) < p, tf.float32)
        dense = timed(lambda: dense_draw().numpy(), args.batches)

        cell = kspike.ALIF(units, n_adaptive=units // 2, seed=0)
        model = keras.Sequential([keras.Input(shape[1:]),
                                  kspike.SpikingRNN(cell, return_sequences=True),
                                  kspike.LeakyReadout(2)])
        forward_fn = tf.function(lambda v: model(v))
        forward = timed(lambda: forward_fn(x).numpy(), max(1, args.batches // 5))
        print(f"{name:24s} {str(shape):>18s} {generate:9.3f} {dense:11.3f} "
              f"{generate / dense:6.2f} {forward:9.3f} {generate / forward:6.2f}", flush=True)


if __name__ == "__main__":
    main()
