"""Templates: the per-tenant registry, sending by template, and the AlimTalk preflight.

**Registry.** A tenant's SMS/LMS/MMS/FriendTalk templates, each a name with numbered versions in
the states ``draft -> published -> archived``. A published version never changes: editing a
template edits its draft, or starts the next version as a draft when there is none. Variables are
the body's ``#{name}`` tokens (:data:`~kmsg_worker.message.VAR_PATTERN`), listed in order.

**Sending by template.** ``template="order_shipped"`` (its latest published version) or
``"order_shipped@3"`` with ``variables``: the producer resolves the reference once (a batch once,
not per row), fills in the body, subject and type, and records ``name@version`` on the message.
Missing or unknown variables are a :class:`~kmsg_worker.errors.ValidationError` naming them, before
anything is stored. The message keeps the text it was rendered to: archiving a version later
changes nothing for messages already accepted (scheduled ones included).

**AlimTalk preflight.** Kakao sends an AlimTalk only when its text is the approved template with
the variables filled in. :class:`AlimTalkPreflight` checks a message against the templates the
providers reported (``kmsg templates sync``) before it is queued: the template exists for that
provider (and Kakao channel), is approved, every variable is given and no other, and the text equals
the approved body with those variables. A message without text gets the rendered body, one
without buttons the template's buttons, and its variables are put in the template's order (IWINV
takes them as a list). The fake providers refuse a send by the same rule (:func:`render_matches`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from kmsg_worker.errors import InvalidStateError, ValidationError
from kmsg_worker.logging import get_logger
from kmsg_worker.message import (
    VAR_PATTERN,
    MessageType,
    ValidationLimits,
    count_bytes,
    infer_type,
    interpolate,
)
from kmsg_worker.message.advertising import AdvertiserProfile, require_profile
from kmsg_worker.message.advertising import compose as compose_advertising
from kmsg_worker.runtime import Runtime
from kmsg_worker.storage.models import ProviderTemplate, Template
from kmsg_worker.storage.templates import ARCHIVED, DRAFT, PUBLISHED, SyncCounts, TemplateStore

__all__ = [
    "REGISTRY_TYPES",
    "AlimTalkPreflight",
    "Preview",
    "Registry",
    "TemplateResolver",
    "TemplateVersion",
    "advertising_step",
    "check_variables",
    "parse_ref",
    "render_matches",
    "sync_all_providers",
    "sync_provider_templates",
    "template_variables",
]

log = get_logger("kmsg.templates")

#: Types a registry template may have (AlimTalk templates are the providers', synced, not authored).
REGISTRY_TYPES = frozenset({"SMS", "LMS", "MMS", "FRIENDTALK"})
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
_REF = re.compile(r"([A-Za-z0-9_.\-]{1,64})(?:@([1-9][0-9]{0,8}))?", re.ASCII)
_MAX_BODY = 20_000


def template_variables(*texts: str | None) -> list[str]:
    """The ``#{name}`` variables of ``texts``, each once, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        if text:
            for name in VAR_PATTERN.findall(text):
                seen.setdefault(name, None)
    return list(seen)


def parse_ref(ref: object) -> tuple[str, int | None]:
    """``"name"`` or ``"name@3"`` as ``(name, version or None)``.

    Raises:
        ValidationError: Not a template reference (field ``template``).
    """
    match = _REF.fullmatch(ref) if isinstance(ref, str) else None
    if match is None:
        raise ValidationError(
            "template", "format", "must be a template name or 'name@version' (letters, digits, '_', '.', '-')"
        )
    return match.group(1), int(match.group(2)) if match.group(2) else None


def check_variables(ref: str, declared: Sequence[str] | frozenset[str], given: Mapping[str, Any]) -> None:
    """Every variable of the template is given, and no other.

    Raises:
        ValidationError: ``variables`` / ``missing`` or ``unknown``, naming the variables.
    """
    if given.keys() == set(declared):
        return
    missing = [name for name in declared if name not in given]
    if missing:
        raise ValidationError("variables", "missing", f"template {ref} needs {', '.join(missing)}")
    unknown = sorted(name for name in given if name not in declared)
    raise ValidationError("variables", "unknown", f"template {ref} has no variable {', '.join(unknown)}")


