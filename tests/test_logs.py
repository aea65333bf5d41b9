from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from streamd import logs


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_when_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(json_lines=True)
    logging.getLogger("streamd.test").warning("gateway %s is %s", "g1", "draining")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("streamd.test").exception("it failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert first["level"] == "warning" and first["logger"] == "streamd.test"
    assert first["msg"] == "gateway g1 is draining" and isinstance(first["ts"], float)
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_human_lines_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(json_lines=False)
    logging.getLogger("streamd.test").warning("plain")
    err = capsys.readouterr().err
    assert "WARNING streamd.test: plain" in err
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(err)
