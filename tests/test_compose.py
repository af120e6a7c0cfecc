"""docker-compose.yml and docker/Dockerfile agree with the code.

Docker does not run here, so these tests read the files: each service's command must parse with
the real ``hybridgl`` parser, each environment variable must be a real setting (a typo fails),
addresses and ports must point at the services that serve them, and the image must install the
project and run ``hybridgl``. Compose's ``${VAR:-default}`` are resolved to their defaults (the
shell's environment is ignored), as ``docker compose config`` would with an empty environment;
the one required variable (``${VAR:?message}``, BASIC_AUTH_PASS) gets a test value, and a test
checks that compose refuses to interpolate without it.
"""

from __future__ import annotations

import json
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml  # PyYAML: installed with timm / huggingface_hub (runtime dependencies)

from backend.config import ServeSettings, serve_fields
from worker.cli import build_parser
from worker.hybridgl.settings import Settings, env_name, setting_fields

from .labelstudio import LABEL_STUDIO_DEFAULT_BANNED

import tomllib

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

# Services that run the hybridgl image, and the subcommand each runs.
HYBRIDGL_SERVICES = {"backend": "serve", "worker": "worker", "worker-cpu": "worker", "weights": "weights"}
WORKERS = ("worker", "worker-cpu")
# Variables a hybridgl container may set that are no setting of ours.
EXTRA_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}

SERVE_ENV = {f.metadata["env"] for f in serve_fields()}
METHOD_ENV = {env_name(f.name) for f in setting_fields()}

_VAR = re.compile(r"\$\{([^}]*)\}")
_DEFAULTED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):-(.*)$", re.DOTALL)
_REQUIRED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\?(.*)$", re.DOTALL)
REQUIRED_VARS = {"BASIC_AUTH_PASS"}  # the only variables compose refuses to start without
TEST_PASSWORD = "a-password-of-the-operators-own"


class ComposeRefuses(Exception):
    """What `docker compose` does with ``${VAR:?message}`` and VAR unset or empty."""


