"""Each node's last egress counters (``wire.egress.Report``, encoded), carried in its signed sync
request and stored with its contact: per route, calls sent upstream, upstream answers by status
class, calls that got no answer, and their summed latency. A report, like ``last_seen`` and
``applied_revision``, so not in the node row's MAC: existing MACs are unchanged.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("egress", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("egress")
