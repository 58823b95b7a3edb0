"""Detection heads built on the dynamic towers, and the plain baselines that record the same costs."""
from .fcos import FCOSDynamicHead, FCOSPlainHead
from .retinanet import RetinaNetDynamicHead, RetinaNetPlainHead

__all__ = ["FCOSDynamicHead", "FCOSPlainHead", "RetinaNetDynamicHead", "RetinaNetPlainHead"]
