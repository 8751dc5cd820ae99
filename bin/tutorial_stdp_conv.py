"""STDP and gradient descent in one convolutional SNN on MNIST (SpikingJelly's STDP tutorial).

The network of SpikingJelly's tutorial "STDP learning" (combined STDP + gradient descent), on
MNIST (1 input channel, 28x28), T = 8 steps of Poisson spikes per image:

    Conv(16, 3x3, no bias)-IF-MaxPool(2) -> Conv(16, 3x3, no bias)-IF-MaxPool(2) -> Flatten ->
    Dense(64, no bias)-IF -> Dense(10, no bias)-IF -> mean over the T steps (firing rates)

with kspike.IFNeurons (V_th = 1, hard reset to 0, sigmoid surrogate; SpikingJelly's IFNode) and
PyTorch's default initialisation (uniform, bound 1/sqrt(fan_in)). Three runs, the same budget
(--train-samples images, one pass, batch --batch-size), the same initial weights:

    stdp    the Conv2D kernels learn by STDP (kspike.learning.STDP: tau_pre = 2, tau_post = 100,
            f_pre = f_post = clamp(W, -1, 1)) through plain SGD (lr 0.1, momentum 0) on the
            -dW "gradient"; their backpropagated gradient is discarded; the Dense layers learn
            by Adam on the cross-entropy of the mean output; one forward pass per batch serves
            both, traces start at 0 for every batch (SpikingJelly's reset);
    gd      every layer by Adam on the same loss (backpropagation through time);
    random  the Conv2D kernels stay at their random initial values, the Dense layers by Adam.

    python bin/tutorial_stdp_conv.py --mnist-path ~/.keras/datasets/mnist.npz
    python bin/tutorial_stdp_conv.py --quick        # seconds, synthetic digits

Figures: the conv1 filters before and after STDP, the weight-change history (mean |dW| per
step of each Conv2D kernel, STDP against gradient descent), the learning curves; results.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tutorial_utils as utils  # noqa: E402

utils.quiet_tensorflow()

MODES = ("stdp", "gd", "random")
CONVS = ("conv1", "conv2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mnist-path", default=os.path.expanduser("~/.keras/datasets/mnist.npz"),
                        help="Keras-format mnist.npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which runs to make (gd is the baseline of the ratios)")
    parser.add_argument("--train-samples", type=int, default=12800,
                        help="training images of every run (one pass over the first N)")
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-steps", type=int, default=8, help="T, steps per image")
    parser.add_argument("--stdp-learning-rate", type=float, default=0.1,
                        help="SGD learning rate of the STDP kernels (momentum 0)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--output-dir", default=None,
                        help="folder for figures and results (default: a new folder under "
                             "./results/); an existing non-empty folder is never overwritten: "
                             "a new sub-folder is made in it")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run on synthetic digits (no files needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    for name in ("train_samples", "test_samples", "batch_size", "time_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received "
                         f"{getattr(args, name)}")
    if args.quick:
        args.train_samples, args.test_samples, args.batch_size, args.time_steps = 64, 32, 16, 4
    elif not os.path.exists(args.mnist_path):
        parser.error(f"--mnist-path {args.mnist_path!r} does not exist (the mnist.npz that "
                     "keras.datasets.mnist.load_data() saves); use --quick for a smoke test")
    return args


def synthetic_digits(rng, n):
    """Ten classes of 28x28 images: a bright bar at a class-dependent place, plus noise."""
    import numpy as np
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for k, label in enumerate(labels):
        images[k, 2 + 2 * label:5 + 2 * label, 4:24] = 255
    return images, labels


def build_model(args):
    """SpikingJelly's STDP tutorial network for (B, T, 28, 28, 1) spikes; PyTorch's default
    initialisation (uniform in +-1/sqrt(fan_in))."""
    import keras
    import kspike

    def init():
        return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")

    fold = kspike.FoldTime
    inputs = keras.Input((args.time_steps, 28, 28, 1), name="spikes")
    h = inputs
    for k, name in enumerate(CONVS, start=1):
        h = fold(keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
                                     kernel_initializer=init(), name=name), name=f"{name}_t")(h)
        h = kspike.IFNeurons(name=f"if{k}")(h)
        h = fold(keras.layers.MaxPooling2D(2), name=f"pool{k}")(h)
    h = fold(keras.layers.Flatten(), name="flatten")(h)
    h = fold(keras.layers.Dense(64, use_bias=False, kernel_initializer=init()), name="fc1")(h)
    h = kspike.IFNeurons(name="if3")(h)
    h = fold(keras.layers.Dense(10, use_bias=False, kernel_initializer=init()), name="fc2")(h)
    h = kspike.IFNeurons(name="if4")(h)
    rates = keras.layers.GlobalAveragePooling1D(name="mean_over_time")(h)
    return keras.Model(inputs, rates, name="stdp_conv_snn")


def train(mode, args, train_ds, test_ds):
    """One run; returns its record (test accuracy, curves, filters)."""
    import keras
    import numpy as np
    import tensorflow as tf
    import kspike
    from kspike.learning.stdp import Clamp

    keras.utils.set_random_seed(args.seed)            # the same initial weights in every run
    model = build_model(args)
    kernels = [model.get_layer(f"{name}_t").layer.kernel for name in CONVS]
    initial_conv1 = kernels[0].numpy().copy()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    adam = keras.optimizers.Adam(args.learning_rate)
    sgd = keras.optimizers.SGD(args.stdp_learning_rate, momentum=0.0)
    conv_ids = {id(k) for k in kernels}
    if mode == "gd":
        adam_vars = list(model.trainable_variables)
    else:
        adam_vars = [v for v in model.trainable_variables if id(v) not in conv_ids]
    rules = []
    outputs = [model.output]
    if mode == "stdp":
        for name in CONVS:
            conv = model.get_layer(f"{name}_t").layer
            # the postsynaptic IF layer is found by kspike.graph.parse
            rule = kspike.learning.STDP(tau_pre=2.0, tau_post=100.0, f_pre=Clamp(-1.0, 1.0),
                                        f_post=Clamp(-1.0, 1.0), synapse=conv)
            outputs.extend(rule.activity_layers(model))
            rules.append(rule)
    probe = keras.Model(model.input, outputs)
    adam.build(adam_vars)
    if rules:
        sgd.build(kernels)

    @tf.function
    def train_step(x, y):
        before = [tf.identity(k) for k in kernels]
        with tf.GradientTape() as tape:
            out = tf.nest.flatten(probe(x, training=True))
            predictions = out[0]
            loss = loss_fn(y, predictions)
        adam.apply(tape.gradient(loss, adam_vars), adam_vars)
        if rules:
            pairs = [pair for k, rule in enumerate(rules)
                     for pair in rule.batch_gradients(out[1 + 2 * k], out[2 + 2 * k])]
            sgd.apply([g for g, _ in pairs], [v for _, v in pairs])
        change = [tf.reduce_mean(tf.abs(k - b)) for k, b in zip(kernels, before)]
        correct = tf.cast(tf.equal(tf.argmax(predictions, -1, output_type=tf.int32),
                                   tf.cast(y, tf.int32)), tf.float32)
        return loss, tf.reduce_mean(correct), change

    @tf.function
    def test_step(x, y):
        predictions = model(x, training=False)
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(predictions, -1, output_type=tf.int32),
                                              tf.cast(y, tf.int32)), tf.float32))

    curves = {"loss": [], "accuracy": [], "conv1": [], "conv2": []}
    start = time.time()
    for step, (x, y) in enumerate(train_ds):
        loss, accuracy, change = train_step(x, y)
        curves["loss"].append(float(loss))
        curves["accuracy"].append(float(accuracy))
        for name, c in zip(CONVS, change):
            curves[name].append(float(c))
        if step % 20 == 0:
            print(f"  [{mode}] step {step}: loss {float(loss):.3f}, batch accuracy "
                  f"{float(accuracy):.3f}, mean |dW| conv1 {curves['conv1'][-1]:.2e} conv2 "
                  f"{curves['conv2'][-1]:.2e}", flush=True)
    train_time = time.time() - start
    correct = total = 0
    for x, y in test_ds:
        correct += float(test_step(x, y))
        total += int(y.shape[0])
    return {"test_accuracy": correct / total, "train_seconds": train_time, "curves": curves,
            "initial_conv1": initial_conv1, "conv1": kernels[0].numpy(),
            "steps": len(curves["loss"])}


def figures(records, out):
    import numpy as np
    from kspike import plotting
    written = []
    if "stdp" in records:
        for label, kernel in (("initial", records["stdp"]["initial_conv1"]),
                              ("after STDP", records["stdp"]["conv1"])):
            fig = plotting.conv_filters(kernel, title=f"conv1 filters, {label}")
            stem = "conv1_filters_" + ("initial" if label == "initial" else "stdp")
            written += plotting.save_figure(fig, os.path.join(out, stem))
    history = {}
    for mode in ("stdp", "gd"):
        if mode in records:
            for name in CONVS:
                history[f"{mode} {name} mean |dW|"] = np.maximum(
                    records[mode]["curves"][name], 1e-12)
    if history:
        fig = plotting.learning_curve(history, xlabel="training step", log=True)
        fig.axes[0].set_title("weight change per step of the Conv2D kernels", fontsize=8)
        written += plotting.save_figure(fig, os.path.join(out, "weight_change_history"))
    curves = {}
    for mode, record in records.items():
        curves[f"{mode}_loss"] = record["curves"]["loss"]
        curves[f"{mode}_accuracy"] = record["curves"]["accuracy"]
    fig = plotting.learning_curve(curves, xlabel="training step")
    written += plotting.save_figure(fig, os.path.join(out, "learning_curve"))
    return written


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    from kspike import tasks

    out = utils.output_directory(args.output_dir, "stdp_conv")
    keras.utils.set_random_seed(args.seed)
    common = dict(steps=args.time_steps, encoding="poisson", batch_size=args.batch_size)
    if args.quick:
        rng = np.random.default_rng(args.seed)
        train_x, train_y = synthetic_digits(rng, args.train_samples)
        test_x, test_y = synthetic_digits(rng, args.test_samples)
    else:
        train_x, train_y = tasks.load_image_arrays(args.mnist_path, "train")
        test_x, test_y = tasks.load_image_arrays(args.mnist_path, "test")
        train_x, train_y = train_x[:args.train_samples], train_y[:args.train_samples]
        test_x, test_y = test_x[:args.test_samples], test_y[:args.test_samples]
    train_ds = tasks.static_images(images=train_x, labels=train_y, seed=args.seed, **common)
    test_ds = tasks.static_images(images=test_x, labels=test_y, split="test", seed=args.seed + 1,
                                  **common)
    print(f"SpikingJelly's STDP conv SNN on {'synthetic digits' if args.quick else 'MNIST'}: "
          f"T = {args.time_steps} Poisson steps, {len(train_x)} training images (one pass, "
          f"batch {args.batch_size}), {len(test_x)} test images; runs: {', '.join(args.modes)}",
          flush=True)
    records = {}
    for mode in args.modes:
        records[mode] = train(mode, args, train_ds, test_ds)
        print(f"{mode}: test accuracy {records[mode]['test_accuracy']:.4f} "
              f"({records[mode]['train_seconds']:.0f} s of training, "
              f"{records[mode]['steps']} steps)", flush=True)
    if "gd" in records:
        base = records["gd"]["test_accuracy"]
        ratios = ", ".join(f"{mode} {r['test_accuracy'] / base:.3f}x"
                           for mode, r in records.items() if base > 0)
        print(f"Test accuracy relative to all-gradient-descent (same run, same budget): {ratios}")
    written = figures(records, out)
    utils.save_json(os.path.join(out, "results.json"), {
        "args": vars(args),
        "runs": {mode: {"test_accuracy": r["test_accuracy"], "train_seconds": r["train_seconds"],
                        "steps": r["steps"], "curves": r["curves"]}
                 for mode, r in records.items()}})
    print("Figures: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
