"""Sequential MNIST with an LSNN (Bellec et al. 2018), LSNN's tutorial configuration in kspike.

An image is read one pixel per millisecond (784 ms), encoded by threshold crossings into 80 input
channels, followed by a 56 ms cue; the class is read from the leaky readout averaged over the cue.
Network: 120 LIF + 100 ALIF neurons (tau 20 ms, tau_a 700 ms, beta 1.8, thr 0.01, 5 ms
refractory), DEEP R with 12% connectivity and Dale's law, firing-rate regularisation to 10 Hz,
Adam 1e-2 decayed by 0.8 every 2500 iterations, batches of 256.

LSNN's reference curve: ~40% test accuracy after 100 iterations, ~60% after 200, >90% after
20-30k, up to 96% after 36k.

    python bin/tutorial_sequential_mnist_with_LSNN.py --mnist-path mnist.npz --iterations 200
    python bin/tutorial_sequential_mnist_with_LSNN.py --quick          # smoke test, no files

``--mnist-path`` is the Keras mnist.npz (keras.datasets.mnist.load_data() stores it in
~/.keras/datasets/mnist.npz).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tutorial_utils as utils  # noqa: E402

utils.quiet_tensorflow()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mnist-path", default=None, help="Keras-format mnist.npz")
    parser.add_argument("--iterations", type=int, default=36000, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50,
                        help="iterations between test-accuracy reports")
    parser.add_argument("--eval-batches", type=int, default=4,
                        help="test batches per report (the full test set is used at the end)")
    parser.add_argument("--n-regular", type=int, default=120, help="LIF neurons")
    parser.add_argument("--n-adaptive", type=int, default=100, help="ALIF neurons")
    parser.add_argument("--tau-adaptation", type=float, default=700.0, help="ms")
    parser.add_argument("--beta", type=float, default=1.8)
    parser.add_argument("--thr", type=float, default=0.01)
    parser.add_argument("--n-refractory", type=int, default=5, help="steps (ms)")
    parser.add_argument("--connectivity", type=float, default=0.12,
                        help="DEEP R connectivity (0 for dense weights without rewiring)")
    parser.add_argument("--excitatory", type=float, default=0.75,
                        help="fraction of excitatory neurons (Dale's law)")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--lr-decay", type=float, default=0.8)
    parser.add_argument("--lr-decay-every", type=int, default=2500)
    parser.add_argument("--l1", type=float, default=1e-2, help="DEEP R l1 term")
    parser.add_argument("--reg", type=float, default=0.1, help="firing-rate regulariser strength")
    parser.add_argument("--reg-rate", type=float, default=10.0, help="target rate in Hz")
    parser.add_argument("--readout-window", type=int, default=56,
                        help="final steps the class is read from (LSNN: 28)")
    parser.add_argument("--test-batches", type=int, default=None,
                        help="batches of the final test (default the whole test set)")
    utils.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 3)
        args.batch_size = min(args.batch_size, 8)
        args.eval_every = min(args.eval_every, 3)
        args.eval_batches = 1
        args.test_batches = 1
        args.n_regular, args.n_adaptive = 12, 8
    elif args.mnist_path is None:
        parser.error("--mnist-path is required (the Keras mnist.npz, e.g. "
                     "~/.keras/datasets/mnist.npz); use --quick for a smoke test without data")
    return args


def synthetic_mnist(rng, n):
    """Digit-like images: a bright stroke whose row depends on the class, plus noise."""
    import numpy as np
    labels = rng.integers(0, 10, n)
    images = (rng.random((n, 28, 28)) < 0.05) * rng.integers(0, 256, (n, 28, 28))
    for k, label in enumerate(labels):
        images[k, 4 + 2 * label: 6 + 2 * label, 6:22] = 255
    return images.astype(np.uint8), labels


def build_model(args):
    import kspike
    sparse = args.connectivity > 0
    cell = kspike.ALIF(args.n_regular + args.n_adaptive, n_adaptive=args.n_adaptive, tau=20.0,
                       tau_adaptation=args.tau_adaptation, beta=args.beta, thr=args.thr,
                       n_refractory=args.n_refractory, dampening_factor=0.3,
                       connectivity=args.connectivity if sparse else None,
                       dale=args.excitatory if sparse else None, seed=args.seed)
    return utils.spiking_model(cell, 80, 10, "smnist_lsnn", args.seed, tau=20.0)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import kspike
    from kspike import tasks

    out = utils.output_directory(args.output_dir, "sequential_mnist")
    keras.utils.set_random_seed(args.seed)
    if args.quick:
        rng = np.random.default_rng(args.seed)
        train_images, train_labels = synthetic_mnist(rng, 32)
        test_images, test_labels = synthetic_mnist(rng, 16)
        source = dict(train=dict(images=train_images, labels=train_labels),
                      test=dict(images=test_images, labels=test_labels))
    else:
        source = dict(train=dict(path=args.mnist_path), test=dict(path=args.mnist_path))
    train_ds = tasks.sequential_mnist("train", batch_size=args.batch_size, seed=args.seed,
                                      **source["train"]).repeat()
    validation_ds = tasks.sequential_mnist("test", batch_size=args.batch_size, shuffle=True,
                                           seed=args.seed + 1, **source["test"])
    test_ds = tasks.sequential_mnist("test", batch_size=args.batch_size, **source["test"])

    model = build_model(args)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        args.learning_rate, decay_steps=args.lr_decay_every, decay_rate=args.lr_decay,
        staircase=True)
    optimizer = keras.optimizers.Adam(schedule)
    if args.connectivity > 0:
        optimizer = kspike.DeepR(optimizer, l1=args.l1, temperature=0.0, seed=args.seed)
    rule = utils.make_rule(args.rule, last_steps=args.readout_window)
    trainer = kspike.Trainer(
        model, optimizer, tasks.window_cross_entropy(args.readout_window), rule=rule,
        regularizers=[kspike.FiringRateRegularizer(target=args.reg_rate / 1000.0,
                                                   strength=args.reg)],
        metrics=[tasks.window_accuracy(args.readout_window)], seed=args.seed,
        verbose=2 if args.quick else 1)
    print(f"LSNN: {args.n_regular} LIF + {args.n_adaptive} ALIF, rule {args.rule}, "
          f"{args.iterations} iterations of batch {args.batch_size}", flush=True)
    start = time.time()
    history = trainer.fit(train_ds, steps=args.iterations, steps_per_epoch=args.eval_every,
                          validation_data=validation_ds, validation_steps=args.eval_batches)
    train_time = time.time() - start
    iterations = [args.eval_every * (k + 1) for k in range(len(history.history["loss"]))]
    iterations[-1] = min(iterations[-1], args.iterations)
    for it, acc, val in zip(iterations, history.history["accuracy"],
                            history.history["val_accuracy"]):
        print(f"iteration {it:6d}: train accuracy {acc:.3f}, test accuracy {val:.3f}")
    test_data = test_ds if args.test_batches is None else test_ds.take(args.test_batches)
    test = trainer.evaluate(test_data)
    print(f"Final test accuracy {test['accuracy']:.4f} after {args.iterations} iterations "
          f"({train_time:.0f} s of training)", flush=True)

    from kspike import plotting
    x, y = next(iter(test_ds.take(1)))
    activity = utils.ActivityProbe(model)(x[:1])
    probabilities = utils.softmax(activity["y"][0])
    fig = plotting.activity_figure(
        x[0].numpy(), activity["z"][0], thresholds=activity["A"][0], outputs=probabilities,
        n_regular=args.n_regular, output_labels=list(range(10)),
        title=f"sequential MNIST, label {int(y[0])}, predicted "
              f"{int(np.argmax(probabilities[-args.readout_window:].mean(0)))}")
    written = plotting.save_figure(fig, os.path.join(out, "lsnn_activity"))
    fig = plotting.learning_curve(history, keys=["accuracy", "val_accuracy"],
                                  steps=iterations)
    written += plotting.save_figure(fig, os.path.join(out, "learning_curve"))
    utils.save_json(os.path.join(out, "results.json"), {
        "args": vars(args), "iterations": iterations, "history": history.history,
        "test_accuracy": test["accuracy"], "train_seconds": train_time})
    print("Figures: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
