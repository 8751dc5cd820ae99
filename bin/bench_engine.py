#!/usr/bin/env python
"""Benchmark of ``kspike.SpikingRNN`` against ``keras.layers.RNN(same cell)``, ``keras.layers.LSTM``
and the dense-matmul bound, all measured in the same run.

One BPTT training step (forward, backward, Adam update) of
``[recurrent layer -> kspike.LeakyReadout(10)]`` with a softmax cross-entropy on the readout
averaged over the last 56 steps, B=64, 80 inputs, ALIF neurons of which half adaptive
(n_refractory=5), for T in (100, 400, 784, 1568) and units in (256, 1024).

- Stacked (``--variants stacked_spiking_rnn stacked_spiking_rnn_tf stacked_keras_rnn``): two
  recurrent ALIF layers of ``units`` each (the SRNN shape of Yin et al.), SpikingRNN native,
  SpikingRNN(native=False) and keras.layers.RNN, against the bound of the two layers'
  products (the upper layer has ``units`` inputs) and the stacked keras.layers.RNN step.
- Variants: ``spiking_rnn`` (kspike.SpikingRNN: its native C++ loops where they compile, see
  ``kspike.native``), ``spiking_rnn_tf`` (SpikingRNN(native=False): its TensorFlow loops),
  ``spiking_rnn_xla`` (SpikingRNN(jit_compile=True):
  its forward and backward loops compiled by XLA), ``spiking_rnn_xla_step`` (optional: the whole
  training step of SpikingRNN under ``tf.function(jit_compile=True)``), ``keras_rnn``
  (keras.layers.RNN(same cell)), ``lstm`` (keras.layers.LSTM(units)).
- Step time: median of ``--repeats`` (>= 5) timed steps after two warm-up steps; the variants of
  one configuration are timed in interleaved rounds so that a change of machine load hits them
  alike. Ratios are printed against the keras.layers.RNN step and against the matmul bound.
- Surrogate (``--surrogate``, default triangular, LSNN's 0.3 max(0, 1 - |x|)): that of every
  ALIF cell. With the native loops, the fraction of nonzero pseudo-derivatives (neurons x
  steps x batch) and how many steps took the sparse recurrent backward product are counted in
  the timed steps themselves (``kspike.native.backward_stats``) and printed.
- Matmul bound: the dense products alone, timed in the same process: forward x W_in (one
  matmul) and T recurrent products z W_rec in a loop; backward T products g W_rec^T in a loop,
  g W_in^T, and the two weight gradients x^T g and z^T g.
- Memory: a fresh subprocess per (variant, units, T) traces and warms up the training step,
  resets the resident-set high-water mark (``/proc/self/clear_refs``), runs one more step and
  reads the mark (``VmHWM``); glibc is told to return freed buffers at once
  (``MALLOC_MMAP_THRESHOLD_``) and oneDNN's pooling allocator is switched off
  (``TF_ENABLE_ONEDNN_OPTS=0``) so the resident set follows the live tensors (the TF CPU
  allocator has no queryable statistics); a thread sampling the resident set every 0.5 ms
  backs up the kernel's lazily updated mark. "peak MB" is the high-water mark minus the resident
  set before the step, i.e. what one training step allocates on top of weights and data; "MB
  per step" is the slope of that peak between T and a short run (T=50) of the same model.
- Streaming: the 1-sample latency of ``loaded.step(x_t, states)`` of a model exported with
  ``kspike.export.saved_model`` (median over the steps of a 400-step stream), in a fresh process
  with TensorFlow's default thread pools, in one with one inter-op thread (a tiny per-step
  graph runs faster without cross-thread scheduling), and with the step compiled by XLA
  (``kspike.export.saved_model(..., jit_compile=True)``); as the baseline, the same process
  times a reloaded function of the same signature that does nothing (TensorFlow's fixed cost
  of one call from Python).

- Inference (``--predict``): ``model.predict`` of one batch (``--predict-batch``, default 256)
  of the same model, for ``spiking_rnn`` (the native forward op alone) and ``spiking_rnn_tf``
  (the TensorFlow forward loop, which export and every function of the user's run), timed
  in interleaved rounds; the ratio is the speed-up of the native forward. The process CPU
  time of the same calls is printed as well (a shared machine's load disturbs it less).

Usage:
    bin/bench_engine.py                   # the full table (takes several minutes)
    bin/bench_engine.py --predict --steps 784 --units 256   # model.predict, native vs TF
    bin/bench_engine.py --predict --steps 784 --units 256 --threads 1   # on one thread
    bin/bench_engine.py --quick           # T in (100, 784), 256 units, 5 repeats, no LSTM memory
    bin/bench_engine.py --json out.json   # also write the figures as JSON
    bin/bench_engine.py --units 256 --steps 784 --variants spiking_rnn --no-memory \
        --no-streaming --surrogate triangular --repeats 7   # native step vs the bound only

Figures depend on the machine and on its load: compare the ratios, which are measured in the
same run, rather than absolute times across runs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STACKED = ("stacked_spiking_rnn", "stacked_spiking_rnn_tf", "stacked_keras_rnn")
VARIANTS = ("spiking_rnn", "spiking_rnn_tf", "spiking_rnn_xla", "spiking_rnn_xla_step",
            *STACKED,
            "keras_rnn", "lstm")
DEFAULT_VARIANTS = ("spiking_rnn", "spiking_rnn_tf", "spiking_rnn_xla", "keras_rnn", "lstm")
MEMORY_BASELINE_STEPS = 50


def _status_mb(field):
    """VmRSS (resident set) or VmHWM (its high-water mark) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(variant, units, steps, n_inputs, batch, seed=0, surrogate="triangular"):
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike

    keras.utils.set_random_seed(seed)
    if variant in STACKED:
        # Two recurrent layers (the SRNN shape of Yin et al.): the lower one's spikes are the
        # upper one's inputs.
        def cell(offset):
            return kspike.ALIF(units, n_adaptive=units // 2, n_refractory=5,
                               seed=seed + offset, surrogate=surrogate)
        if variant == "stacked_keras_rnn":
            layers = [keras.layers.RNN(cell(i), return_sequences=True) for i in range(2)]
        else:
            layers = [kspike.SpikingRNN(cell(i), return_sequences=True,
                                        native=variant == "stacked_spiking_rnn" and "auto")
                      for i in range(2)]
        recurrent = keras.Sequential(layers)
    elif variant == "lstm":
        recurrent = keras.layers.LSTM(units, return_sequences=True)
    else:
        cell = kspike.ALIF(units, n_adaptive=units // 2, n_refractory=5, seed=seed,
                           surrogate=surrogate)
        if variant == "keras_rnn":
            recurrent = keras.layers.RNN(cell, return_sequences=True)
        else:
            recurrent = kspike.SpikingRNN(cell, return_sequences=True,
                                          jit_compile=variant == "spiking_rnn_xla",
                                          native=False if variant == "spiking_rnn_tf" else "auto")
    model = keras.Sequential([keras.Input((steps, n_inputs)), recurrent,
                              kspike.LeakyReadout(10)])
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(seed)
    # Sparse binary input spikes (about 5 % per step), as in threshold-crossing sMNIST.
    x = tf.constant((rng.uniform(size=(batch, steps, n_inputs)) < 0.05).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))
    cue = min(56, steps)

    @tf.function(jit_compile=variant == "spiking_rnn_xla_step")
    def train_step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = loss_fn(y, tf.reduce_mean(out[:, -cue:], axis=1))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return lambda: train_step(x, y).numpy()


