"""Alembic's environment: runs on the connection ledger.db.init_db hands it (or one from -x url=...)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlmodel import SQLModel

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # the alembic command line: `alembic -c ... -x url=sqlite:///gateway.db upgrade head`
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -c ledger/migrations/alembic.ini -x url=<database URL> ...")
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=SQLModel.metadata)
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()
else:
    context.configure(connection=connection, target_metadata=SQLModel.metadata)
    with context.begin_transaction():
        context.run_migrations()