def render_matches(body: str, variables: Mapping[str, str], text: str) -> bool:
    """Whether ``text`` is ``body`` with ``variables`` filled in: Kakao's AlimTalk rule."""
    return interpolate(body, variables) == text


@dataclass(frozen=True)
class TemplateVersion:
    """One version of a registry template."""

    tenant: str
    name: str
    version: int
    state: str
    type: str | None
    body: str
    subject: str | None
    variables: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None
    archived_at: datetime | None

    @property
    def ref(self) -> str:
        """``name@version``: what a message records."""
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (the CLI's and the API's)."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "state": self.state,
            "type": self.type,
            "body": self.body,
            "subject": self.subject,
            "variables": list(self.variables),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "published_at": self.published_at.isoformat() if self.published_at else None,
            "archived_at": self.archived_at.isoformat() if self.archived_at else None,
        }

    def fields(self) -> dict[str, Any]:
        """The message fields this version gives a send (the caller's ``type`` and ``subject`` win)."""
        out: dict[str, Any] = {"text": self.body, "template": self.ref}
        if self.subject:
            out["subject"] = self.subject
        if self.type:
            out["type"] = self.type
        return out


def _version(row: Template) -> TemplateVersion:
    return TemplateVersion(
        tenant=row.tenant,
        name=row.name,
        version=row.version,
        state=row.state,
        type=row.type,
        body=row.body,
        subject=row.subject,
        variables=tuple(row.variables or ()),
        created_at=row.created_at,
        updated_at=row.updated_at,
        published_at=row.published_at,
        archived_at=row.archived_at,
    )


