import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from aipipe.cli import cli
from aipipe.schemas import EVENT_TYPES


def test_schemas_export_writes_one_schema_per_event(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["schemas", "export", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{t}.schema.json" for t in EVENT_TYPES)
    schema = json.loads((tmp_path / "operation.requested.schema.json").read_text())
    assert "client_id" in schema["required"]


def test_a_bad_setting_stops_the_cli_with_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aipipe", "status"],
        env={"AIPIPE_KAFKA_BOOTSTRAP": "no-port", "AIPIPE_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "aipipe: AIPIPE_KAFKA_BOOTSTRAP is invalid (Value error, must be host:port[,host:port...]"
        ", e.g. 127.0.0.1:9092); set it to a valid value or unset it to use the default."
    ]


def test_a_bad_amount_names_the_option() -> None:
    result = CliRunner().invoke(cli, ["budget", "check", "--client", "c", "--limit", "lots"])
    assert result.exit_code == 2
    assert "--limit" in result.output and "is not an amount in USD" in result.output
