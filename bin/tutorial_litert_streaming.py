"""Train a small LSNN, export it to LiteRT and stream a test sequence sample by sample.

The task: 2 classes of spike trains on 20 input channels, class k firing its half of the
channels at 100 Hz and the other half at 20 Hz; the readout (kspike.LeakyReadout) must show
the class at every step. The script

1. trains the model briefly with Keras' own ``fit`` (BPTT),
2. writes the one-step function with ``kspike.export.litert`` (a ``.tflite`` file),
3. loads it with ``kspike.export.load_litert`` (the ai-edge-litert interpreter, ``pip install
   'kspike[edge]'``) and feeds one test sequence to it one time step at a time, as a device
   would, timing every step,
4. plots the streamed output against the Keras model's whole-sequence output (they agree to
   float32 round-off, spikes identical) and saves the figure.

    python bin/tutorial_litert_streaming.py                 # ~1 min on a laptop CPU
    python bin/tutorial_litert_streaming.py --quick         # seconds (CI)

See docs/litert.md.
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
    parser.add_argument("--steps", type=int, default=100, help="time steps per sequence (ms)")
    parser.add_argument("--neurons", type=int, default=64, help="ALIF neurons")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--output-dir", default=None,
                        help="folder for the figure, the .tflite file and results.json "
                             "(default: a new folder under ./results/); an existing non-empty "
                             "folder is never overwritten: a new sub-folder is made in it")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.neurons, args.epochs, args.train_samples = 30, 16, 1, 32
    return args


def make_data(rng, n, steps, channels=20):
    """(x (n, steps, channels) spikes, y (n, steps) class at every step)."""
    import numpy as np
    labels = rng.integers(0, 2, n)
    rates = np.full((n, channels), 0.02)
    for k, label in enumerate(labels):
        half = slice(0, channels // 2) if label == 0 else slice(channels // 2, channels)
        rates[k, half] = 0.1
    x = (rng.uniform(size=(n, steps, channels)) < rates[:, None, :]).astype("float32")
    return x, np.repeat(labels[:, None], steps, axis=1)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import kspike
    from kspike import plotting

    out = utils.output_directory(args.output_dir, "litert_streaming")
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = make_data(rng, args.train_samples, args.steps)
    x_test, y_test = make_data(rng, 8, args.steps)

    model = keras.Sequential([
        keras.Input((None, x_train.shape[-1])),
        keras.layers.RNN(kspike.ALIF(args.neurons, n_adaptive=args.neurons // 2, thr=0.05,
                                     seed=args.seed), return_sequences=True, name="alif"),
        kspike.LeakyReadout(2, tau=20.0, seed=args.seed + 1, name="readout")])
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.time()
    history = model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)
    train_time = time.time() - start
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    # The voltages and firing rates of the trained layer, through kspike.Probe.
    _, records = kspike.Probe(model)(x_test)
    rate_hz = 1000.0 * float(records[0].spikes.mean()) / records[0].dt
    print(f"Trained {args.neurons} ALIF for {args.epochs} epochs in {train_time:.0f} s: "
          f"test accuracy per step {accuracy:.3f}, firing rate {rate_hz:.1f} Hz", flush=True)

    # 2. The one-step function as a LiteRT flat buffer, batch size 1.
    path = kspike.export.litert(model, os.path.join(out, "lsnn.tflite"))
    runner = kspike.export.load_litert(path)

    # 3. Stream one test sequence sample by sample.
    sequence = x_test[:1]                                     # (1, T, 20)
    states = runner.initial_state()
    streamed, latencies = [], []
    for t in range(sequence.shape[1]):
        x_t = np.ascontiguousarray(sequence[:, t])            # what a sensor delivers at t
        tick = time.perf_counter()
        y_t, states = runner.step(x_t, states)
        latencies.append(time.perf_counter() - tick)
        streamed.append(y_t[0])
    streamed = np.stack(streamed)                             # (T, 2)
    whole = keras.ops.convert_to_numpy(model(sequence))[0]    # the whole sequence at once
    difference = float(np.abs(streamed - whole).max())
    per_step_ms = 1000.0 * float(np.median(latencies))
    print(f"LiteRT streaming: {per_step_ms:.3f} ms per step (median over "
          f"{len(latencies)} steps); largest difference to the whole-sequence output "
          f"{difference:.2e}", flush=True)

    # 4. The figure: streamed vs whole-sequence output, and their difference.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    times = np.arange(1, sequence.shape[1] + 1)
    for k, color in enumerate(("tab:blue", "tab:orange")):
        axes[0].plot(times, whole[:, k], color=color, lw=2.5, alpha=0.5,
                     label=f"class {k}, Keras model (whole sequence)")
        axes[0].plot(times, streamed[:, k], color=color, ls="--", lw=1.2,
                     label=f"class {k}, LiteRT (streamed step by step)")
    axes[0].set_ylabel("readout output")
    axes[0].set_title(f"test sequence of class {int(y_test[0, 0])}", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].semilogy(times, np.maximum(np.abs(streamed - whole).max(axis=1), 1e-12),
                     color="black")
    axes[1].set_ylabel("|streamed - whole|")
    axes[1].set_xlabel("time (ms)")
    fig.tight_layout()
    written = plotting.save_figure(fig, os.path.join(out, "litert_streaming"))
    utils.save_json(os.path.join(out, "results.json"), {
        "args": vars(args), "test_accuracy": accuracy, "train_seconds": train_time,
        "loss": history.history["loss"], "litert_ms_per_step": per_step_ms,
        "max_abs_difference": difference, "firing_rate_hz": rate_hz, "tflite": path})
    print("Figures: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
