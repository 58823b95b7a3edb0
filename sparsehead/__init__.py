"""sparsehead: the fine-grained dynamic detection head with its gated paths run as spconv sparse convolutions."""
from .layers.gates import GeReTanH, SpatialGate
from .modeling.cost import Cost, collect_cost
from .modeling.router import Router
from .modeling.tower import DynamicTower, set_execution
from .utils.optional import has_spconv, import_spconv

__version__ = "0.1.0"
__all__ = [
    "DynamicTower", "Router", "SpatialGate", "GeReTanH", "Cost", "collect_cost", "set_execution", "has_spconv",
    "import_spconv",
]
