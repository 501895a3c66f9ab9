"""The webhook receiver: verify the signature (``signature``), enqueue, answer (``views``)."""
