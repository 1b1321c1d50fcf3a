"""Unit prices: models (and their price versions) are priced per image by size and
quality, per second of audio in, per million characters of speech and per rerank search
unit besides per token (docs/gateway-spec.md, "Unit prices"); models.kind grows the kinds
served by those interfaces."""

import sqlalchemy as sa
from alembic import op

revision: str = "0025_unit_prices"
down_revision: str | None = "0024_restriction"

_OLD_KINDS = "kind IN ('chat','embedding')"
_NEW_KINDS = "kind IN ('chat','embedding','image','moderation','rerank','speech')"
_PRICED = ("models", "price_versions")


def _unit_columns() -> list[sa.Column[object]]:
    zero = sa.text("0")
    return [
        # {"<size>/<quality>" | "<size>" | "default": nano-units per image}
        sa.Column("image_prices", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("audio_second_price", sa.BigInteger(), nullable=False, server_default=zero),
        sa.Column("character_price", sa.BigInteger(), nullable=False, server_default=zero),
        sa.Column("search_unit_price", sa.BigInteger(), nullable=False, server_default=zero),
    ]


def upgrade() -> None:
    for table in _PRICED:
        with op.batch_alter_table(table, schema=None) as b:
            for column in _unit_columns():
                b.add_column(column)
    with op.batch_alter_table("models", schema=None) as b:
        b.drop_constraint(op.f("ck_models_kind"), type_="check")
        b.create_check_constraint("kind", _NEW_KINDS)


def downgrade() -> None:
    # Deployments of the new kinds cannot be served by the old engine: they go.
    op.execute("DELETE FROM price_versions WHERE model_id IN "
               "(SELECT id FROM models WHERE kind NOT IN ('chat','embedding'))")
    op.execute("DELETE FROM models WHERE kind NOT IN ('chat','embedding')")
    with op.batch_alter_table("models", schema=None) as b:
        b.drop_constraint(op.f("ck_models_kind"), type_="check")
        b.create_check_constraint("kind", _OLD_KINDS)
    for table in _PRICED:
        with op.batch_alter_table(table, schema=None) as b:
            for column in _unit_columns():
                b.drop_column(column.name)
