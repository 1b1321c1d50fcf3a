"""Presets for common vendors: public base URL, protocol and data-processing attributes,
listed in presets.toml beside this module.

The attributes are conservative defaults taken from each vendor's public API terms at
the time of writing (content kept for abuse monitoring counts as retained; a vendor whose
terms allow using API inputs to improve its services counts as training on data). They
are what org policies select on, so operators should check them against their own
agreement (enterprise contracts often grant zero retention) and override any field.
None of these endpoints is called by the tests.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    vendor: str
    protocol: str
    # None: the URL names the customer's own resource (Azure); it must be given.
    base_url: str | None
    region: str
    retains_content: bool
    trains_on_data: bool
    zero_retention: bool = False
    api_version: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The environment variable operators usually keep this vendor's key in.
    credential_env: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tags"] = list(self.tags)
        return out


def _load() -> dict[str, Preset]:
    rows = tomllib.loads(files("onetoken.providers").joinpath("presets.toml").read_text())
    return {
        name: Preset(
            name=name,
            base_url=row.pop("base_url", None),
            tags=tuple(row.pop("tags", ())),
            **row,
        )
        for name, row in rows.items()
    }


PRESETS: dict[str, Preset] = _load()

# Fields a preset fills in when the provider does not give them.
PRESET_FIELDS = (
    "vendor",
    "protocol",
    "base_url",
    "region",
    "retains_content",
    "trains_on_data",
    "zero_retention",
    "api_version",
    "tags",
)


def apply_preset(preset_name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """`given` with every field it lacks (absent or None) filled from the preset."""
    if preset_name is None:
        return dict(given)
    preset = PRESETS[preset_name].as_dict()
    out = dict(given)
    for name in PRESET_FIELDS:
        if out.get(name) is None and preset[name] is not None:
            out[name] = preset[name]
    return out
