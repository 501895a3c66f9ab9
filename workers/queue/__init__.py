"""The Redis queue contract, owned here and only here.

Every process that touches the delivery queues goes through this package: the receiver
accepts a delivery (``DeliveryPublisher``), the worker forgets its accepted copy once it
is recorded (``forget``) or parks it when PostgreSQL is gone (``park``), the re-drive job
pushes stuck events again (``requeue``), moves parked ones back (``unpark``) and sweeps
the accepted set (``sweep``), the ops tools replay (``requeue``) and read the depths
(``depths``). The keys (``keys``: lists pushed left and consumed right by kombu's Redis
transport), the message format (``message``), the body rule (``body``) and the client
factory (``client``) live nowhere else; ``publisher`` holds the accept script, ``lists``
and ``accepted`` the rest. Nothing here touches PostgreSQL: the sweep is told which
deliveries are recorded by its caller. Why the accepted set: docs/architecture.md,
"Receiver", and docs/guarantees.md.
"""

from workers.queue.accepted import (
    MAX_PUSHES,
    MAX_STARTS,
    GiveUp,
    Held,
    Recorded,
    SweepResult,
    Unrecorded,
    count_starts,
    forget,
    sweep,
)
from workers.queue.client import BrokerUnavailable, connect, process_client
from workers.queue.keys import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    ACCEPTED_PUSHES,
    DELIVERY_QUEUE,
    JOBS_QUEUE,
    PARKED_QUEUE,
    PROCESS_DELIVERY_TASK,
    QUEUES,
    SEEN_PREFIX,
    SEEN_SECONDS,
    STARTS,
)
from workers.queue.lists import depths, park, requeue, unpark
from workers.queue.message import Message, celery_message, safe_kwargsrepr
from workers.queue.publisher import (
    ACCEPT_SCRIPT,
    DeliveryPublisher,
    ReplicasUnconfirmed,
    accept_command,
)

__all__ = [
    "ACCEPTED_HASH",
    "ACCEPTED_INDEX",
    "ACCEPTED_PUSHES",
    "ACCEPT_SCRIPT",
    "DELIVERY_QUEUE",
    "JOBS_QUEUE",
    "MAX_PUSHES",
    "MAX_STARTS",
    "PARKED_QUEUE",
    "PROCESS_DELIVERY_TASK",
    "QUEUES",
    "SEEN_PREFIX",
    "SEEN_SECONDS",
    "STARTS",
    "BrokerUnavailable",
    "DeliveryPublisher",
    "GiveUp",
    "Held",
    "Message",
    "Recorded",
    "ReplicasUnconfirmed",
    "SweepResult",
    "Unrecorded",
    "accept_command",
    "celery_message",
    "connect",
    "count_starts",
    "depths",
    "forget",
    "park",
    "process_client",
    "requeue",
    "safe_kwargsrepr",
    "sweep",
    "unpark",
]