def _pseudo_derivative_fraction(units, steps, n_inputs, batch, seed=0, surrogate="triangular"):
    """(spike rate, fraction of nonzero psi_t, fraction of nonzero psi_t of the neurons
    allowed to spike) of the ``_build`` ALIF layer on its inputs, at initialisation: the
    share of the recurrent backward product the native backward op does."""
    import keras
    import numpy as np

    import kspike

    keras.utils.set_random_seed(seed)
    n_refractory = 5
    cell = kspike.ALIF(units, n_adaptive=units // 2, n_refractory=n_refractory, seed=seed,
                       output="all", surrogate=surrogate)
    layer = kspike.SpikingRNN(cell, return_sequences=True)
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(batch, steps, n_inputs)) < 0.05).astype("float32")
    out = layer(x).numpy()
    z, v, A = out[..., :units], out[..., units:2 * units], out[..., 2 * units:]
    psi = keras.ops.convert_to_numpy(cell.spike_function.pseudo_derivative((v - A) / A))
    # Refractory at t: a spike in the n_refractory steps before (psi is not applied there).
    padded = np.concatenate([np.zeros((batch, n_refractory, units)), z], axis=1)
    recent = sum(padded[:, n_refractory - k:n_refractory - k + steps]
                 for k in range(1, n_refractory + 1))
    return float(z.mean()), float(np.mean(psi != 0)), float(np.mean((psi != 0) & (recent == 0)))


