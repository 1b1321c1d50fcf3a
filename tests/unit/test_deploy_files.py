"""deploy/ validated offline: no Docker engine or cluster runs here (docs/deploy.md).

Every Kubernetes overlay is committed rendered (deploy/k8s/rendered, `make deploy-render`),
so no check needs kubectl, which a fresh CI machine may not have; where kubectl is
installed, a fresh render must equal the committed one. Each rendered object passes the
schemas of Kubernetes `K8S_VERSION` (kubernetes-validate, strict: an unknown field
fails); checkov lints the rendered manifests and the Containerfile, and scans every
deploy file for secret values; compose.yaml passes the compose-spec JSON schema
(check-jsonschema's vendored copy). The project's own rules (resources, securityContext,
probes, secrets by reference, one spool per gateway) are checked on top, and each check
is shown refusing a broken copy.

The tools come from their own venv (`make deploy-tools`, ONETOKEN_DEPLOY_VENV).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RENDERED = DEPLOY / "k8s" / "rendered"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes the manifests are written for: native sidecars (an init container
# with restartPolicy Always) are on by default from 1.29; 1.32 is a supported release.
K8S_VERSION = "1.32.0"
# checkov findings accepted on purpose (docs/deploy.md, "Validation"):
# CKV_K8S_35: secrets reach onetoken as environment variables from secretKeyRef, because
#   its settings are read from the environment; the values stay in the Secret.
# CKV_K8S_43: overlays pin a release tag; a release pipeline pins a digest with
#   kustomize's `images: [{digest: ...}]`, which a repository cannot know in advance.
CHECKOV_SKIPS = ("CKV_K8S_35", "CKV_K8S_43")
SECRET_ENV = re.compile(r"SECRET|PASSWORD|DATABASE_URL|CLICKHOUSE_DSN|REDIS_URL")


def _tool_dir() -> Path:
    venv = os.environ.get("ONETOKEN_DEPLOY_VENV")
    path = Path(venv) if venv else ROOT / ".venv-deploy"
    if not (path / "bin" / "checkov").exists():
        message = f"deploy tools not installed in {path}: run `make deploy-tools`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return (path / "bin").resolve()


@dataclass(frozen=True)
class Tools:
    bin: Path

    def run(self, tool: str, *args: str | Path, cwd: Path | None = None) -> Any:
        exe = tool if tool in ("nginx", "sh") else str(self.bin / tool)
        env = {
            **os.environ,
            # checkov offline: no guideline download, no upload, no version check.
            "BC_SKIP_MAPPING": "TRUE",
            "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
            "LOG_LEVEL": "ERROR",
        }
        return subprocess.run(
            [exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
            timeout=300, check=False,
        )


@pytest.fixture(scope="module")
def tools() -> Tools:
    return Tools(_tool_dir())


def render(overlay: str, k8s: Path = DEPLOY / "k8s") -> str:
    """A fresh render, as `make deploy-render` writes it (needs kubectl)."""
    out = subprocess.run(["sh", DEPLOY / "k8s" / "render.sh", overlay, k8s],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# --- the project's own rules --------------------------------------------------------


def manifest_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What a rendered overlay lacks that every onetoken workload must have."""
    problems = []
    for name, dep in by_kind(docs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod runAsNonRoot")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pod seccomp RuntimeDefault")
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{c['name']}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if what not in (res.get(part) or {}):
                        problems.append(f"{where}: {part}.{what}")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: drop ALL capabilities")
            for env in c.get("env", []):
                if SECRET_ENV.search(env["name"]) and "secretKeyRef" not in env.get(
                    "valueFrom", {}
                ):
                    problems.append(f"{where}: {env['name']} not from a secretKeyRef")
        for c in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if (c.get(probe) or {}).get("httpGet", {}).get("path") != "/healthz":
                    problems.append(f"{name}/{c['name']}: {probe} on /healthz")
    return problems


