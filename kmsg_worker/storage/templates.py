"""The template registry and the providers' AlimTalk templates, as stored rows.

Every state change is a conditional ``UPDATE ... WHERE state = <the state it leaves>``: two
operators publishing the same draft at once publish it once, and the other one is told it was
already published. A new version is an ``INSERT`` of the next number under the table's primary key,
so two edits racing for one number cannot both win.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError

from kmsg_worker.errors import InvalidStateError, ValidationError
from kmsg_worker.storage.db import make_sessionmaker
from kmsg_worker.storage.models import ProviderTemplate, Template

__all__ = ["DRAFT", "PUBLISHED", "ARCHIVED", "SyncCounts", "TemplateStore"]

DRAFT, PUBLISHED, ARCHIVED = "draft", "published", "archived"


@dataclass(frozen=True)
class SyncCounts:
    """What one sync of a provider's AlimTalk templates changed."""

    new: int
    changed: int
    unchanged: int
    deleted: int


class TemplateStore:
    """Reads and writes of ``kmsg_templates`` and ``kmsg_provider_templates``.

    Args:
        engine: The process's engine (the runtime's).
    """

    def __init__(self, engine: Engine) -> None:
        self.sessions = make_sessionmaker(engine)

    # -- the registry -------------------------------------------------------------------------------

    def versions(self, tenant: str, name: str) -> list[Template]:
        """Every version of ``name``, oldest first (empty when there is no such template)."""
        with self.sessions() as s:
            query = select(Template).where(Template.tenant == tenant, Template.name == name).order_by(Template.version)
            return list(s.scalars(query))

    def version(self, tenant: str, name: str, version: int) -> Template | None:
        """One version, or ``None``."""
        with self.sessions() as s:
            return s.get(Template, (tenant, name, version))

    def latest_published(self, tenant: str, name: str) -> Template | None:
        """The highest published version of ``name``, or ``None``."""
        with self.sessions() as s:
            query = (
                select(Template)
                .where(Template.tenant == tenant, Template.name == name, Template.state == PUBLISHED)
                .order_by(Template.version.desc())
                .limit(1)
            )
            return s.scalars(query).first()

    def names(self, tenant: str) -> list[Template]:
        """The latest version of each of the tenant's templates, by name."""
        with self.sessions() as s:
            latest = (
                select(Template.name, func.max(Template.version).label("v"))
                .where(Template.tenant == tenant)
                .group_by(Template.name)
                .subquery()
            )
            query = (
                select(Template)
                .join(latest, (Template.name == latest.c.name) & (Template.version == latest.c.v))
                .where(Template.tenant == tenant)
                .order_by(Template.name)
            )
            return list(s.scalars(query))

    def add_version(
        self, tenant: str, name: str, version: int, fields: Mapping[str, Any], *, now: datetime
    ) -> Template:
        """Insert ``version`` of ``name`` as a draft.

        Raises:
            ValidationError: That version exists already (rule ``duplicate``): another edit won.
        """
        row = Template(
            tenant=tenant,
            name=name,
            version=version,
            state=DRAFT,
            created_at=now,
            updated_at=now,
            published_at=None,
            archived_at=None,
            **fields,
        )
        try:
            with self.sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            raise ValidationError(
                "name", "duplicate", f"template {name!r} version {version} exists already (a concurrent edit?)"
            ) from None
        return row

    def update_draft(self, tenant: str, name: str, version: int, fields: Mapping[str, Any], *, now: datetime) -> bool:
        """Change a draft in place; ``False`` when that version is no longer a draft."""
        with self.sessions.begin() as s:
            result = s.execute(
                update(Template)
                .where(
                    Template.tenant == tenant,
                    Template.name == name,
                    Template.version == version,
                    Template.state == DRAFT,
                )
                .values(updated_at=now, **fields)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def move(self, tenant: str, name: str, version: int, *, leaving: Iterable[str], to: str, now: datetime) -> None:
        """Move one version from one of the ``leaving`` states to ``to``.

        Raises:
            InvalidStateError: The version is in none of ``leaving`` (named in the message).
            ValidationError: No such version.
        """
        stamp = {PUBLISHED: {"published_at": now}, ARCHIVED: {"archived_at": now}}.get(to, {})
        with self.sessions.begin() as s:
            result = s.execute(
                update(Template)
                .where(
                    Template.tenant == tenant,
                    Template.name == name,
                    Template.version == version,
                    Template.state.in_(list(leaving)),
                )
                .values(state=to, updated_at=now, **stamp)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                return
            current = s.get(Template, (tenant, name, version))
        if current is None:
            raise ValidationError("template", "unknown", f"no template {name}@{version}")
        raise InvalidStateError(f"template {name}@{version} is {current.state}; it cannot become {to}")

    # -- providers' AlimTalk templates --------------------------------------------------------------

    def provider_template(self, provider: str, code: str) -> ProviderTemplate | None:
        """The stored template ``code`` of ``provider`` (deleted ones too), or ``None``."""
        with self.sessions() as s:
            return s.get(ProviderTemplate, (provider, code))

    def provider_templates(self, provider: str | None = None) -> list[ProviderTemplate]:
        """Every stored AlimTalk template (of one provider), by provider and code."""
        with self.sessions() as s:
            query = select(ProviderTemplate).order_by(ProviderTemplate.provider, ProviderTemplate.code)
            if provider is not None:
                query = query.where(ProviderTemplate.provider == provider)
            return list(s.scalars(query))

    def providers_with_templates(self, providers: Sequence[str]) -> set[str]:
        """Which of ``providers`` have had their templates synced at least once."""
        with self.sessions() as s:
            query = select(ProviderTemplate.provider).where(ProviderTemplate.provider.in_(list(providers))).distinct()
            return set(s.scalars(query))

    def replace_provider_templates(
        self, provider: str, templates: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> SyncCounts:
        """Store what ``provider`` reports now: new rows, changed rows, and deletions.

        Args:
            templates: One mapping per template with the columns of :class:`ProviderTemplate`
                (``code``, ``channel``, ``name``, ``body``, ``variables``, ``buttons``, ``approval``,
                ``provider_status``).

        Returns:
            The counts of new, changed, unchanged and (no longer reported) deleted templates.
        """
        compared = ("channel", "name", "body", "variables", "buttons", "approval", "provider_status")
        new = changed = unchanged = deleted = 0
        with self.sessions.begin() as s:
            stored = {
                row.code: row
                for row in s.scalars(select(ProviderTemplate).where(ProviderTemplate.provider == provider))
            }
            seen = set()
            for item in templates:
                code = str(item["code"])
                seen.add(code)
                row = stored.get(code)
                if row is None:
                    s.add(ProviderTemplate(provider=provider, synced_at=now, deleted_at=None, **dict(item)))
                    new += 1
                    continue
                if row.deleted_at is None and all(getattr(row, k) == item.get(k) for k in compared):
                    unchanged += 1
                else:
                    changed += 1
                    for key in compared:
                        setattr(row, key, item.get(key))
                    row.deleted_at = None
                row.synced_at = now
            for code, row in stored.items():
                if code not in seen and row.deleted_at is None:
                    row.deleted_at = now
                    deleted += 1
        return SyncCounts(new, changed, unchanged, deleted)
