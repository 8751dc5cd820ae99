#!/usr/bin/env python
"""kspike.SpikingRNN against the PyTorch spiking-network libraries on the same machine.

One BPTT training step (forward, backward, Adam) of a recurrent spiking layer of 256 neurons
with 80 inputs (5% active per step, as spike-encoded data), B=64, T=784, and a 10-class readout
of the last 56 steps, in each of:

- ``kspike``: ``kspike.SpikingRNN(kspike.ALIF(256, n_adaptive=128, n_refractory=5))`` +
  ``kspike.LeakyReadout(10)`` (the configuration of ``bin/bench_engine.py``);
- ``keras_rnn``: the same cell in ``keras.layers.RNN`` (the baseline of the ratios);
- ``norse``: ``norse.torch.LSNNRecurrent(80, 256)`` (adaptive LIF with a synaptic current,
  all neurons adaptive) + ``torch.nn.Linear(256, 10)``;
- ``snntorch``: ``torch.nn.Linear(80, 256)`` -> ``snntorch.RLeaky(linear_features=256)``
  stepped in Python, as in snnTorch's tutorials, + ``torch.nn.Linear(256, 10)``.

The neuron models differ in detail (norse integrates a synaptic current, snnTorch's RLeaky has
no adaptation), so this compares what a user of each library runs for this task, not the same
equations. Each library runs in its own process with its default thread settings (all cores);
the processes run one after another in ``--rounds`` rounds, and each figure is the median of
all timed steps of that library. Ratios are printed against ``keras_rnn`` and ``kspike``
measured in the same run.

Needs PyTorch, norse and snnTorch in the environment (not kspike requirements), e.g.
``pip install torch norse snntorch``; a library that does not import is reported and skipped.

PyTorch's OpenMP threads wait actively for each other: on a machine where another process
holds a core, its steps slow down many times over. Compare on an idle machine, or all
libraries on one core:
``OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 taskset -c 0 ...``.

``--workload lif-layer`` (the OpenNeuromorphic SNN-library benchmark): one Linear(n -> n) and
one LIF layer, B=16, T=500, dense random input (B, T, n), forward and backward of the sum of
the output spikes, at each n of ``--sizes`` (default 1024 and 4096), in kspike
(``keras.layers.Dense(n)`` on the whole (B, T, n) tensor -> ``kspike.LIFNeurons``), norse
(``LIFBoxCell``), snnTorch (``Leaky``), SpikingJelly (multi-step ``LIFNode``, torch backend)
and a plain JAX ``lax.scan``, and the matmul bound: the Linear's forward and kernel-gradient
products done alone by TensorFlow (and ``torch_bound``: the same products done alone by
torch, in the peers' Python). Figures are medians of ``--repeats`` steps after 2 warm-up
steps, each library in its own process; the footnote of the table lists how the neurons differ.
The kspike process also times the bound and ``keras_dense`` (the same Keras graph without the
LIF layer: Dense + the loss's sum and their gradients) one step each before each kspike step,
and prints kspike / bound, keras_dense / bound and the LIF layer's own share (kspike -
keras_dense) / bound from these steps: on a loaded machine the load moves between processes,
and the paired ratios are the ones measured under the same load.

The torch and JAX libraries run with ``--peer-python`` (default /work/peers-venv/bin/python
when it exists), a Python that has them; kspike needs none of them. ``--threads 1`` pins every
process to core 0 (``taskset -c 0``) with one thread in TensorFlow, torch, OpenMP and XLA;
the default is all cores. A library that fails is reported with the end of its traceback.

Usage:
    bin/bench_pytorch.py                    # 2 rounds of 5 timed steps each
    bin/bench_pytorch.py --workload lif-layer --threads 1 --repeats 3
    bin/bench_pytorch.py --steps 100 --rounds 1 --repeats 3    # a quick check
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LIBRARIES = ("kspike", "keras_rnn", "norse", "snntorch")
DEFAULT_PEER = "/work/peers-venv/bin/python"
CUE = 56


def _inputs(batch, steps, n_inputs, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(batch, steps, n_inputs)) < 0.05).astype("float32")
    y = rng.integers(0, 10, batch)
    return x, y


def _keras_step(library, units, steps, n_inputs, batch):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_engine
    variant = "spiking_rnn" if library == "kspike" else "keras_rnn"
    return bench_engine._build(variant, units, steps, n_inputs, batch)


def _torch_step(library, units, steps, n_inputs, batch):
    import torch
    torch.manual_seed(0)
    x_np, y_np = _inputs(batch, steps, n_inputs)
    x = torch.from_numpy(x_np).transpose(0, 1).contiguous()         # (T, B, n_in)
    y = torch.from_numpy(y_np).long()
    readout = torch.nn.Linear(units, 10)
    cue = min(CUE, steps)
    if library == "norse":
        from norse.torch import LSNNRecurrent
        layer = LSNNRecurrent(n_inputs, units)

        def forward():
            spikes, _ = layer(x)                                   # (T, B, units)
            return readout(spikes[-cue:].mean(0))
        parameters = list(layer.parameters()) + list(readout.parameters())
    else:
        import snntorch
        fc = torch.nn.Linear(n_inputs, units)
        layer = snntorch.RLeaky(beta=0.95, linear_features=units)

        def forward():
            spk, mem = layer.init_rleaky()
            outputs = []
            for t in range(steps):
                spk, mem = layer(fc(x[t]), spk, mem)
                outputs.append(spk)
            return readout(torch.stack(outputs[-cue:]).mean(0))
        parameters = (list(fc.parameters()) + list(layer.parameters())
                      + list(readout.parameters()))
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad()
        loss = loss_fn(forward(), y)
        loss.backward()
        optimizer.step()
        return float(loss)
    return step


# ---------------------------------------------------------------------------------------------
# The "lif-layer" workload: Linear(n -> n) + LIF, B=16, T=500, dense random input (B, T, n),
# forward and backward of the sum of the output spikes (the OpenNeuromorphic SNN-library
# benchmark). All neurons: V_t = 0.9 V_{t-1} + 0.1 x_t (tau = 10 steps, input scaled by 1/tau),
# threshold 1, hard reset to 0, unless the table's footnote says otherwise.

LIF_LIBRARIES = ("kspike", "norse", "snntorch", "spikingjelly", "jax", "torch_bound")
PEER_LIBRARIES = ("norse", "snntorch", "spikingjelly", "jax", "torch_bound")
TAU = 10.0


def _dense_input(batch, steps, n, seed=0):
    import numpy as np
    return np.random.default_rng(seed).normal(size=(batch, steps, n)).astype("float32") * 3.0


def _cell_loop(cell, currents, state):
    """Step a torch neuron cell, (input, state) -> (spikes, state), over (T, ...) currents."""
    import torch
    spikes = []
    for current in currents:
        spike, state = cell(current, state)
        spikes.append(spike)
    return torch.stack(spikes)


def _lif_step(library, n, steps, batch, threads):
    """A function that runs one forward + backward pass and returns the number of spikes."""
    if library in ("kspike", "bound", "keras_dense"):
        import keras
        import tensorflow as tf
        keras.utils.set_random_seed(0)
        x = tf.constant(_dense_input(batch, steps, n))
        if library == "bound":
            # The Linear's products alone: x W (forward) and x^T dY (the kernel's gradient;
            # the input needs none), on the (B*T, n) matrix.
            w = tf.Variable(tf.random.normal((n, n), stddev=n ** -0.5))
            flat = tf.reshape(x, (batch * steps, n))

            @tf.function
            def step():
                y = tf.matmul(flat, w)
                return tf.reduce_sum(tf.matmul(flat, y, transpose_a=True)[0, :1])
            return step
        import kspike
        # torch.nn.Linear's initialisation, as in the peers: U(-1/sqrt(n), 1/sqrt(n)).
        init = keras.initializers.RandomUniform(-n ** -0.5, n ** -0.5)
        # keras_dense: the same Keras graph without the LIF layer (the sum of the Dense's
        # outputs): what TensorFlow spends around the products before any neuron runs (the
        # bias add, the loss's sum and the broadcast of its gradient).
        neurons = [] if library == "keras_dense" else [
            kspike.LIFNeurons(tau=TAU, thr=1.0, v_reset=0.0)]
        model = keras.Sequential([keras.Input((steps, n)),
                                  keras.layers.Dense(n, kernel_initializer=init,
                                                     bias_initializer=init)] + neurons)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x))
            grads = tape.gradient(loss, model.trainable_variables)
            return loss + 0.0 * tf.reduce_sum(grads[0][0, :1])
        return step
    if library == "jax":
        import jax
        import jax.numpy as jnp
        x = jnp.asarray(_dense_input(batch, steps, n)).transpose(1, 0, 2)      # (T, B, n)
        key_w, key_b = jax.random.split(jax.random.PRNGKey(0))
        bound = n ** -0.5                                        # torch.nn.Linear's init
        params = {"w": jax.random.uniform(key_w, (n, n), minval=-bound, maxval=bound),
                  "b": jax.random.uniform(key_b, (n,), minval=-bound, maxval=bound)}

        @jax.custom_jvp
        def spike(h):
            return (h >= 0.0).astype(h.dtype)

        @spike.defjvp
        def _spike_jvp(primals, tangents):
            h, = primals
            s = jax.nn.sigmoid(4.0 * h)
            return spike(h), tangents[0] * 4.0 * s * (1.0 - s)

        def loss(params):
            currents = x @ params["w"] + params["b"]

            def cell(v, i):
                h = v + (i - v) / TAU
                s = spike(h - 1.0)
                return h * (1.0 - s), s
            _, spikes = jax.lax.scan(cell, jnp.zeros((batch, n)), currents)
            return jnp.sum(spikes)
        grad = jax.jit(jax.value_and_grad(loss))

        def step():
            value, g = grad(params)
            g["w"].block_until_ready()
            return float(value)
        return step
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if library == "torch_bound":
        # The bound's two products in torch: what the torch peers' matmuls cost alone.
        flat = torch.from_numpy(_dense_input(batch, steps, n)).reshape(batch * steps, n)
        w = torch.randn(n, n) * n ** -0.5

        def step():
            y = flat @ w
            return float((flat.t() @ y)[0, 0]) * 0.0
        return step
    x = torch.from_numpy(_dense_input(batch, steps, n)).transpose(0, 1).contiguous()  # (T, B, n)
    fc = torch.nn.Linear(n, n)
    if library == "norse":
        import norse.torch as nt
        # LIFBoxCell: no synaptic current; dt * tau_mem_inv = 0.1: v = 0.9 v + 0.1 x. norse 1.1
        # has no multi-step LIFBox module: the cell is stepped in Python.
        lif = nt.LIFBoxCell(nt.LIFBoxParameters(tau_mem_inv=torch.tensor(1.0 / (TAU * 1e-3)),
                                                v_leak=torch.tensor(0.0),
                                                v_th=torch.tensor(1.0),
                                                v_reset=torch.tensor(0.0)), dt=1e-3)

        def forward():
            return _cell_loop(lif, fc(x), None)                    # one batched product
    elif library == "snntorch":
        import snntorch
        # V = beta V + I (no 1/tau on the input), reset to 0 from the previous step's spike.
        lif = snntorch.Leaky(beta=1.0 - 1.0 / TAU, threshold=1.0, reset_mechanism="zero")

        def forward():
            return _cell_loop(lif, fc(x) / TAU, lif.init_leaky())  # one batched product
    elif library == "spikingjelly":
        from spikingjelly.activation_based import functional, layer, neuron, surrogate
        net = torch.nn.Sequential(
            layer.Linear(n, n, step_mode="m"),
            neuron.LIFNode(tau=TAU, decay_input=True, v_threshold=1.0, v_reset=0.0,
                           surrogate_function=surrogate.Sigmoid(alpha=4.0), step_mode="m"))
        fc = net[0]

        def forward():
            functional.reset_net(net)
            return net(x)
    else:
        raise ValueError(f"unknown library {library!r}")

    def step():
        fc.zero_grad(set_to_none=True)
        spikes = forward()
        loss = spikes.sum()
        loss.backward()
        return float(loss)
    return step


def _time(step, repeats):
    """(the first warm-up step's result, seconds of `repeats` steps after 2 warm-up steps)."""
    first = step()
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times


def _time_paired(step, references, repeats):
    """_time of `step`, with a step of each of `references` timed just before each of its
    steps: (step's first result, step's seconds, [each reference's seconds]), step by step
    under the same machine load."""
    first = step()
    step()
    for reference in references:
        reference()
        reference()
    times, reference_times = [], [[] for _ in references]
    for _ in range(repeats):
        for reference, seconds in zip(references, reference_times):
            start = time.perf_counter()
            reference()
            seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times, reference_times


def _lif_child(library, n, steps, batch, repeats, threads):
    if library in PEER_LIBRARIES:
        # SpikingJelly may import TensorFlow (and crash beside torch): never let it load.
        sys.modules["tensorflow"] = None
    result = {}
    if library == "kspike":
        # The bound and keras_dense again in this process, each of their steps next to one
        # of kspike's.
        spikes, times, (result["bound_times"], result["dense_times"]) = _time_paired(
            _lif_step(library, n, steps, batch, threads),
            [_lif_step("bound", n, steps, batch, threads),
             _lif_step("keras_dense", n, steps, batch, threads)], repeats)
    else:
        spikes, times = _time(_lif_step(library, n, steps, batch, threads), repeats)
    print(json.dumps({"times": times, "rate": float(spikes) / (batch * steps * n), **result}))


def _child(library, units, steps, n_inputs, batch, repeats):
    if library in ("kspike", "keras_rnn"):
        step = _keras_step(library, units, steps, n_inputs, batch)
    else:
        sys.modules["tensorflow"] = None      # a peer process never loads TensorFlow
        step = _torch_step(library, units, steps, n_inputs, batch)
    print(json.dumps(_time(step, repeats)[1]))


def _failure(result):
    """The real error of a failed child: the end of its last traceback, not TensorFlow's log."""
    text = result.stderr.strip()
    if "Traceback (most recent call last)" in text:
        text = text[text.rindex("Traceback (most recent call last)"):]
    lines = [line for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not (" I tensorflow/" in line or "oneDNN" in line
                                            or "absl::InitializeLog" in line
                                            or line[:5] in ("I0000", "W0000", "E0000"))]
    if result.returncode < 0:
        lines.append(f"killed by signal {-result.returncode}")
    return " | ".join(line.strip() for line in lines[-3:]) or f"exit code {result.returncode}"


def _environment(threads):
    """(command prefix, environment) of a child process on `threads` threads/cores."""
    t = str(threads)
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                         + ("false" if threads == 1 else "true")
                         + f" intra_op_parallelism_threads={t}").strip()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    prefix = []
    if threads < (os.cpu_count() or 1):
        prefix = ["taskset", "-c", "0" if threads == 1 else f"0-{threads - 1}"]
    return prefix, env


