"""AlimTalk templates as the fake providers keep them: approval states, and Kakao's text rule.

Kakao delivers an AlimTalk only when its text is the approved template with its variables filled
in. The fakes refuse a send that breaks the rule the way each provider does, with the same test
the producer's preflight applies (:func:`kmsg_worker.templates.render_matches`); a provider that
receives only the final text (Aligo) is checked with :func:`text_fits`, which accepts any value
in place of each ``#{name}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kmsg_worker.message import VAR_PATTERN
from kmsg_worker.templates import render_matches

__all__ = ["FakeTemplate", "refusal", "template_map", "text_fits"]


@dataclass
class FakeTemplate:
    """One AlimTalk template at a fake provider.

    Attributes:
        code: The template code.
        body: The approved text with ``#{name}`` variables.
        status: ``approved``, ``inspecting`` or ``rejected`` (each fake answers in its own words).
        channel: The Kakao channel (Solapi ``pfId``, Aligo sender key); empty: the account's.
        name: Display name.
        buttons: Buttons in the message form (``name``, ``type``, ``url_mobile`` ...).
    """

    code: str
    body: str
    status: str = "approved"
    channel: str = ""
    name: str | None = None
    buttons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def variables(self) -> list[str]:
        """The body's variables, in order."""
        return list(dict.fromkeys(VAR_PATTERN.findall(self.body)))


def template_map(templates: Iterable[FakeTemplate] | None) -> dict[str, FakeTemplate] | None:
    """``templates`` by code (``None`` stays ``None``: the fake then accepts any template)."""
    return None if templates is None else {t.code: t for t in templates}


def text_fits(body: str, text: str) -> bool:
    """Whether ``text`` is ``body`` with some value in place of each ``#{name}``."""
    pattern = "".join(re.escape(part) if i % 2 == 0 else "(?:.*?)" for i, part in enumerate(VAR_PATTERN.split(body)))
    return re.fullmatch(pattern, text, flags=re.DOTALL) is not None


def refusal(
    templates: Mapping[str, FakeTemplate] | None,
    code: object,
    *,
    text: str | None = None,
    variables: Mapping[str, str] | None = None,
    params: Sequence[str] | None = None,
) -> str | None:
    """Why a send of template ``code`` is refused: ``unknown``, ``not_approved``, ``mismatch``; ``None``: accepted.

    Args:
        text: The text sent, when the provider receives one.
        variables: The variables by name (Solapi), when it receives them.
        params: The values in the template's order (IWINV's ``templateParam``).
    """
    if templates is None:
        return None
    template = templates.get(str(code))
    if template is None:
        return "unknown"
    if template.status != "approved":
        return "not_approved"
    if params is not None:
        if len(params) != len(template.variables):
            return "mismatch"
        variables = dict(zip(template.variables, params, strict=True))
    if variables is not None:
        # A variable missing leaves its token in the text: the rendered text is not the approved one.
        if any(name not in variables for name in template.variables):
            return "mismatch"
        if text is not None and not render_matches(template.body, variables, text):
            return "mismatch"
        return None
    if text is not None and not text_fits(template.body, text):
        return "mismatch"
    return None
