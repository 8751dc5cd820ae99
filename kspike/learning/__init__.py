"""Learning rules: BPTT, e-prop, S-TLLR, STDP, rate-based backpropagation."""
from kspike.learning.base import LearningRule, RuleResult
from kspike.learning.bptt import BPTT
from kspike.learning.stdp import STDP
from kspike.learning.eprop import EProp
from kspike.learning.ratebp import RateBP
from kspike.learning.stllr import STLLR
