#!/usr/bin/env python
"""Per-step latency of a 1-sample stream: LiteRT runner vs SavedModel step vs an empty call.

The network: ``kspike.ALIF(256, n_adaptive=128, n_refractory=5)`` in a ``keras.layers.RNN`` on
80 input channels, then ``kspike.LeakyReadout(10)``; batch 1. In one run it times, as the
median over ``--steps`` calls after 20 untimed ones:

- ``litert``: ``kspike.export.load_litert(...).step`` (the argument checks included), float32
  and, with ``--quantize``, the float16 / int8 files;
- ``saved_model``: the reloaded ``step`` of ``kspike.export.saved_model`` (a concrete function);
- ``empty``: a reloaded concrete function of the same signature doing nothing but identities,
  i.e. TensorFlow's fixed cost of one call from Python.

Prints a table with the ratios and a JSON line (``--json PATH`` also writes it). Times depend
on the machine and its load; the ratios are measured in the same run and compare better.

Usage:
    bin/bench_streaming.py
    bin/bench_streaming.py --steps 2000 --quantize --json streaming.json
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=256, help="ALIF neurons (default 256)")
    parser.add_argument("--inputs", type=int, default=80, help="input channels (default 80)")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps (default 1000)")
    parser.add_argument("--quantize", action="store_true",
                        help="also time the float16 and int8 LiteRT files")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("units", "inputs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    return args


def _median_call(step, xs, states):
    import numpy as np
    for t in range(20):
        _, states = step(xs[t % len(xs)], states)
    latencies = []
    for x_t in xs:
        start = time.perf_counter()
        _, states = step(x_t, states)
        latencies.append(time.perf_counter() - start)
    return float(np.median(latencies)) * 1e3


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kspike

    model = keras.Sequential([
        keras.Input((None, args.inputs)),
        keras.layers.RNN(kspike.ALIF(args.units, n_adaptive=args.units // 2, n_refractory=5,
                                     seed=0), return_sequences=True),
        kspike.LeakyReadout(10, seed=1)])
    work = tempfile.mkdtemp(prefix="kspike_bench_streaming_")
    rng = np.random.default_rng(0)
    inputs = (rng.uniform(size=(args.steps, 1, args.inputs)) < 0.05).astype("float32")
    result = {"units": args.units, "inputs": args.inputs, "batch": 1, "steps": args.steps}

    variants = [None, "float16", "int8"] if args.quantize else [None]
    for quantize in variants:
        path = kspike.export.litert(model, os.path.join(work, f"{quantize}.tflite"),
                                    quantize=quantize)
        runner = kspike.export.load_litert(path)
        key = "litert_ms" if quantize is None else f"litert_{quantize}_ms"
        result[key] = _median_call(runner.step, list(inputs), runner.initial_state())

    directory = kspike.export.saved_model(model, os.path.join(work, "saved"))
    loaded = tf.saved_model.load(directory)
    xs = [tf.constant(x) for x in inputs]
    states = loaded.initial_state(tf.constant(1))
    result["saved_model_ms"] = _median_call(loaded.step, xs, states)

    class Empty(tf.Module):
        def __init__(self, specs):
            super().__init__()
            self.step = tf.function(
                lambda x_t, s: (x_t[:, :10], [tf.identity(v) for v in s]),
                input_signature=[tf.TensorSpec((None, args.inputs)), list(specs)],
                autograph=False).get_concrete_function()

    specs = [tf.TensorSpec((None, int(s.shape[-1])), s.dtype) for s in states]
    empty_dir = os.path.join(work, "empty")
    tf.saved_model.save(Empty(specs), empty_dir)
    result["empty_tf_function_ms"] = _median_call(tf.saved_model.load(empty_dir).step, xs,
                                                  states)
    result["saved_model_over_litert"] = result["saved_model_ms"] / result["litert_ms"]
    result["empty_over_litert"] = result["empty_tf_function_ms"] / result["litert_ms"]

    print(f"per-step latency, {args.units} ALIF + LeakyReadout(10), batch 1, "
          f"median of {args.steps} steps:")
    for key, value in result.items():
        if key.endswith("_ms"):
            print(f"  {key[:-3]:<22} {value:8.4f} ms")
    print(f"  SavedModel step / LiteRT: {result['saved_model_over_litert']:.1f}x; "
          f"empty tf.function / LiteRT: {result['empty_over_litert']:.1f}x")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