@dataclass(frozen=True)
class Preview:
    """A template rendered with sample variables, as a send would render it.

    Attributes:
        text: The rendered text (after every composing step).
        subject: The rendered subject.
        bytes: ``text``'s bytes as carriers count them.
        type: ``SMS`` or ``LMS`` (or the template's own type) for that text.
        missing: Variables not given (their tokens stay in ``text``).
        unknown: Given variables the template does not have.
        steps: The composing steps applied after rendering, by name.
    """

    ref: str
    text: str
    subject: str | None
    bytes: int
    type: str
    missing: list[str]
    unknown: list[str]
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly form."""
        return {
            "ref": self.ref,
            "text": self.text,
            "subject": self.subject,
            "bytes": self.bytes,
            "type": self.type,
            "missing": self.missing,
            "unknown": self.unknown,
            "steps": self.steps,
        }


#: A composing step of a preview: a name and a function of the rendered text (for example the
#: advertising prefix and opt-out line); applied in order after the variables are filled in.
ComposeStep = tuple[str, Callable[[str], str]]


def advertising_step(
    advertiser: Callable[[str, str | None], AdvertiserProfile | None], tenant: str, sender: str | None
) -> ComposeStep:
    """The preview step that adds the ``(광고)`` head and the opt-out footer, as an advertising send would.

    Args:
        advertiser: ``(tenant, sender) -> profile`` (:func:`kmsg_worker.adrules.profile_lookup`).

    Raises:
        ValidationError: No advertiser profile for the tenant and sender (``purpose`` /
            ``advertiser_profile``), the same refusal a send gets.
    """
    profile = require_profile(advertiser(tenant, sender), tenant, sender)
    return "advertising", lambda text: compose_advertising(text, profile, sender=sender)


class Registry:
    """A tenant-scoped template registry over the system of record.

    Args:
        engine: The process's engine (``Runtime.engine``).
        limits: Byte limits for the preview's SMS/LMS decision.
    """

    def __init__(self, engine: Engine, limits: ValidationLimits | None = None) -> None:
        self.store = TemplateStore(engine)
        self.limits = limits or ValidationLimits()

    # -- authoring ----------------------------------------------------------------------------------

    def _fields(self, body: object, type_: object, subject: object) -> dict[str, Any]:
        if not isinstance(body, str) or not body.strip():
            raise ValidationError("body", "required", "a template needs a non-empty body")
        if len(body) > _MAX_BODY:
            raise ValidationError("body", "max_length", f"at most {_MAX_BODY} characters")
        mtype: str | None = None
        if type_ is not None:
            if not isinstance(type_, str) or type_.upper() not in REGISTRY_TYPES:
                raise ValidationError("type", "enum", f"must be one of {', '.join(sorted(REGISTRY_TYPES))}")
            mtype = type_.upper()
        if subject is not None:
            if not isinstance(subject, str):
                raise ValidationError("subject", "type", "must be a string")
            if mtype not in (None, "LMS", "MMS"):
                raise ValidationError("subject", "not_allowed", f"{mtype} has no subject; use LMS or MMS")
            subject = subject if subject.strip() else None
            if subject and VAR_PATTERN.search(subject):
                # Bulk rows share one subject (the fast path renders only the body per row).
                raise ValidationError("subject", "no_variables", "a template's subject is fixed text, without #{...}")
        variables = template_variables(body)
        if len(variables) > self.limits.max_variables:
            raise ValidationError("body", "max_variables", f"at most {self.limits.max_variables} variables")
        return {"type": mtype, "body": body, "subject": subject, "variables": variables}

    def create(
        self,
        tenant: str,
        name: str,
        body: str,
        *,
        type: str | None = None,  # noqa: A002 - the message field's name
        subject: str | None = None,
        now: datetime,
    ) -> TemplateVersion:
        """Create a template: version 1, a draft.

        Raises:
            ValidationError: Bad name, body, type or subject, or the name is taken (``duplicate``).
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValidationError("name", "format", "1-64 characters: letters, digits, '_', '.', '-'")
        if self.store.versions(tenant, name):
            raise ValidationError("name", "duplicate", f"template {name!r} exists; edit it to make a new version")
        row = self.store.add_version(tenant, name, 1, self._fields(body, type, subject), now=now)
        log.info("template.created", tenant=tenant, template=f"{name}@1")
        return _version(row)

    def edit(
        self,
        tenant: str,
        ref: str,
        *,
        body: str | None = None,
        type: str | None = None,  # noqa: A002 - the message field's name
        subject: str | None = None,
        now: datetime,
    ) -> TemplateVersion:
        """Change a template: its draft in place, or a new draft version after the latest one.

        ``ref`` is a name, or ``name@version`` naming the draft itself. Fields left ``None`` keep
        the latest version's value.

        Raises:
            InvalidStateError: ``name@version`` names a published or archived version (immutable).
            ValidationError: No such template, or a bad field.
        """
        name, wanted = parse_ref(ref)
        versions = self.store.versions(tenant, name)
        if not versions:
            raise ValidationError("template", "unknown", f"no template {name!r}")
        latest = versions[-1]
        if wanted is not None:
            target = next((v for v in versions if v.version == wanted), None)
            if target is None:
                raise ValidationError("template", "unknown", f"no template {name}@{wanted}")
            if target.state != DRAFT:
                raise InvalidStateError(
                    f"template {name}@{wanted} is {target.state} and cannot change; "
                    f"edit {name!r} to start version {latest.version + 1 if latest.state != DRAFT else latest.version}"
                )
        fields = self._fields(
            latest.body if body is None else body,
            latest.type if type is None else type,
            latest.subject if subject is None else subject,
        )
        if latest.state == DRAFT and self.store.update_draft(tenant, name, latest.version, fields, now=now):
            log.info("template.edited", tenant=tenant, template=f"{name}@{latest.version}")
            row = self.store.version(tenant, name, latest.version)
            assert row is not None
            return _version(row)
        version = latest.version + 1
        row = self.store.add_version(tenant, name, version, fields, now=now)
        log.info("template.edited", tenant=tenant, template=f"{name}@{version}")
        return _version(row)

    def _target(self, tenant: str, ref: str, default_state: str) -> Template:
        name, wanted = parse_ref(ref)
        versions = self.store.versions(tenant, name)
        if not versions:
            raise ValidationError("template", "unknown", f"no template {name!r}")
        if wanted is None:
            # The newest version in the state the operation starts from, else the newest one
            # (so that the error names its state).
            candidates = [v for v in versions if v.state == default_state] or versions
            return candidates[-1]
        target = next((v for v in versions if v.version == wanted), None)
        if target is None:
            raise ValidationError("template", "unknown", f"no template {name}@{wanted}")
        return target

    def publish(self, tenant: str, ref: str, *, now: datetime) -> TemplateVersion:
        """Publish a draft (``name``: its draft); from then on it never changes.

        Raises:
            InvalidStateError: The version is already published, or archived.
        """
        target = self._target(tenant, ref, DRAFT)
        self.store.move(tenant, target.name, target.version, leaving=(DRAFT,), to=PUBLISHED, now=now)
        log.info("template.published", tenant=tenant, template=f"{target.name}@{target.version}")
        row = self.store.version(tenant, target.name, target.version)
        assert row is not None
        return _version(row)

    def archive(self, tenant: str, ref: str, *, now: datetime) -> TemplateVersion:
        """Archive a version (``name``: its latest published one): new sends can no longer use it.

        Messages already accepted with it, scheduled ones included, keep their text and version.

        Raises:
            InvalidStateError: The version is archived already.
        """
        target = self._target(tenant, ref, PUBLISHED)
        self.store.move(tenant, target.name, target.version, leaving=(DRAFT, PUBLISHED), to=ARCHIVED, now=now)
        log.info("template.archived", tenant=tenant, template=f"{target.name}@{target.version}")
        row = self.store.version(tenant, target.name, target.version)
        assert row is not None
        return _version(row)

    # -- reading ------------------------------------------------------------------------------------

    def all(self, tenant: str) -> list[TemplateVersion]:
        """The latest version of each template of the tenant."""
        return [_version(row) for row in self.store.names(tenant)]

    def show(self, tenant: str, name: str) -> list[TemplateVersion]:
        """Every version of ``name``, oldest first.

        Raises:
            ValidationError: No such template.
        """
        versions = self.store.versions(tenant, parse_ref(name)[0])
        if not versions:
            raise ValidationError("template", "unknown", f"no template {name!r}")
        return [_version(row) for row in versions]

    def get(self, tenant: str, ref: str) -> TemplateVersion:
        """One version in any state (``name``: the latest version)."""
        name, wanted = parse_ref(ref)
        versions = self.show(tenant, name)
        if wanted is None:
            return versions[-1]
        for version in versions:
            if version.version == wanted:
                return version
        raise ValidationError("template", "unknown", f"no template {name}@{wanted}")

    def resolve(self, tenant: str, ref: object) -> TemplateVersion:
        """The version a send uses: ``name`` is its latest published version, ``name@N`` version N.

        Raises:
            ValidationError: Field ``template``: ``unknown``, ``not_published`` (a draft, or no
                published version) or ``archived``.
        """
        name, wanted = parse_ref(ref)
        if wanted is None:
            row = self.store.latest_published(tenant, name)
            if row is None:
                if not self.store.versions(tenant, name):
                    raise ValidationError("template", "unknown", f"no template {name!r}")
                raise ValidationError("template", "not_published", f"template {name!r} has no published version")
            return _version(row)
        found = self.store.version(tenant, name, wanted)
        if found is None:
            raise ValidationError("template", "unknown", f"no template {name}@{wanted}")
        if found.state == DRAFT:
            raise ValidationError("template", "not_published", f"template {name}@{wanted} is a draft; publish it first")
        if found.state == ARCHIVED:
            raise ValidationError("template", "archived", f"template {name}@{wanted} is archived")
        return _version(found)

    def preview(
        self,
        tenant: str,
        ref: str,
        variables: Mapping[str, Any] | None = None,
        *,
        compose: Sequence[ComposeStep] = (),
    ) -> Preview:
        """Render a version (any state) with sample variables: its text, bytes, and SMS or LMS.

        Args:
            variables: Sample values; a missing one leaves its ``#{name}`` token (listed in ``missing``).
            compose: Steps applied to the rendered text before it is measured, in order (the
                advertising composition, where it applies, is one).
        """
        version = self.get(tenant, ref)
        given = {str(k): "" if v is None else str(v) for k, v in (variables or {}).items()}
        text = interpolate(version.body, given)
        for _, step in compose:
            text = step(text)
        subject = version.subject
        nbytes = count_bytes(text)
        mtype = version.type or infer_type(text, subject, None, self.limits, nbytes).value
        return Preview(
            ref=version.ref,
            text=text,
            subject=subject,
            bytes=nbytes,
            type=mtype,
            missing=[v for v in version.variables if v not in given],
            unknown=sorted(k for k in given if k not in version.variables),
            steps=[name for name, _ in compose],
        )


