"""sam_optax: Sharpness-Aware Minimization (Foret et al., ICLR 2021) for optax."""

from sam_optax import parallel
from sam_optax._averaged import GradientAverage
from sam_optax._averaged import fsam
from sam_optax._averaged import vasso
from sam_optax._directions import ascent_direction
from sam_optax._directions import project_to_ball
from sam_optax._directions import random_direction
from sam_optax._esam import esam
from sam_optax._family import Diagnostics
from sam_optax._family import GroupedObjective
from sam_optax._family import SAMOptionKeywords
from sam_optax._family import SAMOptions
from sam_optax._family import SAMState
from sam_optax._gsam import gsam
from sam_optax._gsam import rho_from_learning_rate
from sam_optax._looksam import LookSAMMemory
from sam_optax._looksam import looksam
from sam_optax._msam import msam
from sam_optax._sam import sam
from sam_optax._sampa import SAMPaMemory
from sam_optax._sampa import sampa
from sam_optax._switching import AESAMMemory
from sam_optax._switching import aesam
from sam_optax._switching import rst
from sam_optax._wsam import wsam

#: The version of the package.
__version__ = "0.2.0"

__all__ = [
    "AESAMMemory",
    "Diagnostics",
    "GradientAverage",
    "GroupedObjective",
    "LookSAMMemory",
    "SAMOptionKeywords",
    "SAMOptions",
    "SAMPaMemory",
    "SAMState",
    "__version__",
    "aesam",
    "ascent_direction",
    "esam",
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
    "sampa",
    "vasso",
    "wsam",
]
