"""Event handlers; importing this package registers them all in ``workers.registry``."""

from workers.handlers import redemptions

__all__ = ["redemptions"]
