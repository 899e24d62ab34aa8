"""Operator tokens remember the token that made them, so revoking a token revokes what it made.

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


def upgrade() -> None:
    with op.batch_alter_table("operator_tokens") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(32), nullable=True))
        batch.create_index("ix_operator_tokens_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("operator_tokens") as batch:
        batch.drop_index("ix_operator_tokens_parent_id")
        batch.drop_column("parent_id")
