"""Training-step time of the convolutional SNN of bin/tutorial_conv_snn_mnist.py against the
same network with ReLU in place of the LIF neuron layers, and the LIF layer alone with its
hand-written backward pass against TensorFlow's autodiff of the plain loop.

    python bin/bench_deep_snn.py                     # B = 64, T = 4 and 16
    python bin/bench_deep_snn.py --batch-size 32 --time-steps 4 --repeats 5

Prints a table (median seconds per step over --repeats steps after a warm-up step) and writes
it as JSON with --output.
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tutorial_utils as utils  # noqa: E402

utils.quiet_tensorflow()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-steps", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=None, help="JSON file for the results (new file)")
    return parser.parse_args(argv)


def median_time(fn, repeats):
    import numpy as np
    fn()                                                     # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_step_time(neurons, batch, steps, repeats, fold_time=False):
    import keras
    import numpy as np
    import tensorflow as tf
    import tutorial_conv_snn_mnist as tutorial
    keras.utils.set_random_seed(0)
    args = SimpleNamespace(time_steps=steps, channels=(16, 32), hidden=128, tau=2.0,
                           fold_time=fold_time)
    model = tutorial.build_model(args, neurons=neurons)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, steps, 784)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return median_time(lambda: step().numpy(), repeats)


def layer_time(hand_written, batch, steps, repeats):
    import numpy as np
    import tensorflow as tf
    import kspike
    from kspike.layers import node_sequence
    params = kspike.LIFNeurons().parameters
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0.8, 1.0, (steps, batch, 28, 28, 16)).astype(np.float32))
    v0 = tf.zeros((batch, 28, 28, 16))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            spikes, _, _ = node_sequence(x, v0, params, hand_written_backward=hand_written)
            loss = tf.reduce_sum(spikes * x)
        return tape.gradient(loss, x)

    return median_time(lambda: step().numpy(), repeats)


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf
    rows = []
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS", "TensorFlow's default")
    print(f"TensorFlow {tf.__version__}, intra-op threads: {threads}, batch {args.batch_size}",
          flush=True)
    print("Training step (forward, backward, Adam) of the tutorial network; weight layers in "
          "TimeDistributed (TD) or kspike.FoldTime (fold); seconds per step", flush=True)
    print(f"{'T':>3} {'ReLU TD':>8} {'LIF TD':>8} {'LIF/ReLU':>9} {'ReLU fold':>10} "
          f"{'LIF fold':>9} {'LIF/ReLU':>9} | {'LIF layer hand':>15} {'autodiff':>9} "
          f"{'speed-up':>9}", flush=True)
    for steps in args.time_steps:
        row = {"T": steps, "batch": args.batch_size}
        for fold, key in ((False, "td"), (True, "fold")):
            row[f"relu_{key}_s"] = train_step_time("relu", args.batch_size, steps,
                                                   args.repeats, fold)
            row[f"lif_{key}_s"] = train_step_time("lif", args.batch_size, steps, args.repeats,
                                                  fold)
            row[f"ratio_{key}"] = row[f"lif_{key}_s"] / row[f"relu_{key}_s"]
        # The LIF layer alone on (B, T, 28, 28, 16) currents, forward and backward.
        row["layer_hand_written_s"] = layer_time(True, args.batch_size, steps, args.repeats)
        row["layer_autodiff_s"] = layer_time(False, args.batch_size, steps, args.repeats)
        row["layer_speedup"] = row["layer_autodiff_s"] / row["layer_hand_written_s"]
        rows.append(row)
        print(f"{steps:>3} {row['relu_td_s']:>8.4f} {row['lif_td_s']:>8.4f} "
              f"{row['ratio_td']:>9.2f} {row['relu_fold_s']:>10.4f} {row['lif_fold_s']:>9.4f} "
              f"{row['ratio_fold']:>9.2f} | {row['layer_hand_written_s']:>15.4f} "
              f"{row['layer_autodiff_s']:>9.4f} {row['layer_speedup']:>9.2f}", flush=True)
    if args.output:
        with open(args.output, "x") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
