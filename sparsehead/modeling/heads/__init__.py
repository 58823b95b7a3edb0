"""Detection heads built on the dynamic towers."""
from .fcos import FCOSDynamicHead, FCOSPlainHead

__all__ = ["FCOSDynamicHead", "FCOSPlainHead"]
