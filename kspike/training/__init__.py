"""``kspike.Trainer`` and its parts: the training loop for long spiking-network runs.

The loop a researcher leaves running for days: one ``tf.function`` train step (traced once),
any ``kspike.learning`` rule, kspike regularisers, Keras metrics and callbacks, a progress bar
with the firing rate, TensorBoard scalars, atomic checkpoints that resume, a guard against
non-finite losses, and ``tf.distribute`` strategies. docs/training.md describes the parts:

- ``kspike.training.step``: train/evaluate step functions and the non-finite guard;
- ``kspike.training.checkpoints``: atomic checkpoint writing, listing, restore, resume;
- ``kspike.training.lock``: one trainer per checkpoint directory;
- ``kspike.training.data``: data position and resumable iteration;
- ``kspike.training.logging``: TensorBoard scalars and progress-bar logs;
- ``kspike.training.trainer``: the ``Trainer`` loop composing them.
"""
# `json` stays reachable as kspike.training.json, which tests patch to simulate a failing write.
import json  # noqa: F401

from kspike.training.checkpoints import latest_checkpoint
from kspike.training.lock import CheckpointDirectoryInUseError
from kspike.training.step import NonFiniteLossError
from kspike.training.trainer import Trainer

__all__ = ["Trainer", "NonFiniteLossError", "latest_checkpoint",
           "CheckpointDirectoryInUseError"]
