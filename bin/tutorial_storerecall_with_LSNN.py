"""Store-recall with an LSNN (Bellec et al. 2018), LSNN's tutorial network in kspike.

Sequences of 12 characters of 200 ms from 100 Poisson input neurons (value 0, value 1, store,
recall; 50 Hz); at a recall the network reports the bit shown with the last store, seconds
earlier, despite distractors. Network: 10 LIF + 10 ALIF neurons (tau 20 ms, tau_a 1200 ms,
beta 1.7, thr 0.01, 3 ms refractory), leaky readout (20 ms), firing-rate regularisation to 10 Hz,
Adam 1e-2 decayed by 0.3 every 100 iterations, batches of 128. The network is validated on a fresh
batch after every ``--eval-every`` iterations; training stops when the mean recall error of the
last ``--stop-window`` (20) validations is below ``--stop-error`` (5%).

    python bin/tutorial_storerecall_with_LSNN.py
    python bin/tutorial_storerecall_with_LSNN.py --quick          # smoke test
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tutorial_utils as utils  # noqa: E402

utils.quiet_tensorflow()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iterations", type=int, default=400, help="most training iterations")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-characters", type=int, default=12)
    parser.add_argument("--character-ms", type=int, default=200)
    parser.add_argument("--n-regular", type=int, default=10, help="LIF neurons")
    parser.add_argument("--n-adaptive", type=int, default=10, help="ALIF neurons")
    parser.add_argument("--tau-adaptation", type=float, default=1200.0, help="ms")
    parser.add_argument("--beta", type=float, default=1.7)
    parser.add_argument("--thr", type=float, default=0.01)
    parser.add_argument("--n-refractory", type=int, default=3, help="steps (ms)")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--lr-decay", type=float, default=0.3)
    parser.add_argument("--lr-decay-every", type=int, default=100)
    parser.add_argument("--reg", type=float, default=1e-2, help="firing-rate regulariser strength")
    parser.add_argument("--reg-rate", type=float, default=10.0, help="target rate in Hz")
    parser.add_argument("--eval-every", type=int, default=1, help="iterations per validation")
    parser.add_argument("--stop-window", type=int, default=20)
    parser.add_argument("--stop-error", type=float, default=0.05)
    utils.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 3)
        args.batch_size = min(args.batch_size, 8)
        args.character_ms = min(args.character_ms, 20)
    return args


class StopOnRecallError:
    """Keras callback: stops when the mean validation recall error of the last ``window``
    validations is below ``threshold``; remembers the history of validation errors."""

    def __new__(cls, window, threshold, eval_every):
        import keras

        class _Stop(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.errors, self.iterations, self.first_below = [], [], None

            def on_epoch_end(self, epoch, logs=None):
                error = float(logs["val_recall_error"])
                self.errors.append(error)
                self.iterations.append((epoch + 1) * eval_every)
                if error < threshold and self.first_below is None:
                    self.first_below = (epoch + 1) * eval_every
                recent = self.errors[-window:]
                if len(recent) == window and sum(recent) / window < threshold:
                    print(f"Mean recall error of the last {window} validations "
                          f"{sum(recent) / window:.3f} < {threshold}: stopping at iteration "
                          f"{(epoch + 1) * eval_every}.", flush=True)
                    self.model.stop_training = True

        return _Stop()


def build_model(args):
    import kspike
    cell = kspike.ALIF(args.n_regular + args.n_adaptive, n_adaptive=args.n_adaptive, tau=20.0,
                       tau_adaptation=args.tau_adaptation, beta=args.beta, thr=args.thr,
                       n_refractory=args.n_refractory, dampening_factor=0.3, seed=args.seed)
    return utils.spiking_model(cell, 100, 2, "storerecall_lsnn", args.seed, tau=20.0,
                               jit_compile=args.xla)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import kspike
    from kspike import plotting, tasks

    out = utils.output_directory(args.output_dir, "storerecall")
    keras.utils.set_random_seed(args.seed)
    task = dict(batch_size=args.batch_size, n_characters=args.n_characters,
                character_ms=args.character_ms)
    train_ds = tasks.store_recall(seed=args.seed, **task)
    validation_ds = tasks.store_recall(seed=args.seed + 10_000, **task)
    model = build_model(args)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        args.learning_rate, decay_steps=args.lr_decay_every, decay_rate=args.lr_decay,
        staircase=True)
    rule = utils.make_rule(args.rule)
    steps_per_character = args.character_ms
    trainer = kspike.Trainer(
        model, keras.optimizers.Adam(schedule), tasks.RecallCrossEntropy(steps_per_character),
        rule=rule, regularizers=[kspike.FiringRateRegularizer(target=args.reg_rate,
                                                              strength=args.reg)],
        metrics=[tasks.RecallError(steps_per_character)], seed=args.seed, verbose=2)
    stop = StopOnRecallError(args.stop_window, args.stop_error, args.eval_every)
    print(f"LSNN: {args.n_regular} LIF + {args.n_adaptive} ALIF, rule {args.rule}, up to "
          f"{args.iterations} iterations of batch {args.batch_size}", flush=True)
    start = time.time()
    # Each "epoch" is eval_every iterations followed by one validation batch (a new one each
    # time: the validation dataset is endless).
    history = trainer.fit(train_ds, steps=args.iterations, steps_per_epoch=args.eval_every,
                          validation_data=validation_ds, validation_steps=1, callbacks=[stop])
    train_time = time.time() - start
    print(f"Trained {trainer.step} iterations in {train_time:.0f} s; last validation recall "
          f"error {stop.errors[-1]:.3f}; first validation below {args.stop_error}: "
          f"{stop.first_below}", flush=True)

    x, y, mask = next(iter(validation_ds))
    activity = utils.ActivityProbe(model)(x[:1])
    targets = np.where(mask[0].numpy() > 0, y[0].numpy(), -1)
    fig = plotting.activity_figure(
        x[0].numpy(), activity["z"][0], thresholds=activity["A"][0],
        outputs=utils.softmax(activity["y"][0]), n_regular=args.n_regular,
        output_labels=["bit 0", "bit 1"], targets=targets,
        title="store-recall: inputs (value 0, value 1, store, recall), spikes, thresholds, "
              "output vs target (thick)")
    written = plotting.save_figure(fig, os.path.join(out, "storerecall_activity"))
    fig = plotting.learning_curve({"validation recall error": stop.errors},
                                  steps=stop.iterations)
    written += plotting.save_figure(fig, os.path.join(out, "learning_curve"))
    utils.save_json(os.path.join(out, "results.json"), {
        "args": vars(args), "iterations": trainer.step, "train_seconds": train_time,
        "validation_iterations": stop.iterations, "validation_recall_error": stop.errors,
        "first_iteration_below": stop.first_below, "history": history.history})
    print("Figures: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
