"""Rotation at the source: rotators (how a credential is changed where it lives), rotations (a
persisted four-step state machine per run), and the rotator a secret is bound to. Rotators and
rotations carry row MACs like every row that grants authority or sets order.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("secrets") as batch:
        batch.add_column(sa.Column("rotator", sa.String(64), nullable=True))
    op.create_table(
        "rotators",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("admin_secret", sa.String(256), nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "rotations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("secret", sa.String(256), nullable=False),
        sa.Column("rotator", sa.String(64), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("published_rev", sa.BigInteger, nullable=True),
        sa.Column("retire_after", sa.Float, nullable=True),
        sa.Column("mac", sa.LargeBinary, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_try_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("waiting_for", sa.Text, nullable=True),
    )
    op.create_index("ix_rotations_secret", "rotations", ["secret", "id"])
    op.create_index("ix_rotations_step", "rotations", ["step"])


def downgrade() -> None:
    op.drop_index("ix_rotations_step", "rotations")
    op.drop_index("ix_rotations_secret", "rotations")
    op.drop_table("rotations")
    op.drop_table("rotators")
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("rotator")
