#!/usr/bin/env python
"""How well S-TLLR's updates of the spiking layer point along the BPTT gradient, on the
sequential-MNIST tutorial network (bin/tutorial_sequential_mnist_with_LSNN.py, LSNN + DEEP R).

For one batch of real MNIST and the untrained network, prints for each setting the norms of the
S-TLLR updates of the input and recurrent kernels and their cosine with the BPTT gradient of the
same loss (the readout's update is exact in both, cosine 1).

    python bin/bench_stllr_alignment.py --mnist-path /path/to/mnist.npz [--batch-size 64]

Settings compared: the paper's command-line factors (0.2, 0.75, -1, 1) and longer pre-traces
(lambda_pre 0.95-1), the paper's secondary activation psi = 1/(100|x|+1)^2 and the cell's
pseudo-derivative, bp and DFA learning signals; loss on the last 28 steps (the tutorial's) or
per-step over the last 420 or all 840 steps (``--loss-window``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETTINGS = [((0.2, 0.75, -1.0, 1.0), "paper", "bp"),
            ((0.2, 0.99, -1.0, 1.0), "paper", "bp"),
            ((0.5, 1.0, 1.0, 1.0), "paper", "bp"),
            ((0.2, 0.75, -1.0, 1.0), "surrogate", "bp"),
            ((0.2, 0.95, -1.0, 1.0), "surrogate", "bp"),
            ((0.2, 0.99, -1.0, 1.0), "surrogate", "bp"),
            ((0.2, 0.995, -1.0, 1.0), "surrogate", "bp"),
            ((0.2, 1.0, -1.0, 1.0), "surrogate", "bp"),
            ((0.2, 0.99, -1.0, 1.0), "surrogate", "dfa")]


def cosine(a, b):
    import tensorflow as tf
    a, b = tf.reshape(a, [-1]), tf.reshape(b, [-1])
    return float(tf.reduce_sum(a * b) / (tf.norm(a) * tf.norm(b) + 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-path", required=True, help="Keras-format mnist.npz")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loss-window", type=int, nargs="+", default=[28, 420],
                        help="loss windows: 28 is the tutorial's (logits averaged); longer "
                             "ones use per-step cross-entropies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf
    import kspike
    from kspike import tasks
    import tutorial_sequential_mnist_with_LSNN as tutorial

    net = tutorial.parse_args(["--mnist-path", args.mnist_path, "--seed", str(args.seed)])
    keras.utils.set_random_seed(args.seed)
    model = tutorial.build_model(net)
    x, y = next(iter(tasks.sequential_mnist("train", batch_size=args.batch_size, seed=args.seed,
                                            path=args.mnist_path)))
    names = [v.path for v in model.trainable_variables][:2]
    print(f"spiking-layer kernels: {', '.join(names)}; batch {args.batch_size}", flush=True)
    for window in args.loss_window:
        average = "logits" if window == net.readout_window else "loss"
        loss = tasks.window_cross_entropy(window, average=average)
        bptt = kspike.learning.BPTT().gradients(model, x, y, loss)[:2]
        print(f"loss over the last {window} steps ({average} averaged): BPTT norms "
              + " ".join(f"{float(tf.norm(g)):.1e}" for g in bptt), flush=True)
        for factors, psi, feedback in SETTINGS:
            rule = kspike.learning.STLLR(
                factors=factors, last_steps=window, feedback=feedback, seed=args.seed,
                secondary_activation=None if psi == "paper" else psi)
            grads = rule.gradients(model, x, y, loss)[:2]
            print(f"  factors {factors}, psi {psi:9s}, {feedback:3s}: norms "
                  + " ".join(f"{float(tf.norm(g)):.1e}" for g in grads) + "  cosine with BPTT "
                  + " ".join(f"{cosine(g, b):+.2f}" for g, b in zip(grads, bptt)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
