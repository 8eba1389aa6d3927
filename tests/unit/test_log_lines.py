"""A worker's structlog lines reach stderr whole: one write per line.

Lines from structlog and from the stdlib handler (faust, aiokafka) share the stream under
different locks; a line written in two parts (``print``: the text, then its newline) let
another thread's line land between them, gluing two JSON objects into one line (seen in
``tests/e2e/test_logging.py``: a sink's ``sink_batch_written`` and faust's signal line).
"""

from __future__ import annotations

import json
import subprocess
import sys

RECORD = r"""
import json, sys

class Recorder:
    def __init__(self):
        self.writes = []
    def write(self, text):
        self.writes.append(text)
        return len(text)
    def flush(self):
        pass
    def isatty(self):
        return False

recorder = Recorder()
sys.stderr = recorder
import structlog
from aipipe.infra.logging import configure_logging
from aipipe.infra.settings import load_settings
configure_logging(load_settings())
structlog.get_logger("aipipe.test").warning("one_line", n=1)
sys.__stdout__.write(json.dumps(recorder.writes))
"""


def test_a_structlog_line_is_one_write_of_the_whole_line() -> None:
    done = subprocess.run([sys.executable, "-c", RECORD], capture_output=True, text=True,
                          check=True, timeout=120, env={"AIPIPE_ENV": "production"})
    writes = json.loads(done.stdout)
    assert len(writes) == 1, writes
    assert writes[0].endswith("\n") and writes[0].count("\n") == 1
    assert json.loads(writes[0])["event"] == "one_line"