def _build_predict(variant, units, steps, n_inputs, batch, seed=0):
    """``model.predict`` of one batch of the model of ``_build`` (one call)."""
    import keras
    import numpy as np

    import kspike

    keras.utils.set_random_seed(seed)
    cell = kspike.ALIF(units, n_adaptive=units // 2, n_refractory=5, seed=seed)
    model = keras.Sequential([
        keras.Input((steps, n_inputs)),
        kspike.SpikingRNN(cell, return_sequences=True,
                          native=False if variant == "spiking_rnn_tf" else "auto"),
        kspike.LeakyReadout(10)])
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(batch, steps, n_inputs)) < 0.05).astype("float32")
    return lambda: model.predict(x, batch_size=batch, verbose=0)


def _predict_table(args):
    rows = []
    for units in args.units or [256]:
        for steps in args.steps or [784]:
            functions = {variant: _build_predict(variant, units, steps, args.inputs,
                                                 args.predict_batch)
                         for variant in ("spiking_rnn_tf", "spiking_rnn")}
            print(f"predict, units={units} T={steps} B={args.predict_batch}: timing "
                  f"{list(functions)} ...", flush=True)
            cpu = {}
            times = _time_interleaved(functions, args.repeats, cpu_times=cpu)
            rows.append({"units": units, "steps": steps, "batch": args.predict_batch,
                         "predict_s": times, "predict_cpu_s": cpu,
                         "speedup_native": times["spiking_rnn_tf"] / times["spiking_rnn"],
                         "load_average": os.getloadavg()[0]})
            print(f"  model.predict: native {times['spiking_rnn']:.3f} s, TensorFlow loop "
                  f"{times['spiking_rnn_tf']:.3f} s: native {rows[-1]['speedup_native']:.2f}x "
                  f"faster (process CPU time {cpu['spiking_rnn']:.3f} s and "
                  f"{cpu['spiking_rnn_tf']:.3f} s: "
                  f"{cpu['spiking_rnn_tf'] / cpu['spiking_rnn']:.2f}x; load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    return rows


def _matmul_bound(units, steps, n_inputs, batch, seed=0):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    # An orthogonal recurrent matrix keeps the chained products at unit scale (no overflow,
    # no denormals) so the loop times the products only.
    q, _ = np.linalg.qr(rng.normal(size=(units, units)))
    w_rec = tf.constant(q.astype("float32"))
    w_rec_t = tf.constant(q.T.astype("float32"))
    w_in = tf.constant(rng.normal(size=(n_inputs, units)).astype("float32"))
    x = tf.constant(rng.uniform(size=(steps * batch, n_inputs)).astype("float32"))
    z0 = tf.constant(rng.normal(size=(batch, units)).astype("float32"))

    @tf.function
    def bound():
        projected = tf.matmul(x, w_in)

        def forward(t, z):
            return t + 1, tf.matmul(z, w_rec)

        def backward(t, g):
            return t + 1, tf.matmul(g, w_rec_t)

        _, z = tf.while_loop(lambda t, _: t < steps, forward, (0, z0))
        _, g = tf.while_loop(lambda t, _: t < steps, backward, (0, z))
        grad_x = tf.matmul(projected, w_in, transpose_b=True)
        grad_w_in = tf.matmul(x, projected, transpose_a=True)
        grad_w_rec = tf.matmul(projected, projected, transpose_a=True)
        return (tf.reduce_sum(g) + tf.reduce_sum(grad_x) + tf.reduce_sum(grad_w_in)
                + tf.reduce_sum(grad_w_rec))

    return lambda: bound().numpy()


def _time_interleaved(functions, repeats, warmup=2, cpu_times=None):
    """Median wall time of each function over interleaved rounds; ``cpu_times``, a dict,
    also receives the median process CPU time (all threads), which a shared machine's load
    disturbs less than the wall time."""
    import numpy as np

    for f in functions.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            f()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    if cpu_times is not None:
        cpu_times.update({name: float(np.median(t)) for name, t in cpu.items()})
    return {name: float(np.median(t)) for name, t in times.items()}


def _memory_child(variant, units, steps, n_inputs, batch):
    """Run in a fresh process: print the RSS before a training step and its peak during the
    step (MB) as JSON. The first two steps trace and warm up; the third is measured."""
    import threading

    step = _build(variant, units, steps, n_inputs, batch)
    step()
    step()
    _reset_peak_rss()
    baseline = _status_mb("VmRSS")
    # The kernel's high-water mark is updated lazily; a sampling thread (TensorFlow releases
    # the GIL while it computes) catches the peak as well, and the larger of the two counts.
    sampled = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            sampled.append(_status_mb("VmRSS"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    peak = max(max(sampled), _status_mb("VmHWM"))
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak}))


