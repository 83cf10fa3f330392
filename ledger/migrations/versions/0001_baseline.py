"""Baseline: the schema as create_all made it before migrations existed (2026-12-03).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: databases of this schema were made by create_all (and are stamped here by init_db)."""


def downgrade() -> None:
    pass