# --- reading the files ---------------------------------------------------------------------------
def _resolve(value, env: dict[str, str] | None = None):
    """Compose interpolation: ``${VAR:-default}`` -> env's value or the default (``env`` holds only
    what a test sets, never the shell's); ``${VAR:?message}`` -> env's value, else ComposeRefuses."""
    env = env or {}
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        inner = _DEFAULTED.match(m.group(1))
        if inner is not None:
            return env.get(inner.group(1)) or inner.group(2)
        required = _REQUIRED.match(m.group(1))
        if required is not None and required.group(1) in REQUIRED_VARS:
            if not env.get(required.group(1)):
                raise ComposeRefuses(required.group(2))
            return env[required.group(1)]
        raise AssertionError(f"${{{m.group(1)}}}: use ${{VAR:-default}} so an unset variable has a default")

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return _resolve(raw, {"BASIC_AUTH_PASS": TEST_PASSWORD})


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _ports(service: dict) -> list[tuple[str, int]]:
    """(host port, container port) of each short-syntax mapping."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) in (2, 3), f"port mapping {spec!r}: write HOST:CONTAINER"
        out.append((parts[-2], int(parts[-1].split("/")[0])))
    return out


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of each volume."""
    out = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            out[spec["target"]] = spec.get("source", "")
        else:
            source, target = str(spec).split(":")[:2]
            out[target] = source
    return out


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            instruction, _, args = full.partition(" ")
            out.append((instruction.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _instructions(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- services and commands ------------------------------------------------------------------------
def test_services_and_volumes(compose):
    assert set(compose["services"]) >= {"redis", "label-studio", *HYBRIDGL_SERVICES, "rq-dashboard"}
    assert set(compose["volumes"]) >= {"redis-data", "label-studio-data", "weights"}


@pytest.mark.parametrize("name", sorted(HYBRIDGL_SERVICES))
def test_command_parses_with_the_real_cli(services, name):
    command = services[name]["command"]
    assert isinstance(command, list), f"{name}: write command in exec form (a list)"
    args = build_parser().parse_args(command)
    assert args.command == HYBRIDGL_SERVICES[name]


def test_weights_service_fetches_once_on_demand(services):
    weights = services["weights"]
    args = build_parser().parse_args(weights["command"])
    assert args.weights_action == "fetch"
    assert "setup" in weights.get("profiles", []), "the one-shot download must not start with `up`"
    assert weights.get("restart", "no") == "no"


def test_dockerfile_default_command_parses():
    (cmd,) = _instructions("CMD")[-1:]
    args = build_parser().parse_args(_exec_form(cmd))
    assert args.command == "serve"


@pytest.mark.parametrize("name", sorted(HYBRIDGL_SERVICES))
def test_hybridgl_services_run_the_project_image(raw, services, name):
    build = services[name].get("build")
    assert build, f"{name} must build the project image"
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == DOCKERFILE
    assert services[name]["image"] == services["backend"]["image"], "one image for backend and workers"
    declared = {re.split(r"[=\s]", a, maxsplit=1)[0] for a in _instructions("ARG")}
    assert set(build.get("args", {})) <= declared, "every build arg must be an ARG of the Dockerfile"
    variant = build.get("args", {}).get("TORCH_VARIANT")
    assert variant in ("cpu", "cuda")


# --- environment: every variable is a real setting, with a valid value ------------------------------
@pytest.mark.parametrize("name", sorted(HYBRIDGL_SERVICES))
def test_environment_variables_are_real_settings(services, name):
    unknown = set(_env(services[name])) - SERVE_ENV - METHOD_ENV - EXTRA_ENV
    assert not unknown, f"{name} sets variables no code reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(HYBRIDGL_SERVICES))
def test_environment_values_are_valid(services, name):
    env = _env(services[name])
    ServeSettings.from_env(env)  # raises on a value of the wrong type
    Settings.from_env(env)       # raises on a value outside a setting's choices


@pytest.mark.parametrize("name", sorted(HYBRIDGL_SERVICES))
def test_passthrough_names_match_their_setting(raw, name):
    """``HYBRIDGL_X: ${HYBRIDGL_Y:-...}`` with Y another setting is a copy-paste slip."""
    for key, value in _env(raw["services"][name]).items():
        for var in _VAR.findall(value):
            named = _DEFAULTED.match(var) or _REQUIRED.match(var)
            passed = named.group(1) if named else var
            if passed in SERVE_ENV | METHOD_ENV:
                assert passed == key, f"{name}: {key} takes its value from {passed}"


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_every_variable_has_a_default_and_is_documented(raw):
    used = set()
    for text in _strings(raw):
        for var in _VAR.findall(text):
            m = _DEFAULTED.match(var) or _REQUIRED.match(var)
            assert m and (_DEFAULTED.match(var) or m.group(1) in REQUIRED_VARS), f"${{{var}}}: use ${{VAR:-default}}"
            used.add(m.group(1))
        assert not re.search(r"(?<!\$)\$[A-Za-z_]", text), f"{text!r}: write ${{VAR:-default}}, not $VAR"
    documented = set(re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used - documented == set(), f"undocumented in docker/.env.example: {sorted(used - documented)}"
    assert documented - used == set(), f"documented but unused by docker-compose.yml: {sorted(documented - used)}"


def test_env_example_values_are_valid():
    """The example's HYBRIDGL_* / serving values are values the code accepts."""
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    ServeSettings.from_env(values)
    Settings.from_env(values)
    cpu = {"HYBRIDGL_SAM_MODEL": values["HYBRIDGL_CPU_SAM_MODEL"], "HYBRIDGL_PRECISION": values["HYBRIDGL_CPU_PRECISION"]}
    Settings.from_env(cpu)
    assert values["TORCH_VARIANT"] in ("cpu", "cuda")


# --- addresses and ports ----------------------------------------------------------------------------
def test_backend_port_agrees_with_settings_and_command(services):
    backend = services["backend"]
    default_port = ServeSettings().port
    args = build_parser().parse_args(backend["command"])
    assert args.port == default_port
    assert args.host == "0.0.0.0", "inside a container the backend must listen on every interface"
    assert (str(default_port), default_port) in _ports(backend)
    assert str(default_port) in _instructions("EXPOSE")[-1].split()
    image_cmd = build_parser().parse_args(_exec_form(_instructions("CMD")[-1]))
    assert image_cmd.port == default_port


@pytest.mark.parametrize("name", ["backend", *WORKERS])
def test_redis_url_points_at_the_redis_service(services, name):
    url = urlparse(_env(services[name])["REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname in services and services[url.hostname]["image"].startswith("redis:")
    assert (url.port or 6379) == 6379, "the redis service listens on Redis's default port"


@pytest.mark.parametrize("name", ["backend", *WORKERS])
def test_label_studio_url_points_at_the_label_studio_service(services, name):
    url = urlparse(_env(services[name])["LABEL_STUDIO_URL"])
    assert url.hostname == "label-studio" and url.hostname in services
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:")
    container_ports = [container for _, container in _ports(services["label-studio"])]
    assert url.port in container_ports, f"Label Studio listens on {container_ports}, not {url.port}"


def test_every_hybridgl_service_shares_the_api_key(services):
    for name in ("backend", *WORKERS):
        assert "LABEL_STUDIO_API_KEY" in _env(services[name]), name


def test_label_studio_accepts_the_backend(services):
    env = _env(services["label-studio"])
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"].lower() == "true"
    # the compose network is private address space, which Label Studio blocks by default
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"].lower() == "false"
    assert "/label-studio/data" in _mounts(services["label-studio"])


def test_dashboard_watches_the_same_redis(services):
    dashboard = services["rq-dashboard"]
    assert _env(dashboard)["RQ_DASHBOARD_REDIS_URL"] == _env(services["backend"])["REDIS_URL"]
    assert 9181 in [container for _, container in _ports(dashboard)]


# --- GPU / CPU --------------------------------------------------------------------------------------
def _gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_worker_requests_a_gpu(services):
    worker = services["worker"]
    devices = _gpu_devices(worker)
    assert len(devices) == 1, "the worker must reserve an NVIDIA GPU (deploy.resources.reservations.devices)"
    (device,) = devices
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, "one GPU per worker process"
    assert Settings.from_env(_env(worker)).device != "cpu"
    assert not worker.get("profiles"), "the GPU worker starts with a plain `docker compose up`"


def test_cpu_worker_runs_without_a_gpu(services):
    worker = services["worker-cpu"]
    assert not _gpu_devices(worker) and "deploy" not in worker
    settings = Settings.from_env(_env(worker))
    assert settings.device == "cpu"
    assert settings.sam_model == "vit_t"
    assert "cpu" in worker.get("profiles", [])


def test_workers_and_weights_service_agree_on_the_weights(services):
    """`weights fetch` downloads what the GPU worker loads."""
    fetched = Settings.from_env(_env(services["weights"]))
    loaded = Settings.from_env(_env(services["worker"]))
    for name in ("sam_model", "sam_checkpoint", "clip_model", "clip_checkpoint", "weights_dir"):
        assert getattr(fetched, name) == getattr(loaded, name), name


@pytest.mark.parametrize("name", [*WORKERS, "weights"])
def test_weights_volume_is_mounted_where_the_settings_look(compose, services, name):
    service = services[name]
    weights_dir = _env(service)["HYBRIDGL_WEIGHTS_DIR"]
    assert Settings.from_env(_env(service)).weights_dir == weights_dir
    assert _mounts(service).get(weights_dir) == "weights", f"{name}: mount the weights volume at {weights_dir}"
    assert "weights" in compose["volumes"]
    env_lines = " ".join(_instructions("ENV"))
    assert re.search(rf"\bHYBRIDGL_WEIGHTS_DIR={re.escape(weights_dir)}(\s|$)", env_lines), \
        "the image's HYBRIDGL_WEIGHTS_DIR must be the path compose mounts the volume at"


# --- Redis --------------------------------------------------------------------------------------------
def test_redis_persists(services):
    redis = services["redis"]
    command = redis["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert _mounts(redis).get("/data") == "redis-data"


@pytest.mark.parametrize("name", ["backend", *WORKERS, "rq-dashboard"])
def test_redis_starts_first(services, name):
    assert "redis" in services[name].get("depends_on", {})


# --- the image ----------------------------------------------------------------------------------------
def test_dockerfile_entrypoint_is_the_console_script():
    (entrypoint,) = _instructions("ENTRYPOINT")[-1:]
    assert _exec_form(entrypoint) == ["hybridgl"]
    assert "hybridgl" in _pyproject()["project"]["scripts"]


def test_dockerfile_installs_the_project():
    runs = _instructions("RUN")
    assert any(re.search(r"\bpip install\b[^&;|]*\s\.(\s|$)", run) for run in runs), "no `pip install .`"
    copied = set()
    for args in _instructions("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        copied.update(p.rstrip("/").removeprefix("./") for p in parts[:-1])
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {pattern.rstrip("*").rstrip(".") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for path in needed:
        assert not any(fnmatch(path, pattern.rstrip("/")) for pattern in ignored), f".dockerignore drops {path}"


def test_dockerfile_runs_as_a_non_root_user():
    users = _instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_the_cache_has_a_bounded_redis_of_its_own(services):
    """The queue's Redis never evicts and holds no cache; the cache's evicts its least recently used
    values within a maxmemory above the budgets the workers keep it under."""
    queue_command = services["redis"]["command"]
    assert "--maxmemory-policy" not in queue_command and "--maxmemory" not in queue_command
    cache = services["cache-redis"]
    command = cache["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    maxmemory = command[command.index("--maxmemory") + 1]
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    limit = _DEFAULTED.match(_VAR.findall(maxmemory)[0]).group(2) if _VAR.findall(maxmemory) else maxmemory
    assert values["CACHE_REDIS_MAXMEMORY"] == limit
    mib = int(limit.lower().removesuffix("mb"))
    budgets = ServeSettings().index_cache_bytes + ServeSettings().embedding_cache_bytes
    assert mib * 2**20 > 1.15 * budgets, "leave Redis room above the budgets for its own overheads"
    for name in ("backend", *WORKERS):
        url = urlparse(_env(services[name])["HYBRIDGL_CACHE_URL"])
        assert url.hostname == "cache-redis" and "cache-redis" in services[name]["depends_on"]


# --- closed by default ------------------------------------------------------------------------------
def test_backend_port_is_published_on_loopback_only_by_default(services):
    (spec,) = services["backend"]["ports"]
    assert str(spec).split(":")[0] == "127.0.0.1", "the backend's port must not be published on every interface"


def test_compose_refuses_to_start_without_a_backend_password(raw):
    with pytest.raises(ComposeRefuses, match="BASIC_AUTH_PASS"):
        _resolve(raw)  # empty environment: what `docker compose up` without .env does
    env = _env(_resolve(raw, {"BASIC_AUTH_PASS": TEST_PASSWORD})["services"]["backend"])
    assert env["BASIC_AUTH_USER"] and env["BASIC_AUTH_PASS"] == TEST_PASSWORD  # auth is on by default


def test_backend_refuses_to_start_with_the_example_password(raw, tmp_path):
    """The backend's environment as compose builds it from docker/.env.example: the real `hybridgl
    serve` exits with a clear error before listening (no Redis is needed to get there)."""
    import subprocess
    import sys

    example = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    backend = _resolve(raw, example)["services"]["backend"]
    env = {k: v for k, v in _env(backend).items() if v}
    env.update(PATH="/usr/bin:/bin", REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run([sys.executable, "-m", "worker.cli", *backend["command"], "--port", "0"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "BASIC_AUTH_PASS" in result.stderr and "example" in result.stderr


def test_label_studio_keeps_its_ssrf_protection(services):
    """Only the compose network's range (172.16.0.0/12, Docker's) is lifted from Label Studio's
    banned subnets; its SSRF protection stays on."""
    env = _env(services["label-studio"])
    assert env.get("LABEL_STUDIO_SSRF_PROTECTION_ENABLED", "true").lower() == "true"
    assert env["LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS"].lower() == "false"
    banned = env["LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS"].split(",")
    assert banned == [s for s in LABEL_STUDIO_DEFAULT_BANNED if s != "172.16.0.0/12"]  # as tests/labelstudio.py
    source = next(Path(ROOT, ".cache", "ls-venv", "lib").glob("python3*/site-packages/label_studio/core/utils/io.py"),
                  None)
    if source is not None:  # the installed Label Studio's own list, when the test virtualenv is there
        assert tuple(re.findall(r"'([0-9a-f:./]+/\d+)',\s+#", source.read_text())) == LABEL_STUDIO_DEFAULT_BANNED
