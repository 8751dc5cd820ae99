"""Spiking Heidelberg Digits (Cramer et al. 2020) read from the published HDF5 files.

The files ``shd_train.h5`` and ``shd_test.h5`` hold, per sample, the spike times in seconds
(``/spikes/times``, variable-length float) and the ids 0..699 of the cochlea channels that spiked
(``/spikes/units``, variable-length uint16), with ``/labels`` (20 classes) and ``/extra/speaker``,
``/extra/keys``. They are published at https://zenkelab.org/datasets/ (compressed as
``shd_train.h5.gz``; decompress with ``gunzip``).

Spikes are binned into ``n_steps`` bins of ``dt`` ms: a spike at time t seconds goes to bin
floor(1000 t / dt); spikes at or after ``n_steps * dt`` ms are dropped (counted and reported).
A bin holds the number of spikes of a channel in it (use ``binary=True`` for 0/1). Binning is
cached (in memory, and on disk when ``cache_dir`` is given) as sparse spike coordinates, and the
dense (B, n_steps, 700) inputs are built per batch.
"""
import hashlib
import logging
import os
import zipfile
import zlib

import numpy as np
import tensorflow as tf

from kspike.tasks._common import check_choice, check_positive_float, check_positive_int, check_seed

__all__ = ["shd", "bin_spikes", "N_CHANNELS", "N_CLASSES"]

N_CHANNELS = 700
N_CLASSES = 20
_SPLITS = ("train", "test")
_REQUIRED = ("spikes/times", "spikes/units", "labels")
_SOURCE = ("The SHD files are published at https://zenkelab.org/datasets/ (shd_train.h5.gz, "
           "shd_test.h5.gz; decompress with gunzip)")
_logger = logging.getLogger("kspike")
_memory_cache = {}
_CACHED = ("values", "lengths", "labels", "dropped", "total")


def bin_spikes(times, units, dt=4.0, n_steps=250, n_units=N_CHANNELS):
    """Bin one sample's spikes.

    Args:
        times: (n_spikes,) spike times in seconds.
        units: (n_spikes,) channel ids in 0..n_units-1.
        dt: bin width in ms.
        n_steps: number of bins.
        n_units: number of channels.

    Returns:
        (flat, dropped): int32 array of flat indices ``bin * n_units + unit`` (one per kept spike,
        a repeated index for several spikes of one channel in one bin) and the number of spikes
        dropped because they fall at or after n_steps * dt ms.
    """
    times = np.asarray(times, np.float64).reshape(-1)
    units = np.asarray(units).reshape(-1).astype(np.int64)
    if times.shape != units.shape:
        raise ValueError(f"`times` and `units` must have the same length, received "
                         f"{times.shape[0]} times and {units.shape[0]} units.")
    if units.size and (units.min() < 0 or units.max() >= n_units):
        raise ValueError(f"`units` must be channel ids in 0..{n_units - 1}, received values "
                         f"in [{units.min()}, {units.max()}].")
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"Spike `times` must be finite and >= 0 seconds, received "
                         f"{times[first]} (spike {first} of {times.size}).")
    # Compared in float before the cast: a huge time (1e20 s) would overflow int64.
    positions = np.floor(times * 1000.0 / dt)
    kept = positions < n_steps
    bins = positions[kept].astype(np.int64)
    flat = (bins * n_units + units[kept]).astype(np.int32)
    return flat, int(np.count_nonzero(~kept))


def _resolve(path, split):
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, f"shd_{split}.h5")
        if not os.path.exists(candidate):
            hint = ""
            if os.path.exists(candidate + ".gz"):
                hint = f" Found {candidate + '.gz'}: decompress it first (gunzip)."
            raise FileNotFoundError(
                f"No SHD file shd_{split}.h5 in {path!r}.{hint} {_SOURCE}; pass `path=` the "
                "folder holding shd_train.h5 and shd_test.h5, or one .h5 file.")
        return candidate
    if not os.path.exists(path):
        hint = ""
        if os.path.exists(path + ".gz"):
            hint = f" Found {path + '.gz'}: decompress it first (gunzip)."
        raise FileNotFoundError(f"SHD file not found: {path!r}.{hint} {_SOURCE}; pass `path=` "
                                "the folder holding shd_train.h5 and shd_test.h5, or one .h5 "
                                "file.")
    return path


