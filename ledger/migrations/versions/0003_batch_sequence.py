"""Batches carry the sequence number of their first record (batches.first_seq).

AttributionLedger numbers every settler's records in one gapless sequence and accepts a batch only at
its settler's next number; the settler writes the number into the batch row when it forms the batch,
before anything is sent, so a crash and a resend keep it (ledger/settler.py). Batches written before
have none (NULL): they belong to a ledger without sequences. An index on (settler, first_seq) finds
a settler's open ranges when the next batch is numbered.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if "first_seq" not in {c["name"] for c in insp.get_columns("batches")}:
        # batch_alter_table: SQLite cannot add an index-backed column in place on every version
        with op.batch_alter_table("batches") as b:
            b.add_column(sa.Column("first_seq", sa.BigInteger(), nullable=True))
    if "ix_batches_settler_first_seq" not in {i["name"] for i in insp.get_indexes("batches")}:
        op.create_index("ix_batches_settler_first_seq", "batches", ["settler", "first_seq"])


def downgrade() -> None:
    op.drop_index("ix_batches_settler_first_seq", table_name="batches")
    with op.batch_alter_table("batches") as b:
        b.drop_column("first_seq")
