"""config.example.toml lists every key of every settings model, as its header and every
unknown-key error promise: a key added to a model without a line in the example fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from consumer.config import load_settings
from consumer.config.settings import SINK_TYPES, Settings
from consumer.runtime.assembly import check_sink

EXAMPLE = Path(__file__).parents[2] / "config.example.toml"
STREAM = "main"  # the name the example gives its one stream: [streams.main...]

# `[a.b]` or `# [a.b]`, alone on its line but for a trailing comment.
HEADER = re.compile(r"\s*#?\s*\[([\w.-]+)\]\s*(#.*)?")
# `key = ...`, `# key = ...` or `# # key = ...` (an alternative that stays commented when its
# block is uncommented: a webhook's token beside auth = "none").
KEY = re.compile(r"\s*(?:#\s*)*([\w-]+)\s*=")
# `type = "nats"` or `# type = "nats"`: which sink a [sink] block is.
SINK_TYPE = re.compile(r'\s*#?\s*type\s*=\s*"(\w+)"')


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings models an annotation holds, through Optional, unions, Annotated, dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in(arg)]


def sink_type(model: type[BaseModel]) -> str:
    (tag,) = get_args(model.model_fields["type"].annotation)  # Literal["nats"]
    return str(tag)


def model_keys(model: type[BaseModel], table: str = "") -> set[str]:
    """Every key path of ``model`` and the models nested in it, as the file spells them:
    ``streams.main.auth.client_id``; one of a union's models (the sink) under
    ``sink[<type>]``, since each type has its own (commented) [sink] block."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{table}.{field.alias or name}".lstrip(".")
        keys.add(key)
        models = models_in(field.annotation)
        if get_origin(field.annotation) is dict and models:
            key = f"{key}.{STREAM}"  # a table per name: [streams.<name>]
        for nested in models:
            keys |= model_keys(nested, f"{key}[{sink_type(nested)}]" if len(models) > 1 else key)
    return keys


def mentioned_keys(text: str) -> set[str]:
    """Every table and key the file names, commented out or not, with its table's path; in
    a [sink] block, from its `type = "..."` line on, under ``sink[<type>]``."""
    found: set[str] = set()
    table = ""
    for line in text.splitlines():
        if header := HEADER.fullmatch(line):
            table = header[1]
            parts = table.split(".")
            found |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        elif key := KEY.match(line):
            if table == "sink" and (sink := SINK_TYPE.match(line)):
                table = f"sink[{sink[1]}]"
            found.add(f"{table}.{key[1]}".lstrip("."))
    return found


def test_every_settings_key_is_in_the_example() -> None:
    expected = model_keys(Settings)
    missing = sorted(expected - mentioned_keys(EXAMPLE.read_text()))
    assert not missing, "config.example.toml does not mention:\n" + "\n".join(missing)


def test_the_walks_see_every_table_and_sink_type() -> None:
    """The two walks could agree by both seeing too little: pin what they must see."""
    expected = model_keys(Settings)
    for key in (
        "streams.main.auth.grant",
        "streams.main.connection.proxy",
        "state.schema",  # the alias, as the file spells it, not the field's name schema_
        "orchestration.resources",
        "filter.hotel_ids",
        "sink[nats].servers",
        "sink[redis].stream_key",
    ):
        assert key in expected
    assert {key.split(".")[0] for key in expected if key.startswith("sink[")} == {
        f"sink[{t}]" for t in SINK_TYPES
    }
    assert mentioned_keys('# [sink]  # a bus\n# type = "nats"\n# servers = []\n') == {
        "sink",
        "sink[nats].type",
        "sink[nats].servers",
    }


@pytest.mark.usefixtures("hermetic_config")
def test_the_uncommented_example_loads() -> None:
    """As shipped it needs no environment: its secrets are placeholders in the file."""
    settings = load_settings(EXAMPLE)
    assert list(settings.streams) == [STREAM]
    assert settings.sink.type == "jsonl" and settings.state.backend == "sqlite"


@pytest.mark.usefixtures("hermetic_config")
def test_the_examples_paths_are_in_the_deployments_state_directory() -> None:
    """Relative paths resolve against the config file's directory: copied to
    /etc/opera-consumer (systemd, Docker), the example's "opera-consumer.db" and
    "events.jsonl" were files there, which the daemon cannot write: the start exited 78. They
    are in the state directory both deployments give the daemon."""
    settings = load_settings(EXAMPLE)
    state_dir = Path("/var/lib/opera-consumer")
    assert settings.state.path.parent == state_dir
    assert settings.sink.type == "jsonl" and settings.sink.path.parent == state_dir
    root = EXAMPLE.parent
    unit = (root / "deploy" / "systemd" / "opera-consumer.service").read_text()
    assert "\nStateDirectory=opera-consumer\n" in unit  # /var/lib/opera-consumer
    compose = (root / "deploy" / "docker" / "compose.yaml").read_text()
    assert f"source: opera-state\n        target: {state_dir}\n" in compose


SINK_HEADER = re.compile(r"^#?\s*\[sink\]")


def example_with_sink(kind: str) -> str:
    """config.example.toml with its [sink] block of ``kind`` uncommented as shown (``# key``
    lines become keys, ``# # key`` lines stay comments) and its jsonl [sink] commented out: what
    a user picking that alternative writes."""
    lines = EXAMPLE.read_text().splitlines()
    blocks: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if SINK_HEADER.match(lines[i]):
            j = i + 1
            while j < len(lines) and lines[j].strip() and not SINK_HEADER.match(lines[j]):
                j += 1
            blocks.append((i, j))
            i = j
        else:
            i += 1
    (chosen,) = [
        (start, end)
        for start, end in blocks
        if any(re.match(rf'^#?\s*type\s*=\s*"{kind}"', ln) for ln in lines[start:end])
    ]
    out: list[str] = []
    for n, line in enumerate(lines):
        inside = next(((s, e) for s, e in blocks if s <= n < e), None)
        if inside is None:
            out.append(line)
        elif inside == chosen:
            m = re.match(r"^# ?((?:\[sink\]|[A-Za-z_]\w*\s*=).*)$", line)
            out.append(m.group(1) if m else line)
        else:
            out.append(line if line.startswith("#") else "# " + line)
    return "\n".join(out) + "\n"


@pytest.mark.usefixtures("hermetic_config")
@pytest.mark.parametrize("kind", ["webhook", "sqlite", "postgres", "nats", "redis"])
def test_each_sink_block_uncommented_as_shown_passes_check_config(
    tmp_path: Path, kind: str
) -> None:
    """The example's commented [sink] blocks are the alternatives to pick: each, uncommented
    as shown, loads and passes what check-config runs. The redis block paired a redis:// url
    with tls_ca_file (refused: rediss:// only), and the webhook block sent none of the token,
    username and password it listed beside auth = "none" (now refused: sent by no request)."""
    config = tmp_path / "config.toml"
    config.write_text(example_with_sink(kind))
    settings = load_settings(config)
    assert settings.sink.type == kind
    check_sink(settings)  # what `check-config` and `run` check before connecting
