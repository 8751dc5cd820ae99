"""kspike: recurrent spiking neural networks (LIF, ALIF/LSNN) for TensorFlow 2 / Keras 3."""
__version__ = "0.1.0"

from kspike import dynamics, surrogates
from kspike.cells import ALIF, LIF, split_outputs
from kspike.layers import LeakyReadout
from kspike import learning, regularizers
from kspike.regularizers import FiringRateRegularizer, VoltageRegularizer
from kspike.training import Trainer
from kspike import rewiring
from kspike.rewiring import DeepR
from kspike.engine import SpikingRNN
from kspike import tasks
from kspike import distribute
from kspike import plotting
from kspike import export
from kspike import init
