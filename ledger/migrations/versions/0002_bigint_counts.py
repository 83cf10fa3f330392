"""Token counts, limits, block numbers and leaf indexes as 64-bit integers.

They were INTEGER, 32-bit on PostgreSQL: a busy key's tokens per minute, a long-lived counter or a block
number of a fast chain could pass 2^31 - 1 and fail the write. SQLite's INTEGER already holds 64 bits, so
only PostgreSQL's columns change.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = {
    "usage_records": (
        "prompt_tokens",
        "completion_tokens",
        "node_prompt_tokens",
        "node_completion_tokens",
        "leaf_index",
    ),
    "batches": ("record_count", "block_number"),
    "datasets": ("registered_block", "updated_block"),
    "adapter_names": ("registered_block", "updated_block"),
    "adapters": ("registered_block", "updated_block"),
    "nodes": ("registered_block", "updated_block"),
    "sync_cursors": ("block",),
    "api_keys": ("rate_limit_per_minute",),
    "gateway_key_policies": ("tokens_per_minute",),
    "gateway_requests": ("prompt_tokens", "completion_tokens", "max_tokens"),
}


def _retype(to: sa.types.TypeEngine) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    insp = sa.inspect(bind)
    for table, columns in COLUMNS.items():
        if not insp.has_table(table):
            continue  # e.g. the gateway's tables in a settler-only database: create_all makes them 64-bit
        have = {c["name"] for c in insp.get_columns(table)}
        for column in columns:
            if column in have:
                op.alter_column(table, column, type_=to)


def upgrade() -> None:
    _retype(sa.BigInteger())


def downgrade() -> None:
    _retype(sa.Integer())
