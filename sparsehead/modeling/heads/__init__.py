"""Detection heads built on the dynamic towers."""
from .fcos import FCOSDynamicHead, FCOSPlainHead
from .retinanet import RetinaNetDynamicHead

__all__ = ["FCOSDynamicHead", "FCOSPlainHead", "RetinaNetDynamicHead"]
