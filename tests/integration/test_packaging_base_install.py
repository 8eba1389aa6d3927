"""The wheel with its base dependencies only, as an emitting service installs it.

One fresh virtualenv per module: the wheel built from this tree, installed with the base
dependencies pinned and hash-checked by infra/requirements.lock. A script in a directory
that has its own ``schemas.py``, ``producers.py`` and ``infra/`` emits an
``operation.requested`` event to the local Kafka, read back here; the workers' libraries
are not there, and a worker command names the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aipipe.cli import EXTRAS
from aipipe.infra.settings import Settings
from aipipe.infra.topics import ensure_topics
from aipipe.schemas import OperationRequested, decode
from aipipe.schemas.deadletter import read_headers
from tests.support.pipeline import consume

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "infra" / "requirements.lock"
UV = Path(sys.executable).with_name("uv")
#: what the base install must not bring (the workers', the embedded engine's, the report's)
LEFT_OUT = ("faust", "mode", "redis", "chdb", "clickhouse_connect", "matplotlib", "pandas",
            "numpy", "google.genai", "openai", "sentry_sdk", "rich")


@dataclass(frozen=True)
class BaseVenv:
    python: Path
    site_packages: Path


def run(*args: str | Path, cwd: Path | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this test process's own Python paths."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseVenv]:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"  # a copy, so the build leaves nothing in the shared tree
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("schemas", "producers", "streams", "consumers", "infra"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    run(UV, "build", "--wheel", "--quiet", "--out-dir", work / "dist", source)
    (wheel,) = (work / "dist").glob("aipipe-*.whl")
    venv = work / "venv"
    run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    run(UV, "pip", "install", "--quiet", "--python", python, "-c", LOCK, wheel)
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    yield BaseVenv(python, Path(site.stdout.strip()))


def test_packaging_base_wheel_emits_an_event_beside_a_users_own_modules(
    base_venv: BaseVenv, settings: Settings, tmp_path: Path
) -> None:
    topic = settings.topics.requested
    ensure_topics(settings.kafka_bootstrap, [topic], partitions=1)
    expected = OperationRequested(
        event_id="pkg-event-1", occurred_at=datetime(2026, 12, 1, 6, 30, tzinfo=UTC),
        request_id="pkg-request-1", client_id="pkg-client", user_id="pkg-user",
        operation_type="image_generation", provider="simulated",
        model="gemini-2.5-flash-image", params={"prompt": "a lighthouse", "n": 1},
    )
    service = tmp_path / "service"
    (service / "infra").mkdir(parents=True)
    (service / "schemas.py").write_text("OWNER = 'the service'\n")
    (service / "producers.py").write_text("OWNER = 'the service'\n")
    (service / "infra" / "__init__.py").write_text("OWNER = 'the service'\n")
    (service / "emit.py").write_text(textwrap.dedent("""
        import json
        import sys

        import infra
        import producers
        import schemas
        from aipipe.producers import EventProducer
        from aipipe.schemas import OperationRequested

        assert schemas.OWNER == producers.OWNER == infra.OWNER == "the service"
        bootstrap, topic, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        with EventProducer(bootstrap) as producer:
            producer.send(topic, OperationRequested(**fields))
        print(producer.delivered)
    """))
    fields = expected.model_dump(mode="json")
    done = run(base_venv.python, "emit.py", settings.kafka_bootstrap, topic, json.dumps(fields),
               cwd=service, env=clean_env())
    assert done.stdout == "1\n"

    (message,) = consume(settings, topic, expected=1, timeout=30)
    assert decode(message.value()) == expected
    assert message.key() == b"pkg-client"
    headers = read_headers(message.headers())
    assert headers == {"request_id": "pkg-request-1", "event_type": "operation.requested"}


def test_packaging_base_install_leaves_the_workers_libraries_out(base_venv: BaseVenv) -> None:
    probe = run(base_venv.python, "-c", textwrap.dedent(f"""
        import importlib.util
        for name in {LEFT_OUT!r}:
            try:
                found = importlib.util.find_spec(name) is not None
            except ModuleNotFoundError:  # a parent package (google) is not there either
                found = False
            print(name, found)
    """), cwd=base_venv.site_packages.parent, env=clean_env())
    assert probe.stdout.split("\n")[:-1] == [f"{name} False" for name in LEFT_OUT]
    installed = {p.name.split("-")[0].lower() for p in base_venv.site_packages.glob("*.dist-info")}
    assert installed == {
        "aipipe", "annotated_types", "click", "confluent_kafka", "orjson", "pydantic",
        "pydantic_core", "pydantic_settings", "python_dotenv", "structlog",
        "typing_extensions", "typing_inspection",
    }


def test_packaging_a_worker_command_in_the_base_install_names_its_extra(
    base_venv: BaseVenv, tmp_path: Path
) -> None:
    env = clean_env(AIPIPE_HOME=str(tmp_path / "home"))
    helped = run(base_venv.python, "-m", "aipipe", "--help", cwd=tmp_path, env=env)
    assert "run" in helped.stdout.split() and helped.stderr == ""

    ran = run(base_venv.python, "-m", "aipipe", "run", "streams", cwd=tmp_path, env=env,
              check=False)
    match = re.fullmatch(
        r"aipipe: this command needs (\w+), which the base install of aipipe leaves out; "
        r"install it with: pip install 'aipipe\[workers\]'\n", ran.stderr)
    assert match is not None, ran.stderr
    assert EXTRAS[match[1]] == "workers"
    assert (ran.returncode, ran.stdout) == (2, "")
