"""sam_optax: Sharpness-Aware Minimization (Foret et al., ICLR 2021) for optax."""

from sam_optax import parallel
from sam_optax._directions import ascent_direction
from sam_optax._directions import project_to_ball
from sam_optax._directions import random_direction
from sam_optax._family import Diagnostics
from sam_optax._family import GroupedObjective
from sam_optax._sam import SAMState
from sam_optax._sam import sam
from sam_optax._variants import AESAMState
from sam_optax._variants import FSAMState
from sam_optax._variants import GSAMState
from sam_optax._variants import LookSAMState
from sam_optax._variants import MSAMState
from sam_optax._variants import RSTState
from sam_optax._variants import aesam
from sam_optax._variants import fsam
from sam_optax._variants import gsam
from sam_optax._variants import looksam
from sam_optax._variants import msam
from sam_optax._variants import rho_from_learning_rate
from sam_optax._variants import rst

__version__ = "0.1.0"

__all__ = [
    "AESAMState",
    "Diagnostics",
    "FSAMState",
    "GSAMState",
    "GroupedObjective",
    "LookSAMState",
    "MSAMState",
    "RSTState",
    "SAMState",
    "__version__",
    "aesam",
    "ascent_direction",
    "fsam",
    "gsam",
    "looksam",
    "msam",
    "parallel",
    "project_to_ball",
    "random_direction",
    "rho_from_learning_rate",
    "rst",
    "sam",
]