def _read(filename, dt, n_steps):
    try:
        import h5py
    except ImportError:
        raise ImportError("kspike.tasks.shd needs h5py: pip install h5py") from None
    with open(filename, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if compressed:
        raise ValueError(f"{filename!r} is gzip-compressed (the SHD files are published as "
                         ".h5.gz): gunzip it and pass the decompressed .h5 file.")
    try:
        handle = h5py.File(filename, "r")
    except OSError as error:
        raise ValueError(f"Cannot open {filename!r} as an HDF5 file: {error}") from None
    with handle:
        for name in _REQUIRED:
            if name not in handle:
                raise ValueError(f"{filename!r} is not in the SHD layout: dataset '/{name}' is "
                                 f"missing (expected /spikes/times, /spikes/units, /labels).")
        times = handle["spikes/times"]
        units = handle["spikes/units"]
        labels = np.asarray(handle["labels"][()]).reshape(-1)
        if not (len(times) == len(units) == len(labels)):
            raise ValueError(f"{filename!r}: /spikes/times ({len(times)}), /spikes/units "
                             f"({len(units)}) and /labels ({len(labels)}) must have one entry "
                             "per sample.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{filename!r}: /labels must hold integer classes 0..{N_CLASSES - 1}, "
                             f"received dtype {labels.dtype}.")
        outside = (labels < 0) | (labels >= N_CLASSES)
        if outside.any():
            first = int(np.argmax(outside))
            raise ValueError(f"{filename!r}, sample {first}: label {labels[first]} is outside "
                             f"the {N_CLASSES} SHD classes 0..{N_CLASSES - 1} "
                             f"({int(outside.sum())} such samples).")
        flats, lengths, dropped, total = [], [], 0, 0
        for k in range(len(labels)):
            try:
                flat, n_dropped = bin_spikes(times[k], units[k], dt, n_steps)
            except ValueError as error:
                raise ValueError(f"{filename!r}, sample {k}: {error}") from None
            flats.append(flat)
            lengths.append(len(flat))
            dropped += n_dropped
            total += len(flat) + n_dropped
    values = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    return {"values": values.astype(np.int32), "lengths": np.asarray(lengths, np.int64),
            "labels": labels.astype(np.int32), "dropped": np.int64(dropped),
            "total": np.int64(total)}


def _load(filename, dt, n_steps, cache_dir):
    stat = os.stat(filename)
    key = (os.path.abspath(filename), stat.st_size, stat.st_mtime_ns, dt, n_steps)
    if key in _memory_cache:
        return _memory_cache[key]
    data = None
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(filename))[0]
        cache_file = os.path.join(os.fspath(cache_dir),
                                  f"{stem}_dt{dt:g}ms_{n_steps}bins_{digest}.npz")
        if os.path.exists(cache_file):
            try:
                with np.load(cache_file, allow_pickle=False) as cached:
                    data = {k: cached[k] for k in cached.files}
                missing = [k for k in _CACHED if k not in data]
                if missing:
                    raise ValueError(f"arrays {missing} are missing")
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
                # A cache is a copy: an interrupted or damaged one is rebuilt from the source.
                _logger.warning("kspike.tasks.shd: the cache file %s is damaged (%s: %s); "
                                "rebuilding it from %s.", cache_file, type(error).__name__,
                                error, filename)
                data = None
    if data is None:
        data = _read(filename, dt, n_steps)
        if cache_file is not None:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            temporary = cache_file + f".tmp{os.getpid()}.npz"
            np.savez(temporary, **data)
            os.replace(temporary, cache_file)   # the name encodes the source: same content
    _memory_cache[key] = data
    return data


def shd(path, split="train", dt=4.0, n_steps=250, batch_size=128, shuffle=None, seed=None,
        binary=False, drop_remainder=None, cache_dir=None):
    """Spiking Heidelberg Digits as a ``tf.data.Dataset`` of (x, y) batches.

    Args:
        path: folder holding ``shd_train.h5`` / ``shd_test.h5``, or the path of one .h5 file.
        split: "train" or "test" (which file of the folder to read).
        dt: bin width in ms.
        n_steps: number of bins; the window is n_steps * dt ms (default 250 x 4 ms = 1 s).
        batch_size: samples per batch B.
        shuffle: shuffle each epoch (default: True for "train").
        seed: seed of the shuffle.
        binary: 1 for a bin with at least one spike instead of the spike count.
        drop_remainder: drop a last incomplete batch (default: True for "train").
        cache_dir: folder where the binned spikes are cached as .npz (None: memory only).

    Returns:
        A finite ``tf.data.Dataset`` (one epoch) of (x float32 (B, n_steps, 700),
        y int32 (B,)). Its attributes ``dropped_spikes`` and ``total_spikes`` give the number
        of spikes outside the window and in the file (the drop is also logged).
    """
    check_choice("split", split, _SPLITS)
    dt = check_positive_float("dt", dt)
    n_steps = check_positive_int("n_steps", n_steps)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    if path is None:
        raise ValueError(f"`path` is required. {_SOURCE}; pass the folder holding "
                         "shd_train.h5 and shd_test.h5, or one .h5 file.")
    filename = _resolve(path, split)
    data = _load(filename, dt, n_steps, cache_dir)
    dropped, total = int(data["dropped"]), int(data["total"])
    if dropped:
        _logger.warning("kspike.tasks.shd: %d of %d spikes (%.2f%%) in %s fall after the "
                        "%g ms window (n_steps=%d x dt=%g ms) and were dropped.", dropped,
                        total, 100.0 * dropped / max(total, 1), filename, n_steps * dt,
                        n_steps, dt)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    drop_remainder = (split == "train") if drop_remainder is None else bool(drop_remainder)
    n_samples = len(data["labels"])
    if n_samples == 0:
        raise ValueError(f"{filename!r} holds no samples.")
    if drop_remainder and n_samples < batch_size:
        raise ValueError(f"`batch_size` {batch_size} is larger than the {n_samples} samples of "
                         f"{filename!r}: with drop_remainder=True not one batch would be made; "
                         "pass a smaller batch_size or drop_remainder=False.")
    spikes = tf.RaggedTensor.from_row_lengths(data["values"], data["lengths"])
    dataset = tf.data.Dataset.from_tensor_slices((spikes, data["labels"]))
    if shuffle:
        dataset = dataset.shuffle(len(data["labels"]), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    size = n_steps * N_CHANNELS

    def densify(ragged, labels):
        rows = tf.cast(ragged.value_rowids(), tf.int64)
        flat = rows * size + tf.cast(ragged.values, tf.int64)
        batch = tf.shape(labels, out_type=tf.int64)[0]
        counts = tf.math.bincount(flat, minlength=batch * size, maxlength=batch * size,
                                  dtype=tf.float32)
        x = tf.reshape(counts, (-1, n_steps, N_CHANNELS))
        if binary:
            x = tf.minimum(x, 1.0)
        return x, labels

    # kspike's own graph code needs no AutoGraph conversion (and tracing skips its cost).
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(densify),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.dropped_spikes = dropped
    dataset.total_spikes = total
    return dataset
