"""Alembic environment: migrate the connection in ``config.attributes["connection"]``.

The store opens that connection (with its pragmas) and a transaction around
the upgrade; nothing here reads an ini file or creates an engine. Offline
(``--sql``) mode is not supported.
"""

from __future__ import annotations

from alembic import context

from core.sessions.schema import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError(
        "core/sessions/migrations runs only on a connection passed as config.attributes['connection'] "
        "(see core.sessions.store.alembic_config)."
    )

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
