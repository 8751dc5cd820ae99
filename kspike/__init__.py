"""kspike: recurrent spiking neural networks (LIF, ALIF/LSNN) for TensorFlow 2 / Keras 3."""
__version__ = "0.1.0"

# TensorFlow is installed through an extra (it ships under several distribution names), so a
# missing one is an installation choice not yet made: say which extras make it.
try:
    import tensorflow as _tensorflow
except ImportError as error:
    raise ImportError(
        "kspike needs TensorFlow >= 2.16, which it installs through an extra: "
        'pip install "kspike[cpu]" (CPU only, tensorflow-cpu), '
        'pip install "kspike[gpu]" (NVIDIA GPUs, tensorflow[and-cuda]) or '
        'pip install "kspike[tf]" (plain tensorflow); '
        f"importing tensorflow failed with: {error}") from error
del _tensorflow

from kspike import dynamics, surrogates
from kspike.cells import ALIF, LIF, split_outputs
from kspike.layers import FoldTime, IFNeurons, LIFNeurons, LeakyReadout
from kspike import compat, graph
from kspike import learning, regularizers
from kspike.regularizers import FiringRateRegularizer, VoltageRegularizer
from kspike.training import Trainer
from kspike import rewiring
from kspike.rewiring import DeepR
from kspike.engine import SpikingRNN
from kspike import tasks
from kspike import distribute
from kspike import plotting
from kspike.probe import Probe, ProbeRecord
from kspike import export
from kspike import nir  # needs the nir package only when called (kspike[nir])
from kspike import init
