"""Event handlers; importing this package registers them all in ``workers.registry``."""

from workers.handlers import cards, orders, redemptions

__all__ = ["cards", "orders", "redemptions"]
