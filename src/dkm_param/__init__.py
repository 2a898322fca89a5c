"""dkm-param: weight clustering (differentiable k-means) for PyTorch models."""

from .errors import DKMError, FormatError, RegistrationError, SpecError
from .export import CompressedLayer, CompressedModel, finalize, load_compressed, read_compressed
from .palettize import fisher, palettize
from .parametrization import DKMParametrization
from .policy import LayerPlan, Plan, Policy
from .register import register_dkm, remove_dkm
from .report import Summary
from .spec import LayerSpec

__version__ = "0.1.0.dev0"

__all__ = [
    "CompressedLayer",
    "CompressedModel",
    "DKMError",
    "DKMParametrization",
    "FormatError",
    "LayerPlan",
    "LayerSpec",
    "Plan",
    "Policy",
    "RegistrationError",
    "SpecError",
    "Summary",
    "finalize",
    "fisher",
    "load_compressed",
    "palettize",
    "read_compressed",
    "register_dkm",
    "remove_dkm",
]
