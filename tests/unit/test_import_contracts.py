"""The layer contracts in pyproject.toml ([tool.importlinter], docs/architecture.md) hold
for the package, and break when a module imports across them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from importlinter import configuration
from importlinter.application import use_cases
from importlinter.application.app_config import settings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
CONTRACT_IDS = {"layers", "domains", "no-web-in-domains", "acyclic"}


class _GraphWithImport:
    """The package's real import graph plus one import that is not in the code."""

    def __init__(self, inner: Any, importer: str, imported: str) -> None:
        self.inner, self.importer, self.imported = inner, importer, imported

    def build(self, **options: Any) -> Any:
        graph = self.inner.build(**options)
        graph.add_import(importer=self.importer, imported=self.imported)
        return graph


@pytest.fixture(autouse=True)
def _linter() -> Iterator[None]:
    configuration.configure()
    use_cases._register_built_in_contract_types()
    yield
    configuration.configure()


def _report(importer: str = "", imported: str = "") -> Any:
    if importer:
        settings.configure(
            GRAPH_BUILDER=_GraphWithImport(settings.GRAPH_BUILDER, importer, imported)
        )
    options = use_cases.read_user_options(config_filename=str(PYPROJECT))
    return use_cases.create_report(options, cache_dir=None)


def _verdicts(report: Any) -> dict[str, bool]:
    return {c.contract_options["id"]: check.kept for c, check in report.get_contracts_and_checks()}


def test_the_package_keeps_every_contract() -> None:
    report = _report()
    assert not report.could_not_run
    assert _verdicts(report) == dict.fromkeys(CONTRACT_IDS, True)


@pytest.mark.parametrize(
    ("importer", "imported", "broken"),
    [
        # A service reaching for the web layer.
        (
            "onetoken.billing.service",
            "onetoken.web.deps",
            {"layers", "no-web-in-domains", "acyclic"},
        ),
        # kit depending on anything of onetoken.
        ("onetoken.kit.money", "onetoken.settings", {"layers", "acyclic"}),
        # db depending on a domain (as db/models.py did): every lower domain that uses db
        # would then reach orgs through it.
        ("onetoken.db.base", "onetoken.orgs.models", {"layers", "domains", "acyclic"}),
        # A lower domain importing a higher one: a cycle between domain packages. (Every
        # import up the layers closes a cycle, which "acyclic" sees as well.)
        ("onetoken.security.audit", "onetoken.webhooks.service", {"domains", "acyclic"}),
        # Two modules of one package importing each other.
        ("onetoken.ingest.marks", "onetoken.ingest.ingestor", {"acyclic"}),
    ],
)
def test_an_import_across_the_layers_breaks_its_contract(
    importer: str, imported: str, broken: set[str]
) -> None:
    verdicts = _verdicts(_report(importer, imported))
    assert {cid for cid, kept in verdicts.items() if not kept} == broken
