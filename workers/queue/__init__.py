"""The Redis queue contract, owned here and only here.

Every process that touches the delivery queues goes through this package: the receiver
accepts a delivery (``DeliveryPublisher``), the worker forgets its accepted copy once it
is recorded (``forget``) or parks it when PostgreSQL is gone (``park``), the re-drive job
pushes stuck events again (``requeue``), moves parked ones back (``unpark``) and sweeps
the accepted set (``sweep``), the ops tools replay (``requeue``) and read the depths
(``depths``). The keys, the message format and the client settings live nowhere else.

The keys (Redis lists are pushed left and consumed right, by kombu's Redis transport):

- ``deliveries``: what the workers consume (``DELIVERY_QUEUE``); ``jobs``: the jobs' tasks.
- ``deliveries.parked``: deliveries the worker could not even record; never consumed.
- ``deliveries.accepted`` (hash: delivery id -> message) and ``deliveries.accepted.index``
  (sorted set: delivery id -> accepted-at): a copy of every delivery answered 202 and not
  yet recorded in PostgreSQL. Celery's Redis transport takes a message off the list
  (BRPOP) before it records it as unacknowledged: a worker killed, or a Redis restarted,
  between the two loses it. The accept script writes the copy in the same atomic step as
  the push, the worker forgets it once the delivery is in PostgreSQL, and the sweep pushes
  again what stayed too long and never reached the inbox, counting its pushes in
  ``deliveries.accepted.pushes`` (hash: delivery id -> pushes) and handing a copy pushed
  ``MAX_PUSHES`` times to its caller's give-up (a dead letter) instead of a fourth push.

Modules: ``keys`` (names), ``message`` (Celery's wire format), ``client`` (the one client
factory and its timeouts), ``publisher`` (the accept script), ``lists`` (requeue, park,
unpark, depths), ``accepted`` (forget, sweep). Nothing here touches PostgreSQL: the sweep
is told which deliveries are recorded by its caller.
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
