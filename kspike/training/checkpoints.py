"""Checkpoints of ``kspike.Trainer``: atomic writing, listing, restore (docs/training.md).

A checkpoint is a directory ``ckpt-<step, 10 digits>`` holding ``state*`` (a
``tf.train.Checkpoint``) and the completion marker ``kspike_checkpoint.json`` (step, epoch,
position in the epoch, loss, time, model name), written last. Only directories with a marker
count as checkpoints.

Example:

>>> import tempfile
>>> directory = tempfile.mkdtemp()
>>> latest_checkpoint(directory) is None
True
"""
import json
import os
import re
import shutil
import tempfile
import time

import tensorflow as tf

from kspike.compat import global_seed_generator_state

__all__ = ["CHECKPOINT_NAME", "MARKER", "TMP_PREFIX", "list_checkpoints", "latest_checkpoint",
           "checkpoint_name", "CheckpointWriter", "checkpoint_object", "checkpoint_metadata",
           "read_metadata", "read_state"]

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{10})$")
MARKER = "kspike_checkpoint.json"
TMP_PREFIX = ".kspike-tmp-"


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


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def remove_stale_temporaries(self):
        """Removes the temporary directories of processes that no longer run."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            match = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", name)
            path = os.path.join(self.directory, name)
            if match and os.path.isdir(path) and not _pid_alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, checkpoint, step, metadata):
        """Writes ``checkpoint`` (a ``tf.train.Checkpoint``) and ``metadata`` (the marker's
        JSON) as ``ckpt-<step>``, prunes old ones; returns the checkpoint's path."""
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, checkpoint_name(step))
        if os.path.exists(final):
            # The same step was saved already (end of an epoch that is also a save step, or
            # a rerun of a finished run): the state is the same, keep the existing files.
            return final
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=self.directory)
        try:
            checkpoint.write(os.path.join(tmp, "state"))
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
        """Removes all but the ``keep`` newest checkpoints."""
        for _, old in list_checkpoints(self.directory)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_object(model, optimizer, rule):
    """The ``tf.train.Checkpoint`` of a training run: model, optimizer, TensorFlow's and Keras'
    global random generators, and the rule when it has state of its own."""
    objects = {"model": model, "optimizer": optimizer,
               "tf_rng": tf.random.get_global_generator()}
    if isinstance(rule, tf.Module):
        # Rules with state of their own (e.g. e-prop's adaptive feedback matrices).
        objects["rule"] = rule
    keras_rng = global_seed_generator_state()
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
        raise ValueError(f"Checkpoint {path!r} is unreadable: {marker} is not valid kspike "
                         f"checkpoint metadata ({error}).") from None


def read_state(checkpoint, path):
    """Reads ``path``'s state into ``checkpoint``, every object matched.

    Raises:
        ValueError: the state does not match the checkpoint's objects.
    """
    try:
        status = checkpoint.read(os.path.join(path, "state"))
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"Checkpoint {path!r} does not match this model and optimizer "
                         f"(was it written by another model?): {error}") from None
