"""Output helpers: debug lines only inside ``debugging(True)``, step outcomes as recorded."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from appliance.log import Logger, debugging


def _logger() -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    return Logger(console=Console(file=out, width=200, highlight=False)), out


def test_debug_lines_only_inside_debugging() -> None:
    logger, out = _logger()
    logger.debug("before")
    with debugging(True):
        logger.debug("inside")
        with debugging(False):
            logger.debug("nested off")
        logger.debug("inside again")
    logger.debug("after")
    assert out.getvalue().split() == ["inside", "inside", "again"]


def test_debugging_is_reset_when_the_block_raises() -> None:
    logger, out = _logger()
    with pytest.raises(RuntimeError), debugging(True):
        raise RuntimeError
    logger.debug("after")
    assert out.getvalue() == ""


def test_debugging_is_per_context_not_global() -> None:
    # Another thread (another task in the same process) does not inherit this block's debug.
    logger, out = _logger()
    with debugging(True):
        worker = threading.Thread(target=logger.debug, args=("from another thread",))
        worker.start()
        worker.join()
    assert out.getvalue() == ""