def test_rendered_manifests_pass_the_kubernetes_schemas(tools: Tools) -> None:
    files = [RENDERED / f"{o}.yaml" for o in OVERLAYS]
    assert sorted(RENDERED.glob("*.yaml")) == sorted(files)
    result = tools.run("kubernetes-validate", "-k", K8S_VERSION, "--strict", "--quiet", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: the committed deploy/k8s/rendered/*.yaml are checked, "
    "but not compared with a fresh render of deploy/k8s",
)
def test_rendered_manifests_are_a_fresh_render_of_the_sources(tmp_path: Path) -> None:
    """The checks read the committed renders; this keeps them from drifting from the
    kustomize sources an SRE edits."""
    for overlay in OVERLAYS:
        assert render(overlay) == (RENDERED / f"{overlay}.yaml").read_text(), (
            f"deploy/k8s/rendered/{overlay}.yaml is stale: run `make deploy-render`")
    # A source changed without regenerating is caught.
    k8s = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", k8s)
    patch = k8s / "overlays" / "prod" / "kustomization.yaml"
    patch.write_text(patch.read_text().replace("replicas: 4", "replicas: 5", 1))
    assert render("dev", k8s) == (RENDERED / "dev.yaml").read_text()
    assert render("prod", k8s) != (RENDERED / "prod.yaml").read_text()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: objects((RENDERED / f"{o}.yaml").read_text()) for o in OVERLAYS}


def test_every_overlay_has_the_workloads_and_keeps_the_rules(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, docs in rendered.items():
        assert manifest_problems(docs) == [], overlay
        deployments = by_kind(docs, "Deployment")
        assert {"control", "gateway"} <= deployments.keys(), overlay
        assert by_kind(docs, "HorizontalPodAutoscaler").keys() >= {"gateway"}
        assert by_kind(docs, "PodDisruptionBudget").keys() >= {"gateway"}
        assert by_kind(docs, "Service").keys() >= {"control", "gateway"}
        assert by_kind(docs, "NetworkPolicy")
        # Secrets are referenced, never shipped.
        assert not by_kind(docs, "Secret"), overlay
        # The ingest sidecar shares the gateway's data dir and outlives it.
        pod = deployments["gateway"]["spec"]["template"]["spec"]
        # The client-facing process never holds the master secret or a store's URL.
        assert [e["name"] for e in pod["containers"][0]["env"]] == [
            "ONETOKEN_GATEWAY_TOKEN", "ONETOKEN_REDIS_URL"]
        (ingest,) = pod["initContainers"]
        assert ingest["args"] == ["ingest"] and ingest["restartPolicy"] == "Always"
        gw_mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {m["name"]: m["mountPath"] for m in ingest["volumeMounts"]} == gw_mounts
        # The control DB is migrated before the control plane starts, by one process.
        control = deployments["control"]["spec"]
        assert control["replicas"] == 1 and control["strategy"]["type"] == "Recreate"
        assert [c["args"] for c in control["template"]["spec"]["initContainers"]] == [
            ["migrate"]
        ]


def test_prod_has_a_dedicated_pool_whose_selectors_miss_the_shared_pool(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    deps = by_kind(docs, "Deployment")
    pool = deps["gateway-pool-acme"]["spec"]
    assert pool["template"]["spec"]["containers"][0]["args"] == ["gateway", "--pool", "acme"]
    shared_labels = deps["gateway"]["spec"]["template"]["metadata"]["labels"]
    pool_labels = pool["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind(docs, kind).items():
            sel = obj["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            if name == "gateway-pool-acme":
                assert sel.items() <= pool_labels.items()
                assert not sel.items() <= shared_labels.items()
            elif name == "gateway":
                assert not sel.items() <= pool_labels.items()
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpas["gateway-pool-acme"]["spec"]["scaleTargetRef"]["name"] == "gateway-pool-acme"
    assert hpas["gateway"]["spec"]["minReplicas"] > hpas["gateway-pool-acme"]["spec"]["minReplicas"]
    assert deps["gateway"]["spec"]["replicas"] == hpas["gateway"]["spec"]["minReplicas"]


# --- checkov over real and broken copies, in one run ----------------------------------


def _break_gateway(path: Path) -> None:
    """The rendered gateway Deployment without resources or securityContext (pod and
    containers); `resources` left as a misspelt `resource`, which the strict schema
    refuses too."""
    docs = objects(path.read_text())
    pod = by_kind(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]
    pod.pop("securityContext")
    for c in pod["initContainers"] + pod["containers"]:
        c["resource"] = c.pop("resources")
        c.pop("securityContext")
    path.write_text(yaml.safe_dump_all(docs))


@pytest.fixture(scope="module")
def scan(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """checkov once over: the rendered overlays, the Containerfile, every deploy file for
    secrets; and broken copies of each (prefix `broken/`). Failed check ids per file."""
    root = tmp_path_factory.mktemp("checkov")
    good, broken = root / "good", root / "broken"
    for side in (good, broken):
        shutil.copytree(DEPLOY, side / "deploy", ignore=shutil.ignore_patterns("secrets"))
        # checkov knows a Dockerfile by its name.
        (side / "deploy" / "Containerfile").rename(side / "deploy" / "Dockerfile")
        for overlay in OVERLAYS:
            (side / "deploy" / "k8s" / "rendered" / f"{overlay}.yaml").rename(
                side / f"{overlay}.rendered.yaml")
        # Only the rendered manifests are Kubernetes input: the sources are kustomize's.
        shutil.move(side / "deploy" / "k8s", side / "k8s-sources")
    for overlay in OVERLAYS:
        _break_gateway(broken / f"{overlay}.rendered.yaml")
    dockerfile = broken / "deploy" / "Dockerfile"
    dockerfile.write_text(
        "\n".join(
            line for line in dockerfile.read_text().splitlines()
            if not line.startswith(("USER ", "HEALTHCHECK ", "  CMD "))
        )
    )
    compose = broken / "deploy" / "compose.yaml"
    compose.write_text(compose.read_text().replace(
        "  ONETOKEN_LOG_LEVEL: INFO",
        "  ONETOKEN_LOG_LEVEL: INFO\n"
        "  ONETOKEN_DATABASE_URL: postgresql://onetoken:9f2cQ4xLm7vB1sT8kR3w@postgres/onetoken\n"
        "  ONETOKEN_SECRET_KEY: Qm9uZ1Zx8rT2pL7wK4sN1cY6hJ3dF0aE5gU9iO2bV7mX",
    ))
    result = tools.run(
        "checkov", "-d", root, "--framework", "kubernetes", "dockerfile", "secrets",
        "--skip-path", "k8s-sources", "--skip-check", ",".join(CHECKOV_SKIPS),
        "--skip-download", "--quiet", "--compact", "-o", "json",
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    failed: dict[str, set[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["file_path"].lstrip("/"), set()).add(check["check_id"])
    return {"failed": failed, "root": root}


def _failed(scan: dict[str, Any], prefix: str) -> dict[str, set[str]]:
    return {f: ids for f, ids in scan["failed"].items() if f.startswith(prefix)}


def test_checkov_passes_the_manifests_containerfile_and_deploy_files(
    scan: dict[str, Any],
) -> None:
    assert _failed(scan, "good/") == {}


def test_checkov_refuses_a_gateway_without_resources_or_security_context(
    scan: dict[str, Any], tools: Tools,
) -> None:
    for overlay in OVERLAYS:
        ids = _failed(scan, f"broken/{overlay}.rendered.yaml").get(
            f"broken/{overlay}.rendered.yaml", set()
        )
        # CPU/memory requests and limits; privilege escalation, read-only root, capabilities,
        # root user, seccomp.
        assert {"CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13", "CKV_K8S_20",
                "CKV_K8S_22", "CKV_K8S_37", "CKV_K8S_23", "CKV_K8S_31"} <= ids, ids
        docs = objects((scan["root"] / f"broken/{overlay}.rendered.yaml").read_text())
        problems = manifest_problems(docs)
        assert "gateway/ingest: limits.memory" in problems
        assert "gateway/ingest: readOnlyRootFilesystem" in problems
        assert "gateway: pod seccomp RuntimeDefault" in problems
    schema = tools.run("kubernetes-validate", "-k", K8S_VERSION, "--strict", "--quiet",
                       scan["root"] / "broken" / "prod.rendered.yaml")
    assert schema.returncode != 0 and "resource" in schema.stdout + schema.stderr


def test_checkov_refuses_a_containerfile_without_user_or_healthcheck(
    scan: dict[str, Any],
) -> None:
    ids = _failed(scan, "broken/deploy/Dockerfile").get("broken/deploy/Dockerfile", set())
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3"} <= ids, ids


def test_checkov_finds_secrets_written_into_the_compose_file(scan: dict[str, Any]) -> None:
    ids = _failed(scan, "broken/deploy/compose.yaml").get("broken/deploy/compose.yaml", set())
    # A password in a URL; a random string under a secret's name.
    assert {"CKV_SECRET_4", "CKV_SECRET_6"} <= ids, ids


# --- the Containerfile ----------------------------------------------------------------


def test_containerfile_builds_the_wheel_and_runs_it_unprivileged() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert [s[1] for s in stages] == ["builder", "runtime"]
    assert "bookworm" in stages[0][0] and stages[1][0].endswith("python:3.11-slim-bookworm")
    assert re.search(r"--mount=type=cache,target=/usr/local/cargo/registry", text)
    assert re.search(r"maturin build --release --locked", text)
    assert 'onetoken[postgres] @ file://' in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", ', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\"", text, re.M)
    assert re.search(r"^EXPOSE 8080 8081 9090 9091 9092$", text, re.M)


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    """ONETOKEN_<NAME>_FILE becomes ONETOKEN_<NAME> (without the file's last newline);
    an unreadable file stops the start with exit 2 and says which variable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stands in for the installed `onetoken`: prints what it would have been given.
    fake = bin_dir / "onetoken"
    fake.write_text('#!/bin/sh\necho "args=$*"\nenv | grep "^ONETOKEN_" | sort\n')
    fake.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text("s3cret value with spaces\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ONETOKEN_SECRET_KEY_FILE": str(secret),
           "ONETOKEN_LOG_LEVEL": "INFO"}
    ok = subprocess.run(["sh", DEPLOY / "entrypoint.sh", "gateway", "--pool", "a"], env=env,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        "args=gateway --pool a",
        "ONETOKEN_LOG_LEVEL=INFO",
        "ONETOKEN_SECRET_KEY=s3cret value with spaces",
    ]
    env["ONETOKEN_DATABASE_URL_FILE"] = str(tmp_path / "missing")
    bad = subprocess.run(["sh", DEPLOY / "entrypoint.sh", "control"], env=env,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "ONETOKEN_DATABASE_URL_FILE" in bad.stderr
    assert "args=" not in bad.stdout


def _healthcheck_commands() -> dict[str, list[str]]:
    """Every healthcheck that asks a onetoken process with Python: the image's and the
    compose services'."""
    image = re.search(r'^HEALTHCHECK .*\n\s+CMD (\[.*\])$', (DEPLOY / "Containerfile").read_text(),
                      re.M)
    assert image is not None
    out = {"image": json.loads(image.group(1))}
    for name, svc in _compose()["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        if test[1:2] == ["python"]:
            out[name] = test[1:]
    return out


def test_python_healthchecks_pass_on_200_and_fail_on_503(tmp_path: Path) -> None:
    """The image has no curl: its healthchecks are Python one-liners. Run each against a
    server answering /healthz as a gateway does: 200 serving, 503 starting or draining."""
    import http.server
    import threading

    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        checks = _healthcheck_commands()
        assert {"image", "control", "gateway-1"} <= checks.keys()
        for name, argv in checks.items():
            code = argv[-1].replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
                "127.0.0.1:8081", f"127.0.0.1:{port}")
            env = {**os.environ, "HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz"}
            for answer, healthy in ((200, True), (503, False)):
                status["code"] = answer
                run = subprocess.run([sys.executable, "-c", code], env=env,
                                     capture_output=True, check=False, timeout=30)
                assert (run.returncode == 0) is healthy, (name, answer, run.stderr)
    finally:
        server.shutdown()


# --- compose --------------------------------------------------------------------------


def compose_problems(doc: dict[str, Any], nginx_conf: str) -> list[str]:
    """The compose file's own rules: onetoken containers unprivileged on a read-only root,
    one named volume per gateway shared with exactly its ingest process, every gateway
    behind nginx, start order by health."""
    problems = []
    services = doc["services"]
    onetoken = {n: s for n, s in services.items() if str(s.get("image", "")).startswith(
        "${ONETOKEN_IMAGE")}
    for name, svc in onetoken.items():
        if svc.get("read_only") is not True:
            problems.append(f"{name}: read_only")
        if svc.get("cap_drop") != ["ALL"]:
            problems.append(f"{name}: cap_drop ALL")
        if "no-new-privileges:true" not in svc.get("security_opt", []):
            problems.append(f"{name}: no-new-privileges")
        env = svc.get("environment", {})
        for key, value in env.items():
            if SECRET_ENV.search(key) and not key.endswith("_FILE") and key != (
                "ONETOKEN_REDIS_URL"
            ):
                problems.append(f"{name}: {key} written in the compose file ({value!r:.0})")
        if svc.get("command") != ["migrate"] and svc.get("command") != ["ingest"] and (
            "test" not in svc.get("healthcheck", {})
        ):
            problems.append(f"{name}: healthcheck")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if not isinstance(cond, dict) or "condition" not in cond:
                problems.append(f"{name}: depends_on {dep} without a condition")
    gateways = sorted(n for n, s in onetoken.items() if s.get("command") == ["gateway"])
    if len(gateways) < 2:
        problems.append("fewer than two gateways")
    owners: dict[str, list[str]] = {}
    for name, svc in onetoken.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source not in doc.get("volumes", {}):
                problems.append(f"{name}: {source} is not a named volume")
            owners.setdefault(source, []).append(name)
    for gw in gateways:
        (volume,) = [v.split(":", 1)[0] for v in onetoken[gw]["volumes"]]
        users = sorted(owners[volume])
        ingest = [u for u in users if onetoken[u].get("command") == ["ingest"]]
        if len(users) != 2 or len(ingest) != 1:
            problems.append(f"{gw}: volume {volume} shared by {users}")
        if "ONETOKEN_REDIS_URL" not in onetoken[gw]["environment"]:
            problems.append(f"{gw}: no ONETOKEN_REDIS_URL")
        if onetoken[gw].get("secrets") != ["onetoken_gateway_token"]:
            problems.append(f"{gw}: secrets beyond the gateway token")
    upstream = re.findall(r"^\s*server (\S+):8080\b", nginx_conf, re.M)
    if sorted(upstream) != gateways:
        problems.append(f"nginx upstream {upstream} is not the gateways {gateways}")
    return problems


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def test_compose_passes_the_compose_spec_schema_and_refuses_a_wrong_key(
    tools: Tools, tmp_path: Path,
) -> None:
    ok = tools.run("check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                   DEPLOY / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace(
        "{condition: service_healthy}", "{condition: healthy}", 1
    ).replace("  read_only: true", "  readonly: true", 1))
    bad = tools.run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken)
    assert bad.returncode == 1
    assert "readonly" in bad.stdout and "healthy" in bad.stdout


def test_compose_keeps_one_spool_per_gateway_and_every_gateway_behind_nginx() -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    doc = _compose()
    assert compose_problems(doc, nginx) == []
    # Two gateways on one volume, a gateway nginx does not know, a root-writable container
    # and a password in the file are each refused.
    doc["services"]["gateway-2"]["volumes"] = ["gateway-1:/var/lib/onetoken"]
    doc["services"]["gateway-4"] = {**doc["services"]["gateway-3"],
                                    "volumes": ["gateway-4:/var/lib/onetoken"]}
    doc["volumes"]["gateway-4"] = None
    doc["services"]["control"]["read_only"] = False
    doc["services"]["ingest-1"]["environment"] = {
        **doc["services"]["ingest-1"]["environment"], "ONETOKEN_SECRET_KEY": "x" * 40}
    problems = compose_problems(doc, nginx)
    assert "gateway-1: volume gateway-1 shared by ['gateway-1', 'gateway-2', 'ingest-1']" in (
        problems
    )
    assert any(p.startswith("nginx upstream") for p in problems)
    assert "control: read_only" in problems
    assert any(p.startswith("ingest-1: ONETOKEN_SECRET_KEY written") for p in problems)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_config_is_accepted_by_nginx(tools: Tools, tmp_path: Path) -> None:
    """`nginx -t` on the load balancer's config, the gateways' names pointed at loopback
    (nginx resolves upstream names when it reads the config)."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(re.sub(r"gateway-\d+:8080", "127.0.0.1:8080",
                           (DEPLOY / "nginx.conf").read_text()))
    out = tools.run("nginx", "-t", "-c", conf, "-e", tmp_path / "error.log")
    assert out.returncode == 0, out.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(conf.read_text().replace("least_conn;", "least_conns;"))
    assert tools.run("nginx", "-t", "-c", broken, "-e", tmp_path / "e.log").returncode != 0

