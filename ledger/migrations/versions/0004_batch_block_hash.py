"""Settled batches not final yet keep the hash of their block (batches.block_hash).

A settler with `confirmations` > 0 counts a batch final only once that many blocks are on top of it; until
then it compares the stored hash with the chain's canonical block at block_number, and a batch whose block
was dropped by a reorg goes back to be sent again (ledger/settler.py). NULL means final: every batch written
before, and every batch of a settler with confirmations = 0. A partial index would serve the settler's look
at its unconfirmed batches, but they are few and (settler, first_seq) already narrows them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if "block_hash" not in {c["name"] for c in insp.get_columns("batches")}:
        with op.batch_alter_table("batches") as b:
            b.add_column(sa.Column("block_hash", sa.String(length=66), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as b:
        b.drop_column("block_hash")
