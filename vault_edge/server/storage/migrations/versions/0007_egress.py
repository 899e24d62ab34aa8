"""Egress routes (keyless workers): the agent calls an upstream API for a worker and injects the key.

Each row carries a MAC (``crypto/rowmac.py``, purpose "egress") over its name, route, regions and
revision; the revision is checked against the change log, so a deleted route copied back is refused.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "egress_routes",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("route", sa.Text, nullable=False),
        sa.Column("regions", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("egress_routes")
