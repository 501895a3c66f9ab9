"""Event handlers; importing this package registers them all in ``workers.registry``."""

from workers.handlers import cards, redemptions

__all__ = ["cards", "redemptions"]
