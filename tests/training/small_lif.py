"""The small LIF classifier and its seeded arrays shared by the Trainer's array tests."""
import keras
import numpy as np

import kspike

T, N_IN = 8, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def model():
    inputs = keras.Input((T, N_IN))
    h = keras.layers.RNN(kspike.LIF(6, thr=0.05, seed=0), return_sequences=True,
                         name="hidden")(inputs)
    outputs = keras.layers.GlobalAveragePooling1D()(kspike.LeakyReadout(2, seed=1)(h))
    return keras.Model(inputs, outputs)


def arrays(n):
    """n seeded (x, y): spike inputs (n, T, N_IN) at 40% and labels in {0, 1}."""
    rng = np.random.default_rng(0)
    return ((rng.random((n, T, N_IN)) < 0.4).astype("float32"),
            rng.integers(0, 2, n).astype("int32"))
