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

Usage:
    bin/bench_pytorch.py                    # 2 rounds of 5 timed steps each
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


def _child(library, units, steps, n_inputs, batch, repeats):
    if library in ("kspike", "keras_rnn"):
        step = _keras_step(library, units, steps, n_inputs, batch)
    else:
        step = _torch_step(library, units, steps, n_inputs, batch)
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--inputs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("units", "steps", "inputs", "batch", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    if args.child:
        _child(args.child, args.units, args.steps, args.inputs, args.batch, args.repeats)
        return 0

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; B={args.batch}, "
          f"T={args.steps}, {args.inputs} inputs, {args.units} neurons", flush=True)
    times = {library: [] for library in args.libraries}
    failed = {}
    for round_ in range(args.rounds):
        for library in args.libraries:
            if library in failed:
                continue
            print(f"round {round_ + 1}/{args.rounds}: {library} ...", flush=True)
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", library,
                 "--units", str(args.units), "--steps", str(args.steps), "--inputs",
                 str(args.inputs), "--batch", str(args.batch), "--repeats", str(args.repeats)],
                capture_output=True, text=True)
            if result.returncode != 0:
                failed[library] = result.stderr.strip().splitlines()[-1:] or ["failed"]
                print(f"  {library} failed: {failed[library][0]}", flush=True)
                continue
            times[library] += json.loads(result.stdout.strip().splitlines()[-1])

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
              "batch": args.batch, "step_s": medians, "failed": failed,
              "load_average": os.getloadavg()[0]}
    print()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
