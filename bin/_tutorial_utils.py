"""Pieces shared by the kspike tutorial scripts: output folders, rules, activity probes."""
import datetime
import json
import os
import sys

import numpy as np

RULES = ("bptt", "eprop", "stllr")


def quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def add_common_arguments(parser, default_rule="bptt"):
    parser.add_argument("--rule", choices=RULES, default=default_rule,
                        help="learning rule: BPTT, e-prop or S-TLLR (default %(default)s)")
    parser.add_argument("--output-dir", default=None,
                        help="folder for figures and logs (default: a new folder under "
                             "./results/); an existing non-empty folder is never overwritten: "
                             "a new sub-folder is made in it")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run on synthetic data (no files needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--xla", action="store_true",
                        help="compile the spiking layer's loops with XLA "
                             "(kspike.SpikingRNN(jit_compile=True)): faster BPTT on CPU, "
                             "spikes equal to the default loop up to float rounding")


def output_directory(requested, name):
    """A fresh folder for this run's results; existing results are never overwritten."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if requested is None:
        base = os.path.join("results", name, stamp)
    elif os.path.isdir(requested) and os.listdir(requested):
        base = os.path.join(requested, f"run-{stamp}")
    elif os.path.exists(requested) and not os.path.isdir(requested):
        sys.exit(f"--output-dir {requested!r} is a file, not a folder.")
    else:
        base = requested
    path, k = base, 1
    while os.path.exists(path) and os.listdir(path):
        k += 1
        path = f"{base}-{k}"
    os.makedirs(path, exist_ok=True)
    print(f"Results go to {path}", flush=True)
    return path


def spiking_model(cell, n_inputs, n_outputs, name, seed, layer_name="lsnn", jit_compile=False,
                  **readout_kwargs):
    """The tutorials' network: Input (B, T, n_inputs) -> kspike.SpikingRNN(cell) named
    ``layer_name`` -> kspike.LeakyReadout(n_outputs) named "readout" (B, T, n_outputs)."""
    import keras
    import kspike
    inputs = keras.Input((None, n_inputs))
    spikes = kspike.SpikingRNN(cell, return_sequences=True, name=layer_name,
                               jit_compile=jit_compile)(inputs)
    outputs = kspike.LeakyReadout(n_outputs, seed=seed + 2, name="readout",
                                  **readout_kwargs)(spikes)
    return keras.Model(inputs, outputs, name=name)


def make_rule(name, **stllr_kwargs):
    """The kspike learning rule called ``name``; a clear exit if it is not available."""
    try:
        from kspike import learning
        cls = {"bptt": "BPTT", "eprop": "EProp", "stllr": "STLLR"}[name]
        rule_class = getattr(learning, cls)
    except (ImportError, AttributeError) as error:
        sys.exit(f"--rule {name}: kspike.learning.{cls} is not available in this kspike "
                 f"installation ({error}). Use --rule bptt.")
    if name == "stllr":
        return rule_class(**stllr_kwargs)
    return rule_class()


def save_json(path, data):
    with open(path, "x") as f:           # "x": never replace an existing file
        json.dump(data, f, indent=2, default=float)


class ActivityProbe:
    """Runs a trained ``Input -> SpikingRNN -> LeakyReadout`` model on a batch and returns the
    spikes, voltages and thresholds of the spiking layer and the readout, for figures.

    A thin wrapper of ``kspike.Probe`` (docs/probe.md): twins of the spiking layers with
    ``output="all"`` read the trained weights, so the model used for training stays in its
    fastest form.
    """

    def __init__(self, model):
        import kspike
        self.probe = kspike.Probe(model)

    def __call__(self, x):
        y, records = self.probe(x)
        first = records[0]
        return {"z": first.spikes, "v": first.voltage, "A": first.threshold, "y": y}


def softmax(y):
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
