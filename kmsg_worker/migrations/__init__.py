"""Alembic migrations for PostgreSQL (``kmsg migrate`` or ``alembic -c kmsg_worker/migrations/alembic.ini``)."""
