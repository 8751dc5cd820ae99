"""Data-parallel training of a recurrent ALIF network by N worker processes (docs/distributed.md).

On one machine (loopback, free ports picked at run time; the chief's progress is shown, the
other workers write to WORKDIR/worker_<i>.log):

    python bin/train_multiworker.py --workers 2 --quick
    python bin/train_multiworker.py --workers 2 --task smnist_shape --steps-per-sequence 196 \
        --steps 20 --global-batch 32          # steps/s of an sMNIST-sized network

Across real machines, run the same training function on every host with its own TF_CONFIG,
the SAME cluster list everywhere and a different task index, and a checkpoint directory that
all hosts reach under the same path (NFS, a mounted bucket); only the chief (worker 0) writes
into it, and rerunning the same command on all hosts resumes from its latest checkpoint:

    # host A (chief)                                  # host B
    export TF_CONFIG='{"cluster": {"worker":          export TF_CONFIG='{"cluster": {"worker":
      ["hostA:12345", "hostB:12345"]},                  ["hostA:12345", "hostB:12345"]},
      "task": {"type": "worker", "index": 0}}'          "task": {"type": "worker", "index": 1}}'
    python bin/train_multiworker.py --worker \        python bin/train_multiworker.py --worker \
        --checkpoint-dir /shared/run1                     --checkpoint-dir /shared/run1

``--global-batch`` is the batch of one optimizer step over all workers together; each worker
computes the gradients of its share of it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def train(args):
    """One worker (or a single process when TF_CONFIG is unset)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import kspike
    from kspike.distribute import multi_worker_strategy

    strategy = multi_worker_strategy(timeout=args.timeout) if os.environ.get("TF_CONFIG") \
        else None
    if args.task == "evidence":
        steps = (7 * 150 + 1050 + 150) if not args.quick else (7 * 30 + 200 + 50)
        kwargs = (dict(cue_ms=20.0, cue_spacing_ms=30.0, delay_ms=200.0, recall_ms=50.0)
                  if args.quick else {})
        data = kspike.tasks.evidence_accumulation(batch_size=args.global_batch, seed=0,
                                                  **kwargs)
        n_in, n_rec, n_out = 40, (50 if args.quick else 100), 2
        recall = 50 if args.quick else 150
    else:  # smnist_shape: 80 inputs, 256 ALIF, synthetic spikes
        steps, n_in, n_rec, n_out, recall = args.steps_per_sequence, 80, 256, 10, 56
        rng = np.random.default_rng(0)
        x = (rng.random((4 * args.global_batch, steps, n_in)) < 0.05).astype("float32")
        y = rng.integers(0, n_out, 4 * args.global_batch).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            args.global_batch, drop_remainder=True).repeat()
    scope = strategy.scope() if strategy is not None else tf.name_scope("single")
    with scope:
        inputs = keras.Input((steps, n_in))
        cell = kspike.ALIF(n_rec, n_adaptive=n_rec // 2, tau_adaptation=700.0, seed=0)
        hidden = kspike.SpikingRNN(cell, return_sequences=True)(inputs)
        outputs = kspike.LeakyReadout(n_out, seed=1)(hidden)
        logits = keras.layers.Lambda(lambda o: tf.reduce_mean(o[:, -recall:], axis=1))(outputs)
        model = keras.Model(inputs, logits)
        optimizer = keras.optimizers.Adam(1e-3)
    trainer = kspike.Trainer(model, optimizer,
                             keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             metrics=["accuracy"], strategy=strategy,
                             checkpoint_dir=args.checkpoint_dir,
                             checkpoint_every=args.checkpoint_every, seed=0,
                             verbose=1 if args.chief_output else 2)
    # The first two steps trace and compile; the rate is measured after them.
    trainer.fit(data, steps=min(2, args.steps))
    start, first = time.perf_counter(), trainer.step
    trainer.fit(data, steps=args.steps)
    done = trainer.step - first
    rate = done / (time.perf_counter() - start) if done else float("nan")
    print(json.dumps({"steps_per_second": rate, "steps": trainer.step,
                      "loss": trainer.last_step_logs.get("loss"),
                      "workers": strategy.num_replicas_in_sync if strategy else 1}))


def launch(args):
    from kspike.distribute import free_ports

    workdir = args.workdir or tempfile.mkdtemp(prefix="kspike-multiworker-")
    os.makedirs(workdir, exist_ok=True)
    checkpoint_dir = args.checkpoint_dir or os.path.join(workdir, "checkpoints")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(args.workers)]}
    command = [sys.executable, os.path.abspath(__file__), "--worker",
               "--checkpoint-dir", checkpoint_dir] + args.forward
    processes, logs = [], []
    for index in range(args.workers):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": index}})
        if index == 0:
            processes.append(subprocess.Popen(command + ["--chief-output"], env=env))
        else:
            log = open(os.path.join(workdir, f"worker_{index}.log"), "w")
            logs.append(log)
            processes.append(subprocess.Popen(command, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
    print(f"{args.workers} workers {cluster['worker']}; logs and checkpoints in {workdir}",
          flush=True)
    codes = [p.wait() for p in processes]
    for log in logs:
        log.close()
    if any(codes):
        sys.exit(f"worker exit codes {codes}; see {workdir}/worker_*.log")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--worker", action="store_true",
                        help="run one worker from this host's TF_CONFIG (real clusters)")
    parser.add_argument("--task", choices=["evidence", "smnist_shape"], default="evidence")
    parser.add_argument("--quick", action="store_true", help="short trials, few steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps in total")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps-per-sequence", type=int, default=784,
                        help="time steps of the smnist_shape task")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the other workers")
    parser.add_argument("--chief-output", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.steps is None:
        args.steps = 10 if args.quick else 2000
    if args.worker:
        train(args)
        return
    argv = sys.argv[1:]
    drop = {"--workers", "--workdir", "--checkpoint-dir"}
    args.forward = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in drop:
            skip = True
            continue
        if item.split("=")[0] in drop:
            continue
        args.forward.append(item)
    launch(args)


if __name__ == "__main__":
    main()
