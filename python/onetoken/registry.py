"""Every domain's tables, registered on one metadata: Alembic's environment, the
composition root and the tests import this module (a table missing here is missing from
the schema comparison)."""

from __future__ import annotations

from sqlalchemy import MetaData

from onetoken.billing import models as billing_models
from onetoken.db import base
from onetoken.incidents import models as incidents_models
from onetoken.ingest import models as ingest_models
from onetoken.keys import models as keys_models
from onetoken.mail import models as mail_models
from onetoken.orgs import models as orgs_models
from onetoken.providers import models as providers_models
from onetoken.rights import models as rights_models
from onetoken.security import models as security_models
from onetoken.siem import models as siem_models
from onetoken.tickets import models as tickets_models
from onetoken.webhooks import models as webhooks_models

MODEL_MODULES = (
    base,
    orgs_models,
    keys_models,
    providers_models,
    billing_models,
    security_models,
    ingest_models,
    rights_models,
    webhooks_models,
    tickets_models,
    incidents_models,
    mail_models,
    siem_models,
)
METADATA: MetaData = base.Base.metadata
