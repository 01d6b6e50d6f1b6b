"""Webhooks: signed status events out of the outbox, and provider delivery reports in.

- :mod:`.signing`: Standard Webhooks signatures (https://www.standardwebhooks.com/).
- :mod:`.guard`: which destinations an outgoing request may reach (SSRF).
- :mod:`.dispatch`: the dispatcher that delivers the outbox's events in signed batches.
- :mod:`.endpoints`: endpoint management (the API's and the command line's one implementation).
- :mod:`.reports`: provider delivery reports, applied like a poll's answer.
"""
