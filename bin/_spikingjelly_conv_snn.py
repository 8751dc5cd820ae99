"""The convolutional SNN of bin/tutorial_conv_snn_mnist.py in SpikingJelly, one training step
timed (the peer of bin/bench_deep_snn.py; run with a Python that has torch and spikingjelly,
not kspike's).

    Conv(16, 3x3, no bias)-BN-LIF-MaxPool -> Conv(32, 3x3, no bias)-BN-LIF-MaxPool ->
    Flatten -> Linear(128)-LIF -> Linear(10), scores averaged over T

in multi-step mode (step_mode="m": the weight layers see all T steps folded into the batch, as
kspike.FoldTime does), LIFNode(tau=2, V_th=1, V_reset=0, decay_input, Sigmoid(alpha=4)),
backend "torch" (SpikingJelly 2.0 has no other on the CPU and no backend argument), on the
CPU; Adam 1e-3 and cross-entropy. Prints one JSON line:
{"step_s": fastest step in seconds, "median_s": ..., "peak_rss_mb": ...,
"baseline_rss_mb": ..., ...}.

    python bin/_spikingjelly_conv_snn.py --batch-size 64 --time-steps 4 --repeats 10
"""
import argparse
import inspect
import json
import os
import resource
import sys
import time

# SpikingJelly imports TensorBoard helpers that load TensorFlow when it is importable (and can
# crash next to torch): make that import fail fast instead.
sys.modules["tensorflow"] = None


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--neurons", choices=("lif", "relu"), default="lif")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    from importlib import metadata

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def spiking():
        if args.neurons == "relu":
            return torch.nn.ReLU()
        kwargs = dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True,
                      surrogate_function=surrogate.Sigmoid(alpha=4.0), detach_reset=False,
                      step_mode="m")
        if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
            kwargs["backend"] = "torch"        # SpikingJelly < 2.0; 2.0 runs torch on the CPU
        return neuron.LIFNode(**kwargs)

    net = torch.nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), spiking(),
        layer.MaxPool2d(2),
        layer.Conv2d(16, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32), spiking(),
        layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(32 * 7 * 7, 128), spiking(), layer.Linear(128, 10))
    functional.set_step_mode(net, "m")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.time_steps, args.batch_size, 1, 28, 28))
                         .astype(np.float32))                      # (T, B, C, H, W)
    y = torch.from_numpy(rng.integers(0, 10, args.batch_size)).long()
    baseline = rss_mb()

    def step():
        optimizer.zero_grad()
        loss = loss_fn(net(x).mean(0), y)
        loss.backward()
        optimizer.step()
        functional.reset_net(net)
        return loss.item()

    step()                                                        # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_s": float(np.min(times)), "median_s": float(np.median(times)),
                      "peak_rss_mb": peak,
                      "baseline_rss_mb": baseline, "torch": torch.__version__,
                      "spikingjelly": metadata.version("spikingjelly"),
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
