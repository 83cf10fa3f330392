"""Usage records are indexed by (batch_id, status), in place of batch_id alone.

The settler moves a batch's records with `WHERE batch_id = ? AND status = ?`. Given single-column indexes on
both, SQLite's planner took the status index and scanned every submitted record: with 64 batches of 500 in
flight, 32,000 rows for each batch settled, a third of the settler's time at batch 500 (bench/settle.py).
The pair serves every query that named batch_id alone, so that index goes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    have = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("usage_records")}
    if "ix_usage_records_batch_status" not in have:
        op.create_index("ix_usage_records_batch_status", "usage_records", ["batch_id", "status"])
    if "ix_usage_records_batch_id" in have:
        op.drop_index("ix_usage_records_batch_id", table_name="usage_records")


def downgrade() -> None:
    op.create_index("ix_usage_records_batch_id", "usage_records", ["batch_id"])
    op.drop_index("ix_usage_records_batch_status", table_name="usage_records")
