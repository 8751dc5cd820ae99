"""``kspike.Trainer`` and its parts: the training loop for long spiking-network runs.

The loop a researcher leaves running for days: one ``tf.function`` train step (traced once),
any ``kspike.learning`` rule, kspike regularisers, Keras metrics and callbacks, a progress bar
with the firing rate, TensorBoard scalars, atomic checkpoints that resume, a guard against
non-finite losses, and ``tf.distribute`` strategies. docs/training.md describes the parts:

- ``kspike.training.arguments``: argument checks, metric resolution, the plan of a fit call;
- ``kspike.training.step``: train/evaluate/predict step functions, the non-finite guard and
  ``check_numerics``;
- ``kspike.training.checkpoints``: atomic checkpoint writing, listing, restore, resume;
- ``kspike.training.lock``: one trainer per checkpoint directory;
- ``kspike.training.data``: arrays as batches, data position and resumable iteration;
- ``kspike.training.logging``: TensorBoard scalars, progress-bar logs, epoch means, callbacks;
- ``kspike.training.trainer``: the ``Trainer`` loop composing them.
"""
# `json` stays reachable as kspike.training.json, which tests patch to simulate a failing write.
import json  # noqa: F401

from kspike.training.checkpoints import latest_checkpoint
from kspike.training.lock import CheckpointDirectoryInUseError
from kspike.training.step import NonFiniteInputError, NonFiniteLossError
from kspike.training.trainer import Trainer

__all__ = ["Trainer", "NonFiniteLossError", "NonFiniteInputError", "latest_checkpoint",
           "CheckpointDirectoryInUseError"]
