"""sparsehead: the fine-grained dynamic detection head with its gated paths run as spconv sparse convolutions."""
import warnings as _warnings

with _warnings.catch_warnings():
    # spconv 2.3.x emits deprecation warnings at import under recent torch; they are harmless.
    _warnings.simplefilter("ignore")
    import spconv.pytorch  # noqa: F401

from .layers.gates import GeReTanH, SpatialGate  # noqa: E402
from .modeling.cost import Cost, collect_cost  # noqa: E402
from .modeling.router import Router  # noqa: E402
from .modeling.tower import DynamicTower, set_execution  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DynamicTower", "Router", "SpatialGate", "GeReTanH", "Cost", "collect_cost", "set_execution"]
