"""The retriever's event loop choice (retriever/service/event_loop.py): uvloop when installed unless
SPECDRAFT_EVENT_LOOP says asyncio; a real CLI server reports the loop it runs on."""

from __future__ import annotations

import asyncio
import importlib.util
import signal

import pytest

from retriever.service.event_loop import loop_kind, new_event_loop
from retriever.service.settings import RetrieverSettings
from tests.retriever.service.helpers import cli_server

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_settings_resolve_to_a_loop():
    assert loop_kind("asyncio") == "asyncio"
    assert loop_kind("auto") == ("uvloop" if HAVE_UVLOOP else "asyncio")
    loop = new_event_loop("asyncio")
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    with pytest.raises(ValueError, match="SPECDRAFT_EVENT_LOOP must be one of auto, uvloop, asyncio, got 'fast'"):
        RetrieverSettings(event_loop="fast")
    with pytest.raises(ValueError, match="event_loop must be one of auto, uvloop, asyncio, got 'fast'"):
        loop_kind("fast")


def test_uvloop_required_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a machine without uvloop
    assert loop_kind("auto") == "asyncio"
    with pytest.raises(ValueError, match="must name an installed loop, got 'uvloop'"):
        loop_kind("uvloop")


@pytest.mark.parametrize("setting", ["asyncio", "auto"])
def test_the_cli_server_runs_on_the_chosen_loop(setting):
    want = loop_kind(setting)
    with cli_server("--port", "0", SPECDRAFT_HOST="127.0.0.1", SPECDRAFT_EVENT_LOOP=setting) as proc:
        assert proc.stdout.readline().startswith("retriever listening on 127.0.0.1:")  # SIGTERM handled from now
        for _ in range(50):
            line = proc.stderr.readline()
            if "event loop" in line:
                break
        assert f"{want} event loop" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_loop_the_server_cannot_use_stops_the_cli_with_code_2(monkeypatch, capsys):
    from specdraft.cli import main

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a machine without uvloop
    monkeypatch.setenv("SPECDRAFT_EVENT_LOOP", "uvloop")
    assert main(["retriever", "serve", "--port", "0"]) == 2
    assert "must name an installed loop, got 'uvloop'" in capsys.readouterr().err


def test_the_default_loop_runs_coroutines():
    loop = new_event_loop("auto")
    try:
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()
