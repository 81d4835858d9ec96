"""Alembic migrations of the sessions database (configured in code; no alembic.ini).

``core.sessions.store.alembic_config(connection)`` builds the configuration;
``env.py`` runs on the connection it is given, inside the caller's transaction,
so an upgrade is applied whole or not at all.

Writing a revision: add ``versions/NNNN_what.py`` (copy the layout of the
existing ones; ``down_revision`` is the previous head), make the same change in
``core/sessions/schema.py`` and append ``NNNN`` to ``schema.REVISIONS``. The
tests compare the upgraded database with the ORM. Beware of table rebuilds
(``batch_alter_table`` with recreate): every connection has foreign keys on, so
dropping the old ``sessions`` table would cascade into every child table; use
SQLite's own ``ALTER TABLE ... ADD/DROP/RENAME COLUMN`` instead.
"""
