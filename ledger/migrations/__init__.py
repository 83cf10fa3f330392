"""Alembic migrations of the shared database (the ledger's outbox and mirrors, the gateway's tables).

How a database reaches the newest schema (ledger.db.init_db, under its lock):
- a new database: every table is created as the models declare it, and stamped at the newest revision
  (Alembic's recipe for a fresh database: the history is for databases that already hold rows);
- a database made before migrations existed (tables, no `alembic_version`): its missing columns added as
  before, stamped at the baseline (`0001`), then upgraded;
- a versioned database: upgraded.
Tables a revision finds missing are skipped (a ledger-only database has no gateway tables; create_all
makes them later with the newest types). New revision: `alembic -c ledger/migrations/alembic.ini revision -m "..."`.
"""
