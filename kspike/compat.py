"""The few Keras internals kspike relies on, each behind one small public function.

Keras 3 has no public API for these; keeping every ``keras.src`` import in this module means a
Keras upgrade that moves one of them breaks (and is fixed) in one place.
"""

__all__ = ["unscale_loss_for_distribution", "global_seed_generator_state",
           "LossFunctionWrapper"]

# Keras' wrapper of a loss function into a Loss object: kspike uses it to give a loss *name*
# (e.g. "mse") the same reduction that Keras' own training would, and to recognise it again.
from keras.src.losses.losses import LossFunctionWrapper


def unscale_loss_for_distribution(value):
    """``value`` multiplied back by the number of replicas in sync.

    Keras losses divide their mean by the number of replicas under a ``tf.distribute``
    strategy (so that summing over replicas gives the global mean); kspike's Trainer scales
    gradients itself and logs true loss values, so it undoes Keras' division. Keras exposes
    this only as ``keras.src.losses.loss.unscale_loss_for_distribution``.
    """
    from keras.src.losses.loss import unscale_loss_for_distribution as unscale
    return unscale(value)


def global_seed_generator_state():
    """The state variable of Keras' global ``SeedGenerator`` (the generator behind
    ``keras.random`` calls without a seed), or None if this Keras version has none.

    Checkpoints save it so that a resumed run draws the same random numbers (e.g. dropout
    masks) as an uninterrupted one; Keras offers no public handle to that generator.
    """
    try:
        from keras.src.random import seed_generator
        return seed_generator.global_seed_generator().state.value
    except (ImportError, AttributeError):
        return None
