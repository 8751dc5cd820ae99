"""Spiking Heidelberg Digits with a recurrent ALIF network in kspike.

The SHD files (Cramer et al. 2020; https://zenkelab.org/datasets/, shd_train.h5.gz and
shd_test.h5.gz, decompressed with gunzip) hold spoken digits as spikes of 700 cochlea channels.
They are binned into ``--n-steps`` bins of ``--dt`` ms (default 250 x 4 ms = 1 s; later spikes are
dropped and counted) and classified (20 classes) by a recurrent layer of LIF + ALIF neurons whose
time step is the bin width, read out by a leaky readout averaged over the sequence.

    python bin/tutorial_shd.py --data-dir ~/data/shd --epochs 30
    python bin/tutorial_shd.py --quick        # smoke test on a small synthetic file in SHD layout
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
    parser.add_argument("--data-dir", default=None,
                        help="folder holding shd_train.h5 and shd_test.h5")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dt", type=float, default=4.0, help="bin width and time step, ms")
    parser.add_argument("--n-steps", type=int, default=250, help="bins per sample")
    parser.add_argument("--n-regular", type=int, default=128, help="LIF neurons")
    parser.add_argument("--n-adaptive", type=int, default=128, help="ALIF neurons")
    parser.add_argument("--tau", type=float, default=20.0, help="membrane time constant, ms")
    parser.add_argument("--tau-adaptation", type=float, default=200.0, help="ms")
    parser.add_argument("--beta", type=float, default=1.8)
    parser.add_argument("--thr", type=float, default=0.01)
    parser.add_argument("--tau-out", type=float, default=20.0, help="readout time constant, ms")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--reg", type=float, default=0.1, help="firing-rate regulariser strength")
    parser.add_argument("--reg-rate", type=float, default=10.0, help="target rate in Hz")
    parser.add_argument("--cache-dir", default=None, help="cache of the binned spikes")
    utils.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
        args.batch_size = min(args.batch_size, 8)
        args.n_steps, args.dt = 50, 20.0
        args.n_regular, args.n_adaptive = 8, 8
    elif args.data_dir is None:
        parser.error("--data-dir is required (the folder with shd_train.h5 and shd_test.h5 from "
                     "https://zenkelab.org/datasets/); use --quick for a smoke test without data")
    return args


def write_synthetic_shd(folder, rng, n_train=16, n_test=8):
    """Small files in the published SHD layout: class k fires channels around 35 k early on."""
    import h5py
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 20, n)
        with h5py.File(os.path.join(folder, f"shd_{split}.h5"), "x") as f:
            times = f.create_dataset("spikes/times", (n,), dtype=h5py.vlen_dtype(np.float32))
            units = f.create_dataset("spikes/units", (n,), dtype=h5py.vlen_dtype(np.uint16))
            for k, label in enumerate(labels):
                count = 200
                times[k] = np.sort(rng.uniform(0.0, 1.1, count)).astype(np.float32)
                units[k] = np.clip(35 * label + rng.integers(0, 35, count), 0, 699).astype(
                    np.uint16)
            f.create_dataset("labels", data=labels.astype(np.uint16))
            f.create_dataset("extra/speaker", data=np.zeros(n, np.uint16))
            f.create_dataset("extra/keys", data=np.array([str(i).encode() for i in range(20)]))
    return folder


def build_model(args):
    import kspike
    cell = kspike.ALIF(args.n_regular + args.n_adaptive, n_adaptive=args.n_adaptive,
                       tau=args.tau, tau_adaptation=args.tau_adaptation, beta=args.beta,
                       thr=args.thr, dt=args.dt, dampening_factor=0.3, seed=args.seed)
    return utils.spiking_model(cell, 700, 20, "shd_alif", args.seed, layer_name="alif",
                               tau=args.tau_out, dt=args.dt, jit_compile=args.xla)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import kspike
    from kspike import plotting, tasks

    out = utils.output_directory(args.output_dir, "shd")
    keras.utils.set_random_seed(args.seed)
    data_dir = args.data_dir
    if args.quick:
        data_dir = write_synthetic_shd(os.path.join(out, "synthetic_shd"),
                                       np.random.default_rng(args.seed))
    options = dict(dt=args.dt, n_steps=args.n_steps, batch_size=args.batch_size,
                   cache_dir=args.cache_dir)
    train_ds = tasks.shd(data_dir, "train", seed=args.seed, **options)
    test_ds = tasks.shd(data_dir, "test", **options)
    print(f"SHD: {train_ds.total_spikes} training spikes, {train_ds.dropped_spikes} after the "
          f"{args.n_steps * args.dt:g} ms window dropped", flush=True)
    model = build_model(args)
    rule = utils.make_rule(args.rule)
    trainer = kspike.Trainer(
        model, keras.optimizers.Adam(args.learning_rate),
        tasks.window_cross_entropy(args.n_steps), rule=rule,
        regularizers=[kspike.FiringRateRegularizer(target=args.reg_rate,
                                                   strength=args.reg)],
        metrics=[tasks.window_accuracy(args.n_steps)], seed=args.seed, verbose=2)
    print(f"{args.n_regular} LIF + {args.n_adaptive} ALIF, rule {args.rule}, {args.epochs} "
          f"epochs of batch {args.batch_size}", flush=True)
    start = time.time()
    history = trainer.fit(train_ds, epochs=args.epochs, validation_data=test_ds)
    train_time = time.time() - start
    test = trainer.evaluate(test_ds)
    print(f"Test accuracy {test['accuracy']:.4f} after {args.epochs} epochs "
          f"({train_time:.0f} s of training)", flush=True)

    x, y = next(iter(test_ds))
    activity = utils.ActivityProbe(model)(x[:1])
    fig = plotting.activity_figure(
        np.minimum(x[0].numpy(), 1.0), activity["z"][0], thresholds=activity["A"][0],
        outputs=utils.softmax(activity["y"][0]), n_regular=args.n_regular, dt=args.dt,
        title=f"SHD sample of class {int(y[0])}: input spikes, LIF and ALIF spikes, "
              "thresholds, output")
    written = plotting.save_figure(fig, os.path.join(out, "shd_activity"))
    keys = [k for k in ("accuracy", "val_accuracy") if k in history.history]
    fig = plotting.learning_curve(history, keys=keys, xlabel="epoch")
    written += plotting.save_figure(fig, os.path.join(out, "learning_curve"))
    utils.save_json(os.path.join(out, "results.json"), {
        "args": vars(args), "history": history.history, "test_accuracy": test["accuracy"],
        "train_seconds": train_time, "dropped_spikes": train_ds.dropped_spikes})
    print("Figures: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
