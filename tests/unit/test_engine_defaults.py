"""The engine's defaults are declared once, in the engine (rust/gateway/src/config.rs):
the config the control plane sends with no ONETOKEN_* engine knob set is exactly them."""

from __future__ import annotations

import json
from pathlib import Path

from onetoken import _core
from onetoken.gateway.supervisor import engine_config
from onetoken.kit.crypto import Secrets
from onetoken.providers.gateway_schemas import Routing
from onetoken.settings import Settings

# Where the process runs and what it signs with are the deployment's, not defaults.
DEPLOYMENT = {"key_hash_secret_hex", "spool_dir"}
# Sent only when a key-hash secret rotation makes them differ from the defaults.
ROTATION = {"key_hash_secret_version", "previous_key_hash_secrets"}


def test_unset_settings_send_the_engine_defaults(tmp_path: Path) -> None:
    defaults = json.loads(_core.engine_config_defaults())
    sent = engine_config(Settings(data_dir=tmp_path), Secrets.from_master(b"m" * 32))
    assert set(sent) - DEPLOYMENT == set(defaults) - ROTATION - DEPLOYMENT
    for field in set(sent) - DEPLOYMENT:
        assert sent[field] == defaults[field], field


def test_the_engine_routes_by_the_control_planes_routing_defaults() -> None:
    # The snapshot leaves `routing` out while the platform's settings equal Routing()'s
    # defaults, and the engine then applies its own: the two must be the same values.
    engine = json.loads(_core.routing_defaults())
    assert engine == Routing().model_dump()
    assert set(engine) == set(Routing.model_fields)
