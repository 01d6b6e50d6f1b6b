"""Fake provider servers (real HTTP on loopback) for tests, benchmarks and fault staging.

:data:`FAULTS_HELP` lists every fault knob, rule and counter of the fakes; ``kmsg fake-providers
--help`` shows it.
"""

__all__ = ["FAULTS_HELP"]

#: Every fault knob, rule and counter of the fake providers, as plain text (80 columns) for
#: ``kmsg fake-providers --help`` and the README. tests/test_fake_faults.py checks that it names
#: every field of Faults, DeliveryRule and RuleTarget.
FAULTS_HELP = """\
Staging faults at the fake providers
====================================

Each fake (solapi, iwinv, aligo) answers its vendor's API and, under /_fake/, a
control API of its own (no authentication, loopback only). JSON in, JSON out.

Faults: POST /_fake/faults  {"latency_ms": 80, "error_rate": 0.3, ...}
  Replaces all faults at once ({} clears them; an unknown name is a 400).
  Drawn per vendor request, in this order:
  latency_ms          added to every request (real providers: ~20 ms)
  reset_rate          share closed without any response; nothing was accepted
  slow_rate, slow_ms  share answered only after slow_ms (beyond a client's
                      read timeout: the client cannot know the outcome)
  rate_limit_rate     share answered 429 with "Retry-After: <retry_after>"
  retry_after         seconds announced in Retry-After (default 1)
  error_rate          share answered <error_status> before anything is accepted
  error_status        status of those answers (default 503)
  lost_response_rate  share accepted and recorded, then the connection is
                      closed without a response (solapi, iwinv and aligo sends)

Rules: POST /_fake/rules   how accepted messages end (delivery status)
  {"default": RULE}                       every message without another rule
  {"recipients": {"01012345678": RULE}}   every type to that number
  {"rules": [{"to": ..., "suffix": ..., "type": ..., RULE fields}]}
      targeted rules; an unset target field matches anything; type is ours
      (ALIMTALK, FRIENDTALK, SMS, LMS, MMS) or the vendor's (ATA); the most
      recently added matching rule wins. Example, "not a Kakao user" for
      AlimTalk only, so the SMS fallback to the same number is delivered:
      {"rules": [{"to": "01012345678", "type": "ALIMTALK",
                  "final": "FAILED", "code": "3104"}]}
  A message's rule: targeted rule, else recipient rule, else default.
  RULE fields:
  final        "DELIVERED" (default) or "FAILED"
  code         the vendor's status code of the final state ("4000", "3104")
  message      the vendor's status text
  sent_after   seconds from acceptance until it is with the carrier
  final_after  seconds from acceptance until the final state

Counters: GET /_fake/stats
  accepted            messages accepted (lost responses included)
  requests            vendor requests (faulted ones included)
  per_endpoint        requests per "METHOD /path"
  rejected            messages refused at intake
  recipients, max_per_recipient   accepted messages per recipient number
  per_message         acceptances per message: our id where the wire carries
                      it (solapi customFields), else a digest of recipient,
                      type, text and request fields (iwinv, aligo: send
                      distinct texts when counting duplicates)
  messages            distinct messages accepted
  duplicate_messages  messages accepted more than once (must stay {})
  per_reference, duplicates   the same, by our id only (solapi)
  replacements        (solapi) SMS/LMS replacements of failed AlimTalks

Reset: POST /_fake/reset  forgets messages, counters, rules and faults.

Solapi also simulates its own AlimTalk -> SMS/LMS replacement: an AlimTalk
that ends FAILED, sent with kakaoOptions.disableSms not true, a text and a
sender, gets a replacement message (replacement: true, SMS, or LMS above 90
bytes) from the moment it fails; its own rule decides how the replacement
ends (e.g. {"rules": [{"type": "SMS", "final": "FAILED"}]}).

From Python (tests): server.set_faults(**faults), server.ledger.add_rule(
DeliveryRule(...), to=, suffix=, type=), server.ledger.set_rule(number, rule),
server.ledger.default_rule, server.ledger.stats(), server.reset().
"""
