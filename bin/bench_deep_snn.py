"""Training-step time and peak memory of the convolutional SNN of bin/tutorial_conv_snn_mnist.py
in kspike, in SpikingJelly, and with ReLU in place of the LIF neuron layers, from one run.

One training step (forward, backward, Adam) on a batch of B random 28x28 images shown for T
steps, of

- ``kspike LIF``: the tutorial network (``tutorial_conv_snn_mnist.build_model``:
  FoldTime(Conv-BN)-LIFNeurons-MaxPool x 2, Dense(128)-LIFNeurons, Dense(10), mean over T);
- ``kspike ReLU``: the same network with ``keras.layers.ReLU`` in place of the LIF layers (the
  baseline of the ratios: its time is that of the weight layers);
- ``SpikingJelly``: the same network in SpikingJelly (``bin/_spikingjelly_conv_snn.py``:
  multi-step mode, LIFNode with the torch backend, CPU), run with ``--peer-python``, a Python
  that has torch and spikingjelly (neither is a kspike requirement; default
  /work/peers-venv/bin/python when it exists);

and the LIF layer alone on a (B, T, 28, 28, 16) map (the first LIF layer of the network),
forward and backward, with kspike's hand-written backward pass and with TensorFlow's autodiff
of the plain loop; and inference of 4 batches by the tutorial network, with
``model.predict`` and with a user's ``tf.function`` of the model (the graph an export holds,
the plain TensorFlow loop). The kspike LIF figures are taken twice: with the native C++ loops of the
neuron layers (the default where they compile, docs/neuron_layers.md) and with KSPIKE_NATIVE=0,
the TensorFlow loops. Every measurement runs in its own process (so each peak RSS is its own),
one after another, with --threads intra-op threads in TensorFlow and torch alike. Figures are
the fastest of --repeats steps after a warm-up step (on a machine shared with other work the
fastest step is the least disturbed one; the medians are in the JSON output); peak memory is
the process's peak resident set size and, in brackets, its growth from the start of the steps
(after imports, model and data).

    python bin/bench_deep_snn.py                              # B = 64, T = 4 and 16
    python bin/bench_deep_snn.py --time-steps 4 --repeats 5 --peer-python ~/sj/bin/python
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _tutorial_utils as utils  # noqa: E402

utils.quiet_tensorflow()

DEFAULT_PEER = "/work/peers-venv/bin/python"
PEER_SCRIPT = os.path.join(HERE, "_spikingjelly_conv_snn.py")
# (kind, extra environment): "-tf" is the same measurement with KSPIKE_NATIVE=0, the
# TensorFlow loops of the hand-written backward instead of the C++ ones.
KINDS = ("kspike-relu", "kspike-lif", "kspike-lif-tf", "layer-hand", "layer-hand-tf",
         "layer-autodiff", "predict-lif", "predict-lif-tf", "predict-lif-function")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-steps", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of TensorFlow and of torch")
    parser.add_argument("--peer-python", default=DEFAULT_PEER if os.path.exists(DEFAULT_PEER)
                        else None,
                        help="a Python with torch and spikingjelly for the SpikingJelly column")
    parser.add_argument("--output", default=None, help="JSON file for the results (new file)")
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, received "
                         f"{getattr(args, name)}")
    if any(t < 1 for t in args.time_steps):
        parser.error(f"--time-steps must be >= 1, received {args.time_steps}")
    return args


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def median_time(fn, repeats):
    import numpy as np
    fn()                                                     # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def network_step(neurons, batch, steps):
    import keras
    import numpy as np
    import tensorflow as tf
    import tutorial_conv_snn_mnist as tutorial
    keras.utils.set_random_seed(0)
    args = SimpleNamespace(time_steps=steps, channels=(16, 32), hidden=128, tau=2.0,
                           fold_time=True)
    model = tutorial.build_model(args, neurons=neurons)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch,) + tuple(model.input.shape[1:])).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return lambda: step().numpy()


def layer_step(hand_written, batch, steps):
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

    return lambda: step().numpy()


def predict_step(kind, batch, steps):
    """Inference of 4 batches of the tutorial network: ``model.predict`` (the native loops
    of the neuron layers, or with KSPIKE_NATIVE=0 the TensorFlow loops), or ("function") a
    user's ``tf.function`` of the model over the same batches, the graph every export holds
    (the plain TensorFlow loop)."""
    import keras
    import numpy as np
    import tensorflow as tf
    import tutorial_conv_snn_mnist as tutorial
    keras.utils.set_random_seed(0)
    args = SimpleNamespace(time_steps=steps, channels=(16, 32), hidden=128, tau=2.0,
                           fold_time=True)
    model = tutorial.build_model(args)
    rng = np.random.default_rng(0)
    x = (rng.random((4 * batch,) + tuple(model.input.shape[1:])) < 0.3).astype(np.float32)
    if kind == "predict-lif-function":
        serve = tf.function(lambda v: model(v))
        batches = [tf.constant(x[i:i + batch]) for i in range(0, len(x), batch)]
        return lambda: [serve(b).numpy() for b in batches]
    return lambda: model.predict(x, batch_size=batch, verbose=0)


def child(args):
    steps = args.time_steps[0]
    if args.child.startswith("predict"):
        fn = predict_step(args.child, args.batch_size, steps)
    elif args.child.startswith("kspike"):
        fn = network_step(args.child.split("-")[1], args.batch_size, steps)
    else:
        fn = layer_step(args.child.startswith("layer-hand"), args.batch_size, steps)
    baseline = rss_mb()
    median, fastest = median_time(fn, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_s": fastest, "median_s": median, "peak_rss_mb": peak,
                      "baseline_rss_mb": baseline}))


def run(command, env=None):
    """Run one measurement process; its last output line is JSON. (result, error)."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exit code {result.returncode}: {tail}"
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, f"unexpected output: {lines[-1]!r}"


