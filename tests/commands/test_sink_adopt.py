"""`sink adopt` vouches for a file the state store has no position for. Over a recorded
position it would vouch for a kill -9's uncommitted tail (whose events come again from the
checkpoint: written twice) or move the committed length back (the next start cuts committed
lines): refused. And the file is measured under the lease, after any daemon's last commit."""

from __future__ import annotations

from pathlib import Path

import pytest
from operator_support import cli, write_config

import consumer.commands.sink as sink_command
from consumer.config import Settings, load_settings
from consumer.state import open_store

pytestmark = pytest.mark.usefixtures("hermetic_config", "contained_logging")


def configured(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "events.jsonl"
    return out, write_config(
        tmp_path, "http://127.0.0.1:9", sink={"type": "jsonl", "path": str(out)}
    )


async def committed(settings: Settings, value: str | None = None) -> str | None:
    store = await open_store(settings.state)
    try:
        if value is not None:
            await store.set_sink_state("jsonl", value)
        return await store.sink_state("jsonl")
    finally:
        await store.close()


@pytest.mark.parametrize("execute", [False, True], ids=["plan", "execute"])
async def test_adopt_over_a_recorded_position_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], execute: bool
) -> None:
    out, config = configured(tmp_path)
    settings = load_settings(config)
    out.write_bytes(b'{"e":1}\n' * 10 + b'{"e":"uncommitted"}\n')  # a kill -9's tail
    await committed(settings, "80")
    flags = ["--execute"] if execute else []
    code, _, err = await cli(capsys, "sink", "adopt", *flags, "--config", str(config))
    assert code == 1, err
    assert "already records the jsonl sink's committed position (80)" in err
    assert await committed(settings) == "80"


async def test_the_file_is_measured_under_the_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's last lines land between the plan and the lease: the length recorded is
    the file's once the lease is held (measured before it, those lines would be cut)."""
    out, config = configured(tmp_path)
    out.write_bytes(b'{"e":1}\n' * 10)
    real = sink_command.acquire

    async def lines_land_first(*args: object, **kwargs: object) -> object:
        with out.open("ab") as f:
            f.write(b'{"e":2}\n' * 5)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sink_command, "acquire", lines_land_first)
    code, said, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert "80 bytes to record" in said
    assert await committed(load_settings(config)) == "120"
    assert "at byte 120" in err


async def test_adopt_over_a_position_of_another_file_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rotation switched off while the committed position is in a rotated file: the start
    refuses it and names adopt, which records the configured file."""
    out, config = configured(tmp_path)
    settings = load_settings(config)
    out.write_bytes(b'{"e":1}\n' * 2)
    rotated = '{"file":"events-20261201T000000Z.jsonl","seq":2,"length":40,"started":0}'
    await committed(settings, rotated)
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert await committed(settings) == "16"


async def test_adopt_over_a_recorded_file_of_the_series_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With rotation: the store records file 1 at 80 bytes; a kill -9 left a tail in it and a
    file 2. The start cuts file 1 and deletes file 2; adopt (of the newest, file 2) would have
    vouched for both, written again by the replay."""
    out = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "jsonl", "path": str(out), "rotate_bytes": 1000},
    )
    settings = load_settings(config)
    one = tmp_path / "events-20250101T000000Z.000001.jsonl"
    one.write_bytes(b'{"e":1}\n' * 10 + b'{"e":"tail"}\n')
    (tmp_path / "events-20250101T000100Z.000002.jsonl").write_bytes(b'{"e":"late"}\n' * 3)
    recorded = f'{{"file":"{one.name}","seq":1,"length":80,"started":1735689600}}'
    await committed(settings, recorded)
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 1, err
    assert "already records the jsonl sink's committed position" in err
    assert await committed(settings) == recorded
