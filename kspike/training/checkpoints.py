"""Checkpoints of ``kspike.Trainer``: atomic writing, listing, restore (docs/training.md).

A checkpoint is a directory ``ckpt-<step, 10 digits>`` holding ``state*`` (a
``tf.train.Checkpoint``) and the completion marker ``kspike_checkpoint.json`` (step, epoch,
position in the epoch, loss, time, model name, and the size and SHA-256 of each state file),
written last. Only directories with a marker count as checkpoints; one whose files no longer
match its marker is damaged and is moved aside (never deleted) when found.

Example:

>>> import tempfile
>>> directory = tempfile.mkdtemp()
>>> latest_checkpoint(directory) is None
True
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from kspike.compat import keras_seed_state
from kspike.training.lock import CheckpointLock, pid_alive

__all__ = ["CHECKPOINT_NAME", "MARKER", "TMP_PREFIX", "list_checkpoints", "latest_checkpoint",
           "checkpoint_name", "CheckpointWriter", "DamagedCheckpointError", "file_digests",
           "damage", "move_aside", "restore_latest", "checkpoint_object", "checkpoint_metadata",
           "read_metadata", "read_state", "CheckpointManager", "resume_learning_rate",
           "is_chief"]

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{10})$")
MARKER = "kspike_checkpoint.json"
TMP_PREFIX = ".kspike-tmp-"
PRUNE_PREFIX = ".kspike-prune-"


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory):
    """[(step, path)] of the complete kspike checkpoints in ``directory``, oldest first."""
    found = []
    if directory is None or not os.path.isdir(directory):
        return found
    for name in os.listdir(directory):
        match = CHECKPOINT_NAME.match(name)
        path = os.path.join(directory, name)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory):
    """Path of the newest complete kspike checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def checkpoint_name(step):
    """``ckpt-<step>``, the directory name of the checkpoint of ``step``.

    >>> checkpoint_name(12)
    'ckpt-0000000012'
    """
    return f"ckpt-{step:010d}"


class CheckpointWriter:
    """Writes ``ckpt-<step>`` directories atomically: everything goes to a temporary directory
    in the same folder, is fsync-ed, then renamed in one step, so a crash mid-write leaves the
    previous checkpoint as the latest. Only directories this class created are ever removed.

    Args:
        directory: the checkpoint directory (created on the first save).
        keep: number of checkpoints kept (int >= 1).
    """

    def __init__(self, directory, keep):
        self.directory = os.fspath(directory)
        self.keep = keep

    def remove_leftovers(self):
        """Removes what a killed trainer left: temporary directories of processes that no
        longer run and checkpoints whose pruning was cut short. Call it holding the lock."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            match = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", name)
            if not os.path.isdir(path):
                continue
            if name.startswith(PRUNE_PREFIX) or (match and int(match.group(1)) != os.getpid()
                                                  and not pid_alive(int(match.group(1)))):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, checkpoint, step, metadata):
        """Writes ``checkpoint`` (a ``tf.train.Checkpoint``) and ``metadata`` (the marker's
        JSON, completed with the files' digests) as ``ckpt-<step>``, prunes old ones; returns
        the checkpoint's path."""
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, checkpoint_name(step))
        if os.path.exists(final):
            problem = damage(final, step)
            if problem is None:
                # The same step was saved already (end of an epoch that is also a save step,
                # or a rerun of a finished run): the state is the same, keep the files.
                return final
            aside = move_aside(final, "incomplete")
            warnings.warn(f"{final} is not a complete kspike checkpoint ({problem}); moved it "
                          f"to {aside} and writing step {step} there.", stacklevel=3)
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=self.directory)
        try:
            checkpoint.write(os.path.join(tmp, "state"))
            metadata = dict(metadata, files=file_digests(tmp))
            with open(os.path.join(tmp, MARKER), "w") as handle:
                json.dump(metadata, handle, indent=1)
            for name in os.listdir(tmp):
                _fsync_path(os.path.join(tmp, name))
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def prune(self):
        """Removes all but the ``keep`` newest checkpoints. Each is renamed out of the
        ``ckpt-*`` names first, so a kill in the middle leaves a ``.kspike-prune-*`` directory
        (removed at the next start), never a half-deleted ``ckpt-<step>``."""
        for step, old in list_checkpoints(self.directory)[:-self.keep]:
            doomed = os.path.join(self.directory, f"{PRUNE_PREFIX}{step:010d}-{os.getpid()}")
            try:
                os.rename(old, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)


