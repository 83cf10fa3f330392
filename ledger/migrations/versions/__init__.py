"""Alembic revisions (a package, so the wheel carries them)."""
