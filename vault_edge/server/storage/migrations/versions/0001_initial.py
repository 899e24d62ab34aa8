"""The initial schema.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "counter",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("counter", sa.column("id", sa.Integer), sa.column("revision", sa.BigInteger)),
        [{"id": 1, "revision": 0}, {"id": 2, "revision": 0}],
    )
    op.create_table(
        "regions",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("data_rev", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "region_keys",
        sa.Column("region", sa.String(63), sa.ForeignKey("regions.name"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(256), nullable=False, unique=True),
        sa.Column("regions", sa.Text, nullable=False),
        sa.Column("latest_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=True),
        sa.Column("destroyed", sa.Integer, nullable=False),
        sa.Column("generate", sa.String(64), nullable=True),
        sa.Column("rotate_every_s", sa.Integer, nullable=True),
        sa.Column("next_rotation_at", sa.Float, nullable=True),
        sa.Column("grace_s", sa.Integer, nullable=True),
    )
    op.create_table(
        "secret_versions",
        sa.Column("secret_id", sa.Integer, sa.ForeignKey("secrets.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
    )
    op.create_table(
        "data_key_wraps",
        sa.Column("secret_id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("region", sa.String(63), primary_key=True),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "stages",
        sa.Column("secret_id", sa.Integer, sa.ForeignKey("secrets.id"), primary_key=True),
        sa.Column("stage", sa.String(16), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
    )
    op.create_table(
        "stage_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("secret_id", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_stage_log_secret", "stage_log", ["secret_id", "stage", "revision"])
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("region", sa.String(63), sa.ForeignKey("regions.name"), nullable=False),
        sa.Column("box_public", sa.LargeBinary, nullable=False),
        sa.Column("sign_public", sa.LargeBinary, nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("applied_revision", sa.BigInteger, nullable=False),
        sa.Column("node_rev", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_nodes_region", "nodes", ["region"])
    op.create_table(
        "grants",
        sa.Column("node_id", sa.String(32), sa.ForeignKey("nodes.id"), primary_key=True),
        sa.Column("region", sa.String(63), primary_key=True),
        sa.Column("key_version", sa.Integer, primary_key=True),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("region", sa.String(63), sa.ForeignKey("regions.name"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
        sa.Column("used_by", sa.String(32), nullable=True),
    )
    op.create_table(
        "operator_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.LargeBinary, nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefixes", sa.Text, nullable=False),
        sa.Column("verbs", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "nonces",
        sa.Column("node_id", sa.String(32), primary_key=True),
        sa.Column("nonce", sa.String(32), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_nonces_expires", "nonces", ["expires_at"])
    op.create_table(
        "audit",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=True),
        sa.UniqueConstraint("hash", name="uq_audit_hash"),
    )


def downgrade() -> None:
    for table in (
        "audit",
        "nonces",
        "operator_tokens",
        "join_tokens",
        "grants",
        "nodes",
        "stage_log",
        "stages",
        "data_key_wraps",
        "secret_versions",
        "secrets",
        "region_keys",
        "regions",
        "counter",
        "meta",
    ):
        op.drop_table(table)
