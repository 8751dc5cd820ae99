#!/usr/bin/env python
"""Trace STDP on one synapse: one presynaptic input, one LIF neuron (kspike.learning.STDP).

Reproduces the classic one-pre-one-post trace figure of SpikingJelly's STDP tutorial with
kspike: random input spikes drive a single feed-forward LIF neuron through one weight; after each
time step the spikes are recorded in single-step streaming mode and ``rule.step(on_grad=True)``
gives the gradient contribution -dW * scale, which plain SGD applies (W += lr * scale * dW).
The figure shows the input spikes, the presynaptic trace, the output spikes, the postsynaptic
trace and the weight over time.

Usage:
    bin/tutorial_stdp.py                        # 128 steps, figure in ./stdp_tutorial/
    bin/tutorial_stdp.py --quick                # 48 steps
    bin/tutorial_stdp.py --output-dir figures   # PNG and PDF in figures/ (never overwritten:
                                                # an existing name gets a numbered suffix)
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_path(directory, stem, suffix):
    """directory/stem.suffix, or stem_1, stem_2, ... when it exists (never overwrite)."""
    path = os.path.join(directory, f"{stem}.{suffix}")
    index = 1
    while os.path.exists(path):
        path = os.path.join(directory, f"{stem}_{index}.{suffix}")
        index += 1
    return path


def run(steps, seed, input_probability, tau_pre, tau_post, learning_rate):
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike
    import kspike.learning

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    cell = kspike.LIF(1, tau=5.0, thr=0.1, recurrent=False,
                      input_initializer=keras.initializers.Constant(0.4))
    cell.build((None, 1))
    rule = kspike.learning.STDP(tau_pre=tau_pre, tau_post=tau_post, synapse=cell,
                                f_pre=lambda w: tf.clip_by_value(w, -1.0, 1.0),
                                f_post=lambda w: tf.clip_by_value(w, -1.0, 1.0))
    optimizer = keras.optimizers.SGD(learning_rate)
    states = cell.get_initial_state(1)
    x = (rng.random((steps, 1, 1)) < input_probability).astype("float32")
    record = {"s_pre": [], "s_post": [], "tr_pre": [], "tr_post": [], "w": []}
    for t in range(steps):
        z, states = cell(x[t], states)
        rule.record(x[t], z)
        optimizer.apply_gradients(rule.step(on_grad=True))
        record["s_pre"].append(float(x[t, 0, 0]))
        record["s_post"].append(float(z[0, 0]))
        record["tr_pre"].append(float(rule.traces["pre"][0, 0]))
        record["tr_post"].append(float(rule.traces["post"][0, 0]))
        record["w"].append(float(cell.input_kernel[0, 0]))
    return {k: np.asarray(v) for k, v in record.items()}


def plot(record, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = np.arange(len(record["w"]))
    fig, axes = plt.subplots(5, 1, figsize=(8, 8), sharex=True)
    panels = [("s_pre", "input spikes", "C0", True), ("tr_pre", "presynaptic trace", "C0", False),
              ("s_post", "output spikes", "C3", True), ("tr_post", "postsynaptic trace", "C3", False),
              ("w", "weight W", "k", False)]
    for ax, (key, label, color, is_spike) in zip(axes, panels):
        if is_spike:
            on = t[record[key] > 0.5]
            ax.vlines(on, 0, 1, color=color)
            ax.set_ylim(0, 1.1)
            ax.set_yticks([])
        else:
            ax.plot(t, record[key], color=color)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("time step")
    axes[0].set_title("Trace STDP, one presynaptic input and one LIF neuron (kspike)")
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    paths = [free_path(directory, "stdp_one_pre_one_post", ext) for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 steps instead of --steps")
    parser.add_argument("--steps", type=int, default=128, help="time steps (default 128)")
    parser.add_argument("--output-dir", default="stdp_tutorial",
                        help="directory of the PNG and PDF (created; files never overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-probability", type=float, default=0.3,
                        help="input spike probability per step (default 0.3)")
    parser.add_argument("--tau-pre", type=float, default=2.0)
    parser.add_argument("--tau-post", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, received {args.steps}")
    if not 0.0 < args.input_probability <= 1.0:
        parser.error(f"--input-probability must be in (0, 1], received {args.input_probability}")
    steps = 48 if args.quick else args.steps
    print(f"Simulating {steps} steps of one synapse with trace STDP ...", flush=True)
    record = run(steps, args.seed, args.input_probability, args.tau_pre, args.tau_post,
                 args.learning_rate)
    print(f"input spikes {int(record['s_pre'].sum())}, output spikes "
          f"{int(record['s_post'].sum())}, weight {record['w'][0]:.4f} -> {record['w'][-1]:.4f}")
    for path in plot(record, args.output_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