def _run_child(command, env):
    """(result, error) of one child whose last output line is JSON."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return None, _failure(result)
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, f"unexpected output: {lines[-1]!r}"


LIF_NOTE = """\
Neurons (all per element, V_0 = 0, threshold 1, hard reset to 0, surrogate on H - 1):
kspike LIFNeurons(tau=10), SpikingJelly LIFNode(tau=10, decay_input=True) and the JAX scan:
H = V + (I - V)/10, sigmoid surrogate (alpha 4); norse LIFBoxCell stepped in Python (no
synaptic current, dt/tau = 0.1): the same charge, SuperSpike surrogate (alpha 100); snnTorch
Leaky(beta=0.9, reset_mechanism="zero") on I/10: the same charge, but its reset comes from
the previous step's membrane (one step late) and its surrogate is atan. kspike: keras.layers.Dense(n) on the whole
(B, T, n) tensor -> kspike.LIFNeurons; the peers' Linear is also one product over all steps
(snnTorch and norse then step their neuron cells in Python). bound: the Linear's forward
and kernel-gradient products (B*T, n) x (n, n) done alone by TensorFlow in the same run;
torch_bound: the same two products done alone by torch (the peers' Python)."""


def _report(result, path):
    """Print the results as one JSON line and write them to `path` if given."""
    print()
    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _lif_main(args):
    prefix, env = _environment(args.threads)
    peer = args.peer_python
    if peer is None or not os.path.exists(peer):
        print(f"no peer Python ({peer!r}): set --peer-python to a Python with torch, norse, "
              "snntorch, spikingjelly, jax; measuring kspike and the bound only", flush=True)
        peer = None
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.threads} "
          f"thread(s) per process{' (taskset -c ' + prefix[2] + ')' if prefix else ''}; "
          f"B={args.batch}, T={args.steps}, median of {args.repeats} steps after 2 warm-up "
          f"steps; peers: {peer}", flush=True)
    rows = []
    for n in args.sizes:
        row = {"n": n, "batch": args.batch, "steps": args.steps, "threads": args.threads,
               "step_s": {}, "rate": {}, "failed": {}}
        for library in ("bound",) + tuple(args.libraries):
            python = peer if library in PEER_LIBRARIES else sys.executable
            if python is None:
                continue
            print(f"n = {n}: {library} ...", flush=True)
            result, error = _run_child(
                prefix + [python, os.path.abspath(__file__), "--workload", "lif-layer",
                          "--child", library, "--sizes", str(n), "--steps", str(args.steps),
                          "--batch", str(args.batch), "--repeats", str(args.repeats),
                          "--threads", str(args.threads)], env)
            if error:
                row["failed"][library] = error
                print(f"  {library} failed: {error}", flush=True)
                continue
            row["step_s"][library] = float(sorted(result["times"])[len(result["times"]) // 2])
            row["times"] = {**row.get("times", {}), library: result["times"]}
            row["rate"][library] = result["rate"]
            if "bound_times" in result:
                ratios = sorted(t / b for t, b in zip(result["times"], result["bound_times"]))
                row["times"]["bound_paired"] = result["bound_times"]
                row["kspike_vs_bound_paired"] = ratios[len(ratios) // 2]
                row["times"]["keras_dense_paired"] = result["dense_times"]
                ratios = sorted(d / b for d, b in zip(result["dense_times"],
                                                     result["bound_times"]))
                row["keras_dense_vs_bound_paired"] = ratios[len(ratios) // 2]
                # The LIF layer's own share: kspike's step less keras_dense's, over the bound.
                ratios = sorted((t - d) / b for t, d, b in zip(
                    result["times"], result["dense_times"], result["bound_times"]))
                row["neurons_vs_bound_paired"] = ratios[len(ratios) // 2]
        rows.append(row)

    print(f"\nLinear({'n'} -> n) + LIF, B={args.batch}, T={args.steps}, forward + backward of "
          f"the summed spikes, {args.threads} thread(s); load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| n | library | s per step | vs bound | kspike faster by | spike rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        t = row["step_s"]
        for library, seconds in t.items():
            bound = f"{seconds / t['bound']:.2f}x" if "bound" in t else "-"
            faster = (f"{seconds / t['kspike']:.2f}x" if "kspike" in t and library not in
                      ("kspike", "bound") else "-")
            rate = (row["rate"][library] if library not in ("bound", "torch_bound")
                    else float("nan"))
            print(f"| {row['n']} | {library} | {seconds:.3f} | {bound} | {faster} | {rate:.3f} |")
        for library, error in row["failed"].items():
            print(f"| {row['n']} | {library} | failed: {error[-150:]} | - | - | - |")
    for row in rows:
        if "kspike_vs_bound_paired" in row:
            print(f"n = {row['n']}: kspike / bound with the bound timed in kspike's process, "
                  f"each kspike step next to a bound step (median of the pairs' ratios): "
                  f"{row['kspike_vs_bound_paired']:.3f}x; keras_dense (the same graph "
                  f"without the LIF layer) / bound: {row['keras_dense_vs_bound_paired']:.3f}x; "
                  f"the LIF layer's own time (kspike - keras_dense) / bound: "
                  f"{row['neurons_vs_bound_paired']:.3f}x")
    print("\n" + LIF_NOTE)
    result = {"workload": "lif-layer", "rows": rows, "load_average": os.getloadavg()[0],
              "peer_python": peer}
    return _report(result, args.json)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("alif-rnn", "lif-layer"), default="alif-rnn",
                        help="alif-rnn: the recurrent ALIF training step; lif-layer: "
                             "Linear(n -> n) + LIF forward + backward")
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096],
                        help="lif-layer: the layer widths n")
    parser.add_argument("--steps", type=int, default=None,
                        help="time steps T (default 784; lif-layer 500)")
    parser.add_argument("--inputs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=None, help="batch B (default 64; "
                        "lif-layer 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process (1: each pinned to core 0 with taskset; "
                             "default all cores)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER if os.path.exists(DEFAULT_PEER)
                        else sys.executable,
                        help="the Python of the torch/JAX peers (default "
                             f"{DEFAULT_PEER} when it exists, else this one)")
    parser.add_argument("--libraries", nargs="+", default=None,
                        choices=sorted(set(LIBRARIES + LIF_LIBRARIES)))
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lif = args.workload == "lif-layer"
    if args.steps is None:
        args.steps = 500 if lif else 784
    if args.batch is None:
        args.batch = 16 if lif else 64
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.libraries is None:
        args.libraries = list(LIF_LIBRARIES if lif else LIBRARIES)
    allowed = LIF_LIBRARIES if lif else LIBRARIES
    wrong = [name for name in args.libraries if name not in allowed]
    if wrong:
        parser.error(f"--libraries for --workload {args.workload} must be among {allowed}, "
                     f"received {wrong}")
    for name in ("units", "steps", "inputs", "batch", "repeats", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    if any(n < 1 for n in args.sizes):
        parser.error(f"--sizes must be >= 1, received {args.sizes}")
    if args.child and lif:
        _lif_child(args.child, args.sizes[0], args.steps, args.batch, args.repeats,
                   args.threads)
        return 0
    if args.child:
        _child(args.child, args.units, args.steps, args.inputs, args.batch, args.repeats)
        return 0
    if lif:
        return _lif_main(args)

    prefix, env = _environment(args.threads)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; B={args.batch}, "
          f"T={args.steps}, {args.inputs} inputs, {args.units} neurons, {args.threads} "
          f"thread(s)", flush=True)
    times = {library: [] for library in args.libraries}
    failed = {}
    for round_ in range(args.rounds):
        for library in args.libraries:
            if library in failed:
                continue
            print(f"round {round_ + 1}/{args.rounds}: {library} ...", flush=True)
            python = args.peer_python if library in PEER_LIBRARIES else sys.executable
            result, error = _run_child(
                prefix + [python, os.path.abspath(__file__), "--child", library,
                          "--units", str(args.units), "--steps", str(args.steps), "--inputs",
                          str(args.inputs), "--batch", str(args.batch), "--repeats",
                          str(args.repeats)], env)
            if error:
                failed[library] = error
                print(f"  {library} failed: {error}", flush=True)
                continue
            times[library] += result

    import numpy as np
    medians = {library: float(np.median(t)) for library, t in times.items() if t}
    print("\nlibrary | step s | vs keras.layers.RNN | kspike faster by")
    print("--- | --- | --- | ---")
    for library, median in medians.items():
        versus_rnn = (f"{medians['keras_rnn'] / median:.2f}x" if "keras_rnn" in medians
                      else "-")
        versus_kspike = (f"{median / medians['kspike']:.2f}x" if "kspike" in medians else "-")
        print(f"{library} | {median:.3f} | {versus_rnn} | {versus_kspike}")
    result = {"units": args.units, "steps": args.steps, "inputs": args.inputs,
              "batch": args.batch, "threads": args.threads, "step_s": medians,
              "failed": failed, "load_average": os.getloadavg()[0]}
    return _report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
