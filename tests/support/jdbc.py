"""The ClickHouse JDBC driver (Maven Central, ``tests/support/jdbc/pom.xml``) and a small
Java program that drives it, built once into the cache dir."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent / "jdbc"


def driver_version() -> str:
    found = re.search(r"<clickhouse\.jdbc\.version>([^<]+)<", (HERE / "pom.xml").read_text())
    assert found is not None
    return found.group(1)


def missing_tools() -> str | None:
    absent = [tool for tool in ("mvn", "javac", "java") if shutil.which(tool) is None]
    return f"{', '.join(absent)} not on PATH" if absent else None


def build_probe(cache_dir: Path) -> str:
    """The classpath of the driver and the compiled ``Probe`` (resolved and built once)."""
    root = cache_dir / f"jdbc-{driver_version()}"
    lib, classes = root / "lib", root / "classes"
    if not (root / "complete").exists():
        subprocess.run(["mvn", "-q", "-B", "-f", str(HERE / "pom.xml"),
                        "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
                        "-DincludeScope=runtime"], check=True, capture_output=True, timeout=900)
        (root / "complete").write_text(driver_version())
    source = HERE / "Probe.java"
    compiled = classes / "Probe.class"
    if not compiled.exists() or compiled.stat().st_mtime < source.stat().st_mtime:
        classes.mkdir(parents=True, exist_ok=True)
        subprocess.run(["javac", "-d", str(classes), str(source)], check=True,
                       capture_output=True, timeout=300)
    return f"{lib}/*:{classes}"
