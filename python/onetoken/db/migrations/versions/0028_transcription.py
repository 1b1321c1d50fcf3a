"""Speech to text: models.kind grows `transcription`, the deployments that serve
/v1/audio/transcriptions and /v1/audio/translations (priced per second of audio in, the
unit price 0025 added)."""

from alembic import op

revision: str = "0028_transcription"
down_revision: str | None = "0027_siem"

_OLD_KINDS = "kind IN ('chat','embedding','image','moderation','rerank','speech')"
_NEW_KINDS = (
    "kind IN ('chat','embedding','image','moderation','rerank','speech','transcription')"
)


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as b:
        b.drop_constraint(op.f("ck_models_kind"), type_="check")
        b.create_check_constraint("kind", _NEW_KINDS)


def downgrade() -> None:
    # The previous engine cannot serve them: the deployments and their prices go.
    op.execute("DELETE FROM price_versions WHERE model_id IN "
               "(SELECT id FROM models WHERE kind = 'transcription')")
    op.execute("DELETE FROM models WHERE kind = 'transcription'")
    with op.batch_alter_table("models", schema=None) as b:
        b.drop_constraint(op.f("ck_models_kind"), type_="check")
        b.create_check_constraint("kind", _OLD_KINDS)