class DamagedCheckpointError(ValueError):
    """A checkpoint's files do not match its marker (truncated, missing or altered)."""


def file_digests(path):
    """{file name: {"size": bytes, "sha256": hex digest}} of the state files in ``path``."""
    digests = {}
    for name in sorted(os.listdir(path)):
        if not name.startswith("state"):
            continue
        sha = hashlib.sha256()
        with open(os.path.join(path, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests[name] = {"size": os.path.getsize(os.path.join(path, name)),
                         "sha256": sha.hexdigest()}
    return digests


def damage(path, step=None):
    """What is wrong with checkpoint directory ``path`` (a string), or None if it is complete:
    its marker is valid (for ``step`` if given) and every state file has the recorded size and
    digest. Markers without digests (older checkpoints) are checked for their index only."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return f"no completion marker {MARKER}"
    try:
        with open(marker) as handle:
            metadata = json.load(handle)
        recorded = int(metadata["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable marker ({error})"
    if step is not None and recorded != step:
        return f"its marker is for step {recorded}"
    files = metadata.get("files")
    if not isinstance(files, dict):
        return None if os.path.isfile(os.path.join(path, "state.index")) else \
            "state.index is missing"
    actual = file_digests(path)
    for name, expected in files.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name]["size"] != expected.get("size"):
            return f"{name} has {actual[name]['size']} bytes, {expected.get('size')} written"
        if actual[name]["sha256"] != expected.get("sha256"):
            return f"{name} differs from what was written"
    return None


def move_aside(path, why):
    """Renames ``path`` to ``<path>.<why>-<UTC time>`` (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.{why}-{stamp}"
    counter = 1
    while os.path.exists(aside):
        counter += 1
        aside = f"{path}.{why}-{stamp}-{counter}"
    os.rename(path, aside)
    return aside


def restore_latest(directory, read):
    """``(path, read(path))`` of the newest checkpoint in ``directory`` that is not damaged,
    or ``(None, None)``. Each damaged one met on the way is moved aside with a warning.
    ``read`` may raise ``DamagedCheckpointError`` to report damage found while reading."""
    for _, path in reversed(list_checkpoints(directory)):
        problem = damage(path)
        if problem is None:
            try:
                return path, read(path)
            except DamagedCheckpointError as error:
                problem = str(error)
        aside = move_aside(path, "damaged")
        remaining = list_checkpoints(directory)
        then = (f"resuming from {remaining[-1][1]} instead" if remaining else
                "no older checkpoint: training starts from the model as given")
        warnings.warn(f"Checkpoint {path} is damaged ({problem}); moved it to {aside}; "
                      f"{then}.", stacklevel=5)
    return None, None


def checkpoint_object(model, optimizer, rule):
    """The ``tf.train.Checkpoint`` of a training run: model, optimizer, TensorFlow's and Keras'
    global random generators, and the rule when it has state of its own."""
    objects = {"model": model, "optimizer": optimizer,
               "tf_rng": tf.random.get_global_generator()}
    if isinstance(rule, tf.Module):
        # Rules with state of their own (e.g. e-prop's adaptive feedback matrices).
        objects["rule"] = rule
    keras_rng = keras_seed_state()
    if keras_rng is not None:
        objects["keras_rng"] = keras_rng
    return tf.train.Checkpoint(**objects)


def checkpoint_metadata(step, epoch, position, loss, model_name):
    """The marker's content for a checkpoint written now."""
    return {"step": step, "epoch": epoch, "position": position, "loss": loss,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model_name}


def read_metadata(path):
    """``(step, epoch, position)`` from the marker of checkpoint ``path``.

    Raises:
        ValueError: the marker is missing or not valid kspike checkpoint metadata.
    """
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as handle:
            metadata = json.load(handle)
        return int(metadata["step"]), int(metadata["epoch"]), int(metadata["position"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpointError(f"Checkpoint {path!r} is unreadable: {marker} is not valid kspike "
                         f"checkpoint metadata ({error}).") from None


def read_state(checkpoint, path):
    """Reads ``path``'s state into ``checkpoint``, every object matched.

    Raises:
        ValueError: the state does not match the checkpoint's objects.
    """
    try:
        status = checkpoint.read(os.path.join(path, "state"))
        status.assert_existing_objects_matched()
    except (IndexError, tf.errors.DataLossError) as error:
        # What TensorFlow raises on a truncated or corrupted file that no digest caught.
        raise DamagedCheckpointError(f"reading it failed: {error}") from None
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"Checkpoint {path!r} does not match this model and optimizer "
                         f"(was it written by another model?): {error}") from None


def is_chief(strategy):
    """False on the non-chief workers of a multi-worker ``strategy`` (they take part in saving,
    as tf.distribute requires, but write to a scratch directory); True otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and not has_chief and resolver.task_id == 0


class CheckpointManager:
    """The checkpoints of one training run: the directory's lock, saving (to a scratch
    directory on the non-chief workers of a multi-worker strategy, which take part in saving
    as tf.distribute requires) and resuming from the newest complete checkpoint.

    Args:
        directory: the checkpoint directory, or None (no checkpoints).
        keep: number of checkpoints kept.
        is_chief: callable, False on the workers that must not write to ``directory``.
    """

    def __init__(self, directory, keep, is_chief=lambda: True):
        self.directory = directory
        self.keep = keep
        self.is_chief = is_chief
        self._lock = None

    @contextlib.contextmanager
    def lock(self):
        """Holds the directory's lock (chief only) while the block runs."""
        if self.directory is None or not self.is_chief():
            yield
            return
        lock = CheckpointLock(self.directory)
        lock.acquire()
        self._lock = lock
        try:
            yield
        finally:
            lock.release()
            self._lock = None

    def heartbeat(self, force=False):
        """Tells other trainers that this one still runs (cheap; call it at every step)."""
        if self._lock is not None:
            self._lock.refresh(force=force)

    def save(self, checkpoint, step, metadata):
        """Writes ``checkpoint`` as ``ckpt-<step>``; returns its path."""
        self.heartbeat(force=True)
        if self.is_chief():
            return CheckpointWriter(self.directory, self.keep).save(checkpoint, step, metadata)
        scratch = tempfile.mkdtemp(prefix="kspike-worker-")
        try:
            return CheckpointWriter(scratch, 1).save(checkpoint, step, metadata)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remove_leftovers(self):
        """Cleans what a killed run left (see ``CheckpointWriter.remove_leftovers``)."""
        if self.directory is not None and self.is_chief():
            CheckpointWriter(self.directory, self.keep).remove_leftovers()

    def restore(self, checkpoint):
        """Reads the newest complete checkpoint into ``checkpoint``; returns its path and
        ``(step, epoch, position)``, or ``(None, None)``."""
        def read(path):
            position = read_metadata(path)
            read_state(checkpoint, path)
            return position
        return restore_latest(self.directory, read)

    def save_run(self, model, optimizer, rule, step, epoch, position, loss):
        """Writes the checkpoint of a training run at ``step`` (see ``checkpoint_object`` and
        ``checkpoint_metadata``); returns its path."""
        return self.save(checkpoint_object(model, optimizer, rule), step,
                         checkpoint_metadata(step, epoch, position, loss, model.name))

    def resume(self, model, optimizer, rule, override_learning_rate):
        """Cleans leftovers, then restores the newest complete checkpoint into the run's
        objects: ``(path, (step, epoch, position))`` or ``(None, None)``. The optimizer's
        learning rate follows ``resume_learning_rate``."""
        self.remove_leftovers()
        if not list_checkpoints(self.directory):
            return None, None
        given = _learning_rate(optimizer)
        path, position = self.restore(checkpoint_object(model, optimizer, rule))
        if path is not None:
            resume_learning_rate(optimizer, given, _learning_rate(optimizer), path,
                                 override_learning_rate)
        return path, position


def _learning_rate(optimizer):
    try:
        return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    except (AttributeError, TypeError, ValueError):
        return None


def resume_learning_rate(optimizer, given, restored, path, override):
    """After a restore: applies the learning rate ``given`` to the optimizer (``override``) or
    warns when it differs from the ``restored`` one of checkpoint ``path``. Schedules (no
    assignable learning rate) are left alone."""
    variable = getattr(optimizer, "learning_rate", None)
    if given is None or restored is None or not hasattr(variable, "assign") or \
            math.isclose(given, restored, rel_tol=1e-6):
        return
    if override:
        variable.assign(given)
        return
    warnings.warn(f"Resuming with the learning rate {restored:g} of the checkpoint {path}; "
                  f"the optimizer was given {given:g}. Pass override_learning_rate=True to use "
                  "the given one.", stacklevel=4)