# -- sending by template ---------------------------------------------------------------------------


class TemplateResolver:
    """Resolves ``template`` references of messages, each reference once per resolver.

    A batch uses one resolver: a 100,000-row batch naming one template reads it once.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[tuple[str, str], TemplateVersion] = {}

    def version(self, tenant: str, ref: object) -> TemplateVersion:
        """The version ``ref`` names for ``tenant`` (see :meth:`Registry.resolve`)."""
        if not isinstance(ref, str):
            parse_ref(ref)  # raises: not a reference (never repr'd: it may be any value a caller sent)
        key = (tenant, str(ref))
        found = self._cache.get(key)
        if found is None:
            found = self.registry.resolve(tenant, ref)
            self._cache[key] = found
        return found

    def apply(self, raw: Mapping[str, Any], *, check: bool = True, tenant: str = "default") -> dict[str, Any]:
        """``raw`` with its ``template`` replaced by the version's fields (text, subject, type, ref).

        Raises:
            ValidationError: The reference does not resolve, ``text`` is given as well, or
                (``check``) the variables are not exactly the template's.
        """
        out = dict(raw)
        tenant = out.get("tenant") or tenant
        if not isinstance(tenant, str):
            raise ValidationError("tenant", "type", "must be a string")
        version = self.version(tenant, out.get("template"))
        for name in ("text", "content"):
            if out.get(name) is not None:
                raise ValidationError(name, "not_allowed", "give either a text or a template, not both")
        if check:
            given = out.get("variables")
            check_variables(version.ref, version.variables, given if isinstance(given, Mapping) else {})
        given_type = out.get("type")
        if isinstance(given_type, str) and given_type.upper() not in REGISTRY_TYPES:
            raise ValidationError(
                "type", "not_allowed", f"a registry template sends {', '.join(sorted(REGISTRY_TYPES))}"
            )
        for key, value in version.fields().items():
            if key in ("text", "template") or out.get(key) is None:
                out[key] = value
        return out


# -- AlimTalk preflight ----------------------------------------------------------------------------


class AlimTalkPreflight:
    """Checks AlimTalk messages against the providers' synced templates (see the module docstring).

    One instance per request or batch: it reads each provider's templates once.

    Args:
        rt: The runtime (its engine, providers and ``alimtalk_preflight`` setting).
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.mode = rt.settings.alimtalk_preflight
        self.store = TemplateStore(rt.engine)
        self._synced: dict[str, bool] = {}
        self._templates: dict[tuple[str, str], ProviderTemplate | None] = {}

    def _is_synced(self, provider: str) -> bool:
        known = self._synced.get(provider)
        if known is None:
            known = provider in self.store.providers_with_templates([provider])
            self._synced[provider] = known
        return known

    def _template(self, provider: str, code: str) -> ProviderTemplate | None:
        key = (provider, code)
        if key not in self._templates:
            self._templates[key] = self.store.provider_template(provider, code)
        return self._templates[key]

    def check(self, content: dict[str, Any], route: Iterable[str]) -> dict[str, Any]:
        """Check one AlimTalk message (its stored ``content``) for every provider of its route.

        Returns:
            ``content``, completed: the rendered text when it had none, the template's buttons
            when it had none, the variables in the template's order.

        Raises:
            ValidationError: Naming the cause: ``template_id`` (``not_synced``, ``unknown_template``,
                ``deleted``, ``not_approved``), ``kakao`` (``channel_mismatch``), ``variables``
                (``missing``, ``unknown``) or ``text`` (``template_mismatch``).
        """
        if self.mode == "off" or content.get("type") != MessageType.ALIMTALK.value:
            return content
        code = str(content.get("template_id") or "")
        for provider in dict.fromkeys(route):
            if not self._is_synced(provider):
                if self.mode == "required":
                    raise ValidationError(
                        "template_id",
                        "not_synced",
                        f"{provider}'s AlimTalk templates were never synced "
                        f"(kmsg templates sync --provider {provider})",
                    )
                continue
            content = self._check_one(provider, code, content)
        return content

    def _check_one(self, provider: str, code: str, content: dict[str, Any]) -> dict[str, Any]:
        template = self._template(provider, code)
        if template is None:
            raise ValidationError("template_id", "unknown_template", f"{provider} has no AlimTalk template {code!r}")
        if template.deleted_at is not None:
            raise ValidationError(
                "template_id", "deleted", f"AlimTalk template {code!r} was deleted at {provider} (last sync)"
            )
        if template.approval != "approved":
            raise ValidationError(
                "template_id",
                "not_approved",
                f"AlimTalk template {code!r} is {template.approval} at {provider}, not approved",
            )
        kakao = content.get("kakao") or {}
        keys = self.rt.provider(provider).kakao_channel_keys
        channel = next((str(kakao[k]) for k in keys if kakao.get(k)), None)
        if channel and template.channel and channel != template.channel:
            raise ValidationError(
                "kakao",
                "channel_mismatch",
                f"AlimTalk template {code!r} belongs to another Kakao channel at {provider}",
            )
        given: dict[str, str] = content.get("variables") or {}
        # Aligo's `_full_text` (the whole rendered text) is an option, not a template variable.
        named = {k: v for k, v in given.items() if not k.startswith("_")}
        check_variables(f"{code!r} ({provider})", template.variables, named)
        rendered = interpolate(template.body, named)
        text = content.get("text")
        if text is None:
            content["text"] = rendered
        elif text != rendered:
            at = next((i for i, (a, b) in enumerate(zip(text, rendered, strict=False)) if a != b), None)
            where = f"character {at + 1}" if at is not None else f"length {len(text)} vs {len(rendered)}"
            raise ValidationError(
                "text",
                "template_mismatch",
                f"differs from the approved body of AlimTalk template {code!r} at {provider} ({where})",
            )
        if template.buttons and not content.get("buttons") and not kakao.get("buttons"):
            content["buttons"] = [dict(b) for b in template.buttons]
        if list(given) != [*template.variables, *(k for k in given if k.startswith("_"))]:
            ordered = {k: named[k] for k in template.variables}
            ordered.update((k, v) for k, v in given.items() if k.startswith("_"))
            content["variables"] = ordered
        return content


