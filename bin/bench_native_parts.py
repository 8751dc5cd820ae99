#!/usr/bin/env python
"""Where the native BPTT training step of ``bin/bench_engine.py`` spends its time.

The model of ``bin/bench_engine.py`` (B=64, 80 inputs 5% active per step, ALIF neurons half
adaptive, n_refractory=5, ``--surrogate``, LeakyReadout(10), T=784) is run once eagerly to
capture the inputs of its two native ops; then, in interleaved rounds, this script times the
whole training step (``tf.function``: forward, backward, Adam), the dense-matmul bound of
``bin/bench_engine.py``, the native forward op alone, the native backward op alone, and the
backward op with the dense recurrent product in every step (``sparse_fraction=0``). Each
figure is the median wall time and the median CPU time of the process (with one thread the
CPU time leaves out the time the process waited for a core on a loaded machine), with its
ratio to the bound of the same kind. The rest of the step (readout, Adam, dL/dx, layout) is
the step minus the two ops.

Usage (one thread, as the README's figures):
    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 bin/bench_native_parts.py --repeats 7
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Capture:
    """The native op module, recording the keyword arguments of each op's last call."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        op = getattr(self.module, name)

        def call(*args, **kwargs):
            self.calls[name] = kwargs
            return op(*args, **kwargs)
        return call


def _captured_op_inputs(units, steps, n_inputs, batch, surrogate, seed=0):
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike

    module = kspike.native.load()
    if module is None:
        raise SystemExit(f"the native loops do not load: {kspike.native.unavailable_reason()}")
    capture = _Capture(module)
    load = kspike.native.load
    kspike.native.load = lambda: capture
    try:
        keras.utils.set_random_seed(seed)
        cell = kspike.ALIF(units, n_adaptive=units // 2, n_refractory=5, seed=seed,
                           surrogate=surrogate)
        model = keras.Sequential([keras.Input((steps, n_inputs)),
                                  kspike.SpikingRNN(cell, return_sequences=True),
                                  kspike.LeakyReadout(10)])
        rng = np.random.default_rng(seed)
        x = tf.constant((rng.uniform(size=(batch, steps, n_inputs)) < 0.05).astype("float32"))
        y = tf.constant(rng.integers(0, 10, batch))
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = loss_fn(y, tf.reduce_mean(out[:, -min(56, steps):], axis=1))
        tape.gradient(loss, model.trainable_variables)
    finally:
        kspike.native.load = load
    return module, capture.calls["kspike_spiking_forward"], capture.calls["kspike_spiking_backward"]


def _weight_gradients_only(ops, arguments):
    """The backward op as a training step runs it: in a tf.function that reads its weight and
    initial-state gradients only, so no op reads dL/dI_t and the op does not write it."""
    import tensorflow as tf

    run = tf.function(lambda: ops.kspike_spiking_backward(**arguments)[1:])
    return lambda: run()[3].numpy()


def _timed(functions, repeats):
    import numpy as np

    for f in functions.values():
        f()
        f()
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            f()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({name: float(np.median(t)) for name, t in wall.items()},
            {name: float(np.median(t)) for name, t in cpu.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--inputs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--surrogate", default="triangular")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 3)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3, received {args.repeats}")

    import bench_engine

    import kspike

    if args.surrogate not in kspike.surrogates.available():
        parser.error(f"--surrogate must be one of {kspike.surrogates.available()}, received "
                     f"{args.surrogate!r}")
    shape = (args.units, args.steps, args.inputs, args.batch)
    ops, forward, backward = _captured_op_inputs(*shape, args.surrogate)
    dense = dict(backward, sparse_fraction=0.0)
    functions = {
        "matmul_bound": bench_engine._matmul_bound(*shape),
        "training_step": bench_engine._build("spiking_rnn", *shape, surrogate=args.surrogate),
        "forward_op": lambda: ops.kspike_spiking_forward(**forward)[0].numpy(),
        "backward_op": _weight_gradients_only(ops, backward),
        "backward_op_dense": _weight_gradients_only(ops, dense),
    }
    print(f"load average {os.getloadavg()[0]:.2f}, intra-op threads "
          f"{os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')}; units={args.units} "
          f"T={args.steps} B={args.batch}, {args.surrogate} surrogate; timing "
          f"{list(functions)} ...", flush=True)
    kspike.native.backward_stats(reset=True)
    ops.kspike_spiking_backward(**backward)[0].numpy()
    stats = kspike.native.backward_stats(reset=True)
    wall, cpu = _timed(functions, args.repeats)
    for times in (wall, cpu):
        times["rest_of_step"] = (times["training_step"] - times["forward_op"]
                                 - times["backward_op"])
    print(f"nonzero pseudo-derivatives {stats['psi_fraction']:.3f} of neurons x steps x batch; "
          f"recurrent backward product sparse in {stats['sparse_steps']} of "
          f"{stats['sparse_steps'] + stats['dense_steps']} steps (per batch shard)")
    print(f"{'part':<20} {'wall s':>8} {'x bound':>8} {'CPU s':>8} {'x bound':>8}")
    for name in ("matmul_bound", "training_step", "forward_op", "backward_op",
                 "backward_op_dense", "rest_of_step"):
        print(f"{name:<20} {wall[name]:8.3f} {wall[name] / wall['matmul_bound']:8.2f} "
              f"{cpu[name]:8.3f} {cpu[name] / cpu['matmul_bound']:8.2f}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