def memory(result):
    return f"{result['peak_rss_mb']:.0f} (+{result['peak_rss_mb'] - result['baseline_rss_mb']:.0f})"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    threads = str(args.threads)
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    peer = args.peer_python
    if peer is None or not os.path.exists(peer):
        print(f"SpikingJelly not available: set --peer-python to a Python with torch and "
              f"spikingjelly (e.g. python -m venv ~/sj && ~/sj/bin/pip install torch "
              f"spikingjelly); {'none given' if peer is None else repr(peer) + ' not found'}. "
              "Measuring kspike only.", flush=True)
        peer = None
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {threads} thread(s) "
          f"per process, batch {args.batch_size}, fastest of {args.repeats} steps", flush=True)
    rows = []
    for steps in args.time_steps:
        row = {"T": steps, "batch": args.batch_size, "threads": args.threads}
        common = ["--batch-size", str(args.batch_size), "--time-steps", str(steps),
                  "--repeats", str(args.repeats)]
        for kind in KINDS:
            print(f"T = {steps}: {kind} ...", flush=True)
            kind_env = {**env, "KSPIKE_NATIVE": "0"} if kind.endswith("-tf") else env
            result, error = run([sys.executable, os.path.abspath(__file__), "--child", kind]
                                + common, kind_env)
            row[kind] = result if result is not None else {"error": error}
            if error:
                print(f"  {kind} failed: {error}", flush=True)
        if peer is not None:
            print(f"T = {steps}: spikingjelly ...", flush=True)
            result, error = run([peer, PEER_SCRIPT, "--threads", threads] + common, env)
            row["spikingjelly"] = result if result is not None else {"error": error}
            if error:
                print(f"  SpikingJelly failed: {error}", flush=True)
        rows.append(row)

    def seconds(row, kind):
        return row.get(kind, {}).get("step_s")

    print("\nTraining step of the tutorial network (seconds; peak RSS MB (+ growth during the "
          "steps)); ratios from this run; 'TF loops': KSPIKE_NATIVE=0")
    print("| T | kspike ReLU | kspike LIF | kspike LIF, TF loops | SpikingJelly LIF | "
          "LIF/ReLU | LIF/ReLU, TF loops | SpikingJelly/kspike | kspike LIF memory | "
          "SpikingJelly memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        relu, lif, lif_tf, sj = (seconds(row, k) for k in ("kspike-relu", "kspike-lif",
                                                           "kspike-lif-tf", "spikingjelly"))
        row["ratio_lif_relu"] = lif / relu if lif and relu else None
        row["ratio_lif_tf_relu"] = lif_tf / relu if lif_tf and relu else None
        row["ratio_spikingjelly_kspike"] = sj / lif if sj and lif else None
        cells = [f"{v:.4f}" if v else "-" for v in (relu, lif, lif_tf, sj)]
        ratios = [f"{v:.2f}x" if v else "-" for v in (
            row["ratio_lif_relu"], row["ratio_lif_tf_relu"], row["ratio_spikingjelly_kspike"])]
        mems = [memory(row[k]) if seconds(row, k) else "-" for k in ("kspike-lif",
                                                                     "spikingjelly")]
        print(f"| {row['T']} | " + " | ".join(cells + ratios + mems) + " |")
    print("\nLIF layer alone on a (B, T, 28, 28, 16) map, forward + backward (seconds)")
    print("| T | hand-written backward, C++ loops | the same, TF loops | autodiff of the TF loop "
          "| C++ vs autodiff |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        hand, hand_tf, auto = (seconds(row, k) for k in ("layer-hand", "layer-hand-tf",
                                                         "layer-autodiff"))
        row["layer_speedup"] = auto / hand if hand and auto else None
        print(f"| {row['T']} | " + " | ".join(f"{v:.4f}" if v else "-" for v in (
            hand, hand_tf, auto)) + f" | {row['layer_speedup'] or 0:.2f}x |")
    print(f"\nInference of {4 * args.batch_size} images (4 batches of {args.batch_size}) by "
          "the tutorial network (seconds)")
    print("| T | model.predict, C++ loops | model.predict, TF loops | a user's tf.function "
          "(the exported graph) | predict speed-up over the tf.function |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        native, tf_loops, function = (seconds(row, k) for k in (
            "predict-lif", "predict-lif-tf", "predict-lif-function"))
        row["predict_speedup"] = function / native if native and function else None
        print(f"| {row['T']} | " + " | ".join(f"{v:.4f}" if v else "-" for v in (
            native, tf_loops, function)) + f" | {row['predict_speedup'] or 0:.2f}x |")
    if args.output:
        with open(args.output, "x") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