# -- sync ------------------------------------------------------------------------------------------


def sync_provider_templates(rt: Runtime, provider: str) -> SyncCounts:
    """Pull ``provider``'s AlimTalk templates and store them (new, changed, deleted).

    Raises:
        ValidationError: The provider has no template API (field ``provider``).
        ProviderError: The provider's template API failed; nothing was changed.
    """
    instance = rt.provider(provider)
    fetch = getattr(instance, "alimtalk_templates", None)
    if fetch is None:
        raise ValidationError("provider", "no_template_api", f"{provider} has no AlimTalk template API")
    templates: list[dict[str, Any]] = fetch()
    counts = TemplateStore(rt.engine).replace_provider_templates(provider, templates, now=rt.now())
    log.info(
        "template.synced",
        provider=provider,
        new=counts.new,
        changed=counts.changed,
        unchanged=counts.unchanged,
        deleted=counts.deleted,
    )
    return counts


def sync_all_providers(rt: Runtime) -> dict[str, SyncCounts]:
    """Sync every configured provider whose adapter has an AlimTalk template API.

    A provider whose list cannot be read is logged (``template.sync_failed``) and skipped: its
    stored templates stay as the last sync left them, and the others are still synced.
    """
    done: dict[str, SyncCounts] = {}
    for name in rt.settings.providers:
        try:
            if not hasattr(rt.provider(name), "alimtalk_templates"):
                continue
            done[name] = sync_provider_templates(rt, name)
        except Exception as exc:  # noqa: BLE001 - one provider's failure never stops the others
            log.warning("template.sync_failed", provider=name, error=type(exc).__name__)
    return done
