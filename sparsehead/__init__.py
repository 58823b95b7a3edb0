"""sparsehead: the fine-grained dynamic detection head with its gated paths run as spconv sparse convolutions."""
from .utils.optional import has_spconv, import_spconv

has_spconv()  # imports spconv, when it is installed, before the modules below, without its deprecation warnings

from .layers.gates import GeReTanH, SpatialGate  # noqa: E402
from .modeling.cost import Cost, collect_cost  # noqa: E402
from .modeling.router import Router  # noqa: E402
from .modeling.tower import DynamicTower, set_execution  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "DynamicTower", "Router", "SpatialGate", "GeReTanH", "Cost", "collect_cost", "set_execution", "has_spconv",
    "import_spconv",
]
