"""Storage is untrusted: rows that grant authority or set order carry a MAC under a key derived from
the root key; revocations become an append-only MAC chain; a MAC'd, dense change log names the
secrets each revision changed (so one secret's older rows copied back are caught); sealed-time events
leave the audit chain.

A database made before this migration has rows without MACs (and operator tokens stored as plain
SHA-256 digests). It is adopted once, at the first unseal after the upgrade: the control plane MACs
those rows and marks the tokens' digests as legacy; the stored canary is then re-made in the new
format, which only the root key can do, so a database writer cannot ask for a second adoption
(see ``server/ops/system.py``).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MAC_TABLES = ("secrets", "stages", "nodes", "join_tokens", "operator_tokens")


def upgrade() -> None:
    for table in _MAC_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("mac", sa.LargeBinary, nullable=True))
    with op.batch_alter_table("secrets") as batch:
        batch.add_column(sa.Column("stages_digest", sa.LargeBinary, nullable=True))
    with op.batch_alter_table("operator_tokens") as batch:
        batch.add_column(sa.Column("legacy_digest", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "revocations",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("target", sa.String(300), primary_key=True),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_changes_target", "changes", ["target", "revision"])
    op.create_table(
        "sealed_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.bulk_insert(
        sa.table("counter", sa.column("id", sa.Integer), sa.column("revision", sa.BigInteger)),
        [{"id": 3, "revision": 0}],
    )


def downgrade() -> None:
    op.execute("DELETE FROM counter WHERE id = 3")
    op.drop_table("sealed_events")
    op.drop_index("ix_changes_target", "changes")
    op.drop_table("changes")
    op.drop_table("revocations")
    with op.batch_alter_table("operator_tokens") as batch:
        batch.drop_column("legacy_digest")
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("stages_digest")
    for table in reversed(_MAC_TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("mac")
