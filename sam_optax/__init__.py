"""sam_optax: Sharpness-Aware Minimization (Foret et al., ICLR 2021) for optax."""

from sam_optax import parallel
from sam_optax._directions import ascent_direction
from sam_optax._directions import project_to_ball
from sam_optax._directions import random_direction
from sam_optax._sam import GroupedObjective
from sam_optax._sam import SAMState
from sam_optax._sam import sam

__version__ = "0.1.0"

__all__ = [
    "GroupedObjective",
    "SAMState",
    "__version__",
    "ascent_direction",
    "parallel",
    "project_to_ball",
    "random_direction",
    "sam",
]
