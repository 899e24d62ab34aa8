"""Root key versions (`operator rotate`): each region key row names the root key version that wraps
it (1, derived from the root key, for every row made before), and versions from 2 on are stored
wrapped under a key derived from the root key. The seal's wrapped root keys (under the unseal key of
the shares, under the HSM's key) are rows of ``meta`` and need no schema.

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
    with op.batch_alter_table("region_keys") as batch:
        batch.add_column(sa.Column("root_version", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "root_keys",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("root_keys")
    with op.batch_alter_table("region_keys") as batch:
        batch.drop_column("root_version")
