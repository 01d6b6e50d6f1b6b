"""The delivery engine: one path from "these messages are claimed" to "their transitions are recorded".

A single send (:func:`deliver`) and a bulk chunk (:func:`process_chunk`) run the same steps::

    claim -> recovery (unknown outcomes) -> admission (circuit, rate limit)
          -> provider call -> outcome (pure decisions) -> record (transitions, attempts, wake-ups)

- :mod:`.outcome`: provider answers -> decisions (error taxonomy, operator overrides, retry policy
  per type and priority). Pure.
- :mod:`.record`: decisions -> conditional transitions and attempt rows; holding rows to wait.
- :mod:`.admission`: circuit breakers and rate limits.
- :mod:`.call`: one provider call of admitted rows, through outcome and record.
- :mod:`.recovery`: "did the provider already get it?" for timeouts, expired leases and dead chunks.
- :mod:`.single` and :mod:`.chunk`: the two claims (a message's own lease, a chunk's lease).
"""

from __future__ import annotations

from kmsg_worker.delivery.chunk import ChunkResult, process_chunk
from kmsg_worker.delivery.recovery import LeaseReport, RecoveryReport, reconcile_expired, recover_chunks
from kmsg_worker.delivery.single import DeliveryResult, deliver

__all__ = [
    "ChunkResult",
    "DeliveryResult",
    "LeaseReport",
    "RecoveryReport",
    "deliver",
    "process_chunk",
    "reconcile_expired",
    "recover_chunks",
]
