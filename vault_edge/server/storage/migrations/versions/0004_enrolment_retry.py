"""A node remembers the join token that enrolled it and the revision of its enrolment, so a retry of
that enrolment (same token, same node keys: the answer was lost on the way) is answered again with the
same node instead of "join token already used", and no node is left orphaned.

Both columns are in the node row's MAC (``storage/repo.py``): a database writer cannot tie a used
token to another node. Nodes enrolled before this migration have NULL in both and keep their MACs
(their MAC's field list simply has no such pair); a retry cannot find them, as before.

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
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("join_token_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("enrolled_rev", sa.BigInteger, nullable=True))
        batch.create_index("ix_nodes_join_token", ["join_token_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_index("ix_nodes_join_token")
        batch.drop_column("enrolled_rev")
        batch.drop_column("join_token_id")
