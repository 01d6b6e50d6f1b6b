"""One provider call for admitted rows: rate limit, call, decide, record.

The step a single send and each request of a chunk share. A single message goes through the
provider's ``send`` (its one-message endpoint); a chunk's rows through ``send_batch`` (as few
requests as the provider allows). Everything after the answer is the same code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kmsg_worker import circuit
from kmsg_worker.delivery.admission import throttle
from kmsg_worker.delivery.outcome import decide_outcomes, refusal
from kmsg_worker.delivery.record import Applied, apply_decisions
from kmsg_worker.errors import ProviderError
from kmsg_worker.providers.base import SendOutcome, counting_requests
from kmsg_worker.runtime import Runtime
from kmsg_worker.status import MessageStatus
from kmsg_worker.storage.rows import SendRow

__all__ = ["Called", "call_provider"]


def _provider_side_error(outcomes: Sequence[SendOutcome]) -> ProviderError | None:
    """The call's health for the circuit: the first refusal the provider's side caused, if any.

    A batch answered per message can still carry the provider's own failure (one request of a
    concurrent window answered 5xx or timed out while the others were accepted): that counts
    against the provider, as a whole-call failure would. Refusals of a message (invalid number)
    do not.
    """
    for outcome in outcomes:
        error = outcome.error
        if error is not None and not outcome.accepted and (error.blame == "provider" or error.retryable):
            return error
    return None


@dataclass
class Called(Applied):
    """:class:`Applied`, plus the call's latency (``None`` when throttled: no call was made) and the
    number of vendor requests the adapter made for it."""

    latency_ms: float | None = None
    requests: int = 0


def call_provider(
    rt: Runtime,
    name: str,
    rows: Sequence[SendRow],
    *,
    expect: Sequence[MessageStatus],
    chunk: tuple[str, int] | None = None,
    hold_on_throttle: Sequence[SendRow] | None = None,
) -> Called:
    """Send ``rows`` (all routed to ``name`` and admitted) in one call and record the outcome.

    Args:
        rt: The runtime.
        name: The provider.
        rows: The rows of this call (one for a single send).
        expect: The states the rows are held in.
        chunk: The ``(batch_id, chunk)`` of a chunk's rows.
        hold_on_throttle: The rows to give back when the rate limit refuses this call (default:
            ``rows``; a chunk gives back the rest of its group too).
    """
    provider = rt.provider(name)
    single = chunk is None and len(rows) == 1
    throttled = throttle(rt, name, rows, hold=hold_on_throttle, now=rt.now(), expect=expect)
    if throttled is not None:
        called = Called()
        called.merge(throttled)
        return called
    started = time.perf_counter()
    observed: ProviderError | None
    with counting_requests() as tally:
        try:
            if single:
                outcomes = [provider.send(rows[0].message)]
                observed = None if outcomes[0].accepted else refusal(outcomes[0], name)
            else:
                outcomes = provider.send_batch([r.message for r in rows])
                observed = _provider_side_error(outcomes)
        except ProviderError as exc:
            outcomes = [SendOutcome(r.id, False, error=exc) for r in rows]
            observed = exc
    # When the provider answered, before our own bookkeeping below.
    answered = rt.now()
    latency_ms = (time.perf_counter() - started) * 1000
    circuit.observe(rt, name, observed)
    by_id = {o.message_id: o for o in outcomes}
    decisions = decide_outcomes(
        rows,
        by_id,
        settings=rt.settings,
        now=answered,
        can_lookup=provider.capabilities.lookup_by_reference,
    )
    applied = apply_decisions(
        rt,
        rows,
        by_id,
        decisions,
        now=answered,
        latency_ms=latency_ms,
        expect=expect,
        chunk=chunk,
        per_message_events=chunk is None,
    )
    called = Called()
    called.merge(applied)
    called.latency_ms = latency_ms
    called.requests = tally.count
    return called