def _memory(variant, units, steps, n_inputs, batch):
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", variant,
               str(units), str(steps), str(n_inputs), str(batch)]
    # A fixed mmap threshold makes glibc return freed buffers to the system at once, so the
    # resident set follows the live tensors instead of the allocator's cache.
    # oneDNN's CPU allocator pools large buffers and never returns them, which would hide the
    # step's peak behind the warm-up's; the memory runs use TensorFlow's default allocator
    # (the tensors kept by a training step do not depend on the matmul library).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               TF_ENABLE_ONEDNN_OPTS="0")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _streaming_latency(units, n_inputs, steps=400, jit_compile=False):
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike

    model = keras.Sequential([
        keras.Input((None, n_inputs)),
        kspike.SpikingRNN(kspike.ALIF(units, n_adaptive=units // 2, n_refractory=5, seed=0),
                          return_sequences=True),
        kspike.LeakyReadout(10)])
    directory = os.path.join(tempfile.mkdtemp(prefix="kspike_bench_"), "model")
    kspike.export.saved_model(model, directory, jit_compile=jit_compile)
    loaded = tf.saved_model.load(directory)
    rng = np.random.default_rng(0)
    # One tensor per step, made before timing (slicing is not part of the model's step).
    xs = [tf.constant(x) for x in
          (rng.uniform(size=(steps, 1, n_inputs)) < 0.05).astype("float32")]

    def median_call(step, states):
        for t in range(20):
            _, states = step(xs[t], states)
        latencies = []
        for t in range(steps):
            start = time.perf_counter()
            _, states = step(xs[t], states)
            latencies.append(time.perf_counter() - start)
        return float(np.median(latencies))

    states = loaded.initial_state(tf.constant(1))
    latency = median_call(loaded.step, states)

    # The baseline: calling a reloaded concrete function of the same signature that does
    # (almost) nothing, i.e. TensorFlow's fixed cost of one call from Python.
    class Empty(tf.Module):
        def __init__(self, specs):
            super().__init__()
            self.step = tf.function(
                lambda x_t, s: (x_t[:, :10], [tf.identity(v) for v in s]),
                input_signature=[tf.TensorSpec((None, n_inputs)), list(specs)],
                autograph=False).get_concrete_function()

    empty_dir = os.path.join(os.path.dirname(directory), "empty")
    specs = [tf.TensorSpec((None, int(s.shape[-1])), s.dtype) for s in states]
    tf.saved_model.save(Empty(specs), empty_dir)
    empty = tf.saved_model.load(empty_dir)
    return latency, median_call(empty.step, states)


def _format_table(rows):
    header = ("units", "T", "variant", "step s", "x matmul bound", "speed-up vs RNN",
              "peak MB", "MB/step")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        lines.append(" | ".join([str(r["units"]), str(r["steps"]), r["variant"],
                                 fmt(r["step_s"], ".3f"), fmt(r["x_bound"], ".2f"),
                                 fmt(r["speedup_vs_keras_rnn"], ".2f"),
                                 fmt(r.get("peak_mb"), ".0f"), fmt(r.get("mb_per_step"), ".3f")]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="T in (100, 784), 256 units, no LSTM memory runs")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="sequence lengths T (default 100 400 784 1568)")
    parser.add_argument("--units", type=int, nargs="+", default=None,
                        help="numbers of neurons (default 256 1024)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=VARIANTS,
                        help="spiking_rnn: kspike.SpikingRNN; spiking_rnn_xla: SpikingRNN("
                             "jit_compile=True) (its loops compiled by XLA); "
                             "spiking_rnn_xla_step: the whole training step of SpikingRNN "
                             "compiled by XLA (tf.function(jit_compile=True)); keras_rnn: "
                             "keras.layers.RNN(same cell); lstm: keras.layers.LSTM(units)")
    parser.add_argument("--surrogate", default="triangular",
                        help="surrogate of the ALIF cells (a name of "
                             "kspike.surrogates.available(); default triangular, LSNN's "
                             "0.3 * max(0, 1 - |x|))")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (>= 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--no-streaming", action="store_true",
                        help="skip the exported step latency")
    parser.add_argument("--predict", action="store_true",
                        help="time model.predict (native forward vs TensorFlow loop) only")
    parser.add_argument("--predict-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0,
                        help="with --predict: TensorFlow's intra-op threads (0: its default, "
                             "one per core; 1: one thread, with one inter-op thread)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--memory-child", nargs=5, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--streaming-child", nargs=3, type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.streaming_child:
        inter_op, n_inputs, jit = args.streaming_child
        if inter_op:
            import tensorflow as tf
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        print(*_streaming_latency(256, n_inputs, jit_compile=bool(jit)))
        return 0

    if args.memory_child:
        variant, units, steps, n_inputs, batch = args.memory_child
        _memory_child(variant, int(units), int(steps), int(n_inputs), int(batch))
        return 0
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 (median of at least 5), received {args.repeats}")
    import kspike
    if args.surrogate not in kspike.surrogates.available():
        parser.error(f"--surrogate must be one of {kspike.surrogates.available()}, received "
                     f"{args.surrogate!r}")
    if args.predict:
        import tensorflow as tf
        if args.threads < 0:
            parser.error(f"--threads must be >= 0, received {args.threads}")
        if args.threads:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            if args.threads == 1:
                tf.config.threading.set_inter_op_parallelism_threads(1)
        threads = (tf.config.threading.get_intra_op_parallelism_threads()
                   or os.environ.get("TF_NUM_INTRAOP_THREADS") or "default")
        print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, intra-op threads "
              f"{threads}, load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = _predict_table(args)
        print(json.dumps({"predict": rows, "load_average": os.getloadavg()[0]}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"predict": rows}, f, indent=1)
        return 0
    steps_list = args.steps or ([100, 784] if args.quick else [100, 400, 784, 1568])
    units_list = args.units or ([256] if args.quick else [256, 1024])

    import tensorflow as tf
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, intra-op threads "
          f"{os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')}, load "
          f"average {os.getloadavg()[0]:.2f}; B={args.batch}, {args.inputs} inputs, ALIF (half "
          f"adaptive, n_refractory=5, {args.surrogate} surrogate) + LeakyReadout(10); note: "
          "figures taken on a shared, loaded machine are noisy, compare the ratios", flush=True)
    rows = []
    for units in units_list:
        for steps in steps_list:
            functions = {"matmul_bound": _matmul_bound(units, steps, args.inputs, args.batch)}
            if any(v in STACKED for v in args.variants):
                # The bound of two layers: the upper one has `units` inputs.
                lower, upper = functions["matmul_bound"], _matmul_bound(units, steps, units,
                                                                        args.batch)
                functions["matmul_bound_stacked"] = lambda: (lower(), upper())
            for variant in args.variants:
                functions[variant] = _build(variant, units, steps, args.inputs, args.batch,
                                            surrogate=args.surrogate)
            print(f"units={units} T={steps}: timing {list(functions)} ...", flush=True)
            # What the native backward op did in these steps (warm-up and timed).
            kspike.native.backward_stats(reset=True)
            times = _time_interleaved(functions, args.repeats)
            stats = kspike.native.backward_stats(reset=True)
            bound = times["matmul_bound"]
            bound_stacked = times.get("matmul_bound_stacked")
            reference = times.get("keras_rnn")
            for variant in (["matmul_bound"] + (["matmul_bound_stacked"] if bound_stacked else [])
                            + list(args.variants)):
                own_bound = bound_stacked if ("stacked" in variant) else bound
                stacked_reference = times.get("stacked_keras_rnn")
                row = {"units": units, "steps": steps, "variant": variant,
                       "step_s": times[variant], "x_bound": times[variant] / own_bound,
                       "speedup_vs_keras_rnn": ((stacked_reference if "stacked" in variant
                                                 else reference) / times[variant]
                                                if (stacked_reference if "stacked" in variant
                                                    else reference) else None)}
                if not variant.startswith("matmul_bound") and not args.no_memory and not (
                        args.quick and variant == "lstm"):
                    print(f"  memory of {variant} ...", flush=True)
                    long = _memory(variant, units, steps, args.inputs, args.batch)
                    short = _memory(variant, units, MEMORY_BASELINE_STEPS, args.inputs,
                                    args.batch)
                    row["peak_mb"] = long["peak_mb"] - long["baseline_mb"]
                    if steps > MEMORY_BASELINE_STEPS:
                        row["mb_per_step"] = (
                            (row["peak_mb"] - (short["peak_mb"] - short["baseline_mb"]))
                            / (steps - MEMORY_BASELINE_STEPS))
                rows.append(row)
                print("  " + _format_table([row]).splitlines()[-1], flush=True)
            del functions
            if stats and stats["entries"]:
                print(f"  native backward, measured in these steps: nonzero pseudo-derivatives "
                      f"{stats['psi_fraction']:.3f} of neurons x steps x batch "
                      f"(nonzero dL/dz psi / A terms {stats['term_fraction']:.3f}); recurrent "
                      f"product sparse in {stats['sparse_steps']} steps, dense in "
                      f"{stats['dense_steps']} (per batch shard)", flush=True)
                for row in rows[len(rows) - len(args.variants):]:
                    if row["variant"] in ("spiking_rnn", "stacked_spiking_rnn"):
                        row["backward_stats"] = stats
            if "spiking_rnn" in args.variants:
                rate, nonzero, allowed = _pseudo_derivative_fraction(
                    units, steps, args.inputs, args.batch, surrogate=args.surrogate)
                rows[len(rows) - len(args.variants) + list(args.variants).index("spiking_rnn")
                     ]["nonzero_psi"] = allowed
                print(f"  spike rate {rate:.3f} per step; nonzero pseudo-derivatives "
                      f"{nonzero:.3f} of neurons x steps, {allowed:.3f} outside refractory "
                      "periods (the share of the recurrent backward product the native "
                      "backward op does)", flush=True)
    result = {"batch": args.batch, "inputs": args.inputs, "rows": rows,
              "load_average": os.getloadavg()[0]}
    if not args.no_streaming:
        # Each in a fresh process: TensorFlow's thread pools are fixed once it has started.
        for key, inter_op, jit in (("streaming_step_ms", 0, 0),
                                   ("streaming_step_ms_inter_op_1", 1, 0),
                                   ("streaming_step_ms_xla", 0, 1),
                                   ("streaming_step_ms_xla_inter_op_1", 1, 1)):
            output = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--streaming-child", str(inter_op),
                 str(args.inputs), str(jit)], check=True, capture_output=True, text=True).stdout
            latency, overhead = output.strip().splitlines()[-1].split()
            result[key] = float(latency) * 1e3
            result[key.replace("step_ms", "empty_call_ms")] = float(overhead) * 1e3
    print()
    print(_format_table(rows))
    if "streaming_step_ms" in result:
        print(f"\nexported step(), batch 1, 256 ALIF + readout: "
              f"{result['streaming_step_ms']:.3f} ms per time step (median); with "
              "tf.config.threading.set_inter_op_parallelism_threads(1): "
              f"{result['streaming_step_ms_inter_op_1']:.3f} ms; step compiled by XLA "
              f"(saved_model(..., jit_compile=True)): {result['streaming_step_ms_xla']:.3f} ms, "
              f"both: {result['streaming_step_ms_xla_inter_op_1']:.3f} ms. "
              "Baseline, a reloaded function of the same signature that does nothing: "
              f"{result['streaming_empty_call_ms']:.3f} / "
              f"{result['streaming_empty_call_ms_inter_op_1']:.3f} ms")
    print()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
