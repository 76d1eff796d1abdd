"""A bad configuration, whatever it is, names the key (or the file, or the variable) and the fix
and exits 78 before anything connects: never a traceback, never exit 1. Each case is run as an
operator runs it: ``python -m consumer check-config`` (and ``run``) as a process.

Covers numbers that are not finite, bytes that are not UTF-8 (in a variable, a secret file, the
config file), files the daemon cannot read, TOML nested too deeply, a python sink's module that
fails to import, a ``--config`` name too long, jsonl paths that name no file, and values from
the environment or a secret file that pydantic-settings cannot parse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from config_files import run_refused, write
from support import cli

from consumer.errors import ExitCode
from consumer.sinks.python import PythonSink

SECRET = "client-secret-R3fused-0001"

pytestmark = pytest.mark.usefixtures("hermetic_config")


def base(url: str = "https://gw.example.com") -> str:
    return f"""
[streams.main]
gateway_url = "{url}"
chain_code = "CHAIN1"
app_key = "app-key-R3fused-0002"

[streams.main.auth]
client_id = "cid"
client_secret = "{SECRET}"
"""


def refused(*args: str, env: dict[str, str] | None = None, says: tuple[str, ...] = ()) -> str:
    """Runs ``python -m consumer ARGS``: exit 78, no traceback, stdout empty, stderr naming
    each of ``says``; returns stderr."""
    result = cli(*args, env=None if env is None else {**os.environ, **env})
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    for text in says:
        assert text in result.stderr, (text, result.stderr)
    return result.stderr


# --- numbers that are not finite ----------------------------------------------------------------

INFINITE = {
    "streams.main.auth.timeout_s": "[streams.main.auth]",
    "streams.main.connection.open_timeout_s": "[streams.main.connection]",
    "http.timeout_s": "[http]",
    "state.prune_interval_s": "[state]",
    "pipeline.drain_timeout_s": "[pipeline]",
}


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_number_that_is_not_finite_is_refused_naming_each_key(tmp_path: Path, value: str) -> None:
    """TOML's inf and nan are floats: ``timeout_s = inf`` passed check-config, and run then
    looped on aiohttp's OverflowError."""
    text = base()
    for key, table in INFINITE.items():
        if table not in text:
            text += f"\n{table}\n"
        text = text.replace(f"{table}\n", f"{table}\n{key.rpartition('.')[2]} = {value}\n", 1)
    config = write(tmp_path, text)
    refused("check-config", "--config", str(config), says=(*INFINITE, "inf and nan are not"))


def test_an_infinite_number_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    config = write(tmp_path, base())
    env = {"OPERA_CONSUMER_HTTP__TIMEOUT_S": "inf"}
    refused(
        "check-config",
        "--config",
        str(config),
        env=env,
        says=("http.timeout_s (from the environment variable OPERA_CONSUMER_HTTP__TIMEOUT_S)",),
    )


async def test_run_with_an_infinite_timeout_exits_78_before_connecting(tmp_path: Path) -> None:
    def config(url: str) -> Path:
        return write(tmp_path, base(url) + "timeout_s = inf\n[metrics]\nenabled = false\n")

    assert "streams.main.auth.timeout_s" in await run_refused(config)


# --- bytes that are not UTF-8 -------------------------------------------------------------------

NOT_UTF8 = "sec\udcffret"  # how Python reads the byte 0xff in an environment variable


def test_a_secret_variable_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """Passed check-config; run crashed in the log redactor (UnicodeEncodeError)."""
    config = write(tmp_path, base())
    variable = "OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET"
    err = refused(
        "check-config",
        "--config",
        str(config),
        env={variable: NOT_UTF8},
        says=(
            f"streams.main.auth.client_secret (from the environment variable {variable})",
            "not UTF-8",
        ),
    )
    assert "\\udcff" not in err and "\\xff" not in err  # no piece of the value


async def test_run_with_a_variable_that_is_not_utf8_exits_78_before_connecting(
    tmp_path: Path,
) -> None:
    def config(url: str) -> Path:
        return write(tmp_path, base(url) + "[metrics]\nenabled = false\n")

    variable = "OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET"
    assert variable in await run_refused(config, env={variable: NOT_UTF8})


def test_a_secret_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """It blamed the config file, without a word of the secret file."""
    config = write(tmp_path, base().replace(f'client_secret = "{SECRET}"', ""))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "streams__main__auth__client_secret").write_bytes(b"sec\xffret")
    refused(
        "check-config",
        "--config",
        str(config),
        env={"CREDENTIALS_DIRECTORY": str(creds)},
        says=(f"secret file {creds / 'streams__main__auth__client_secret'} is not UTF-8",),
    )


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(base().encode() + b'\n[sink]\npath = "\xff.jsonl"\n')
    refused("check-config", "--config", str(config), says=(f"config file {config} is not UTF-8",))


# --- values from the environment and secret files -----------------------------------------------


def test_a_list_from_the_environment_that_is_not_json_names_the_variable(tmp_path: Path) -> None:
    """It said `config.toml: error parsing value for field "streams" from source
    "EnvSettingsSource"`: the file, not the variable, and no fix."""
    config = write(tmp_path, base())
    variable = "OPERA_CONSUMER_STREAMS__MAIN__SUBSCRIPTION__HOTEL_CODES"
    err = refused(
        "check-config",
        "--config",
        str(config),
        env={variable: "H1", "OPERA_CONSUMER_LOG__LEVEL": "debug"},
        says=(f"environment variable {variable}: is not valid JSON", '\'["H1","H2"]\''),
    )
    assert str(config) not in err
    assert "OPERA_CONSUMER_LOG__LEVEL" not in err  # a good one is not blamed


def test_the_same_list_as_json_loads(tmp_path: Path) -> None:
    config = write(tmp_path, base())
    variable = "OPERA_CONSUMER_STREAMS__MAIN__SUBSCRIPTION__HOTEL_CODES"
    result = cli("check-config", "--config", str(config), env={**os.environ, variable: '["H1"]'})
    assert result.returncode == 0, result.stderr
    assert '"H1"' in result.stdout


def test_a_table_from_a_secret_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    config = write(
        tmp_path, base() + '[sink]\ntype = "webhook"\nurl = "https://hook.example.com/"\n'
    )
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sink__headers").write_text("X-Api-Key: 1")
    refused(
        "check-config",
        "--config",
        str(config),
        env={"CREDENTIALS_DIRECTORY": str(creds)},
        says=(f"secret file {creds / 'sink__headers'}: is not valid JSON",),
    )


# --- files that cannot be read ------------------------------------------------------------------


def without_read_permission(*args: str) -> list[str]:
    """``python -m consumer ARGS`` as a process that a mode of 000 keeps out: as root, one
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the capabilities that let root read
    anything), dropped by util-linux's setpriv."""
    command = [sys.executable, "-m", "consumer", *args]
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable to root")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = subprocess.run([*drop, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode()[:200]}")
    return [*drop, *command]


def check_config_unprivileged(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``check-config`` without the capabilities that let root read any file."""
    return subprocess.run(
        without_read_permission("check-config", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def test_an_unreadable_config_file_is_named(tmp_path: Path) -> None:
    config = write(tmp_path, base())
    config.chmod(0)
    result = check_config_unprivileged(config)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot read {config}: Permission denied -> make it readable" in result.stderr


def test_an_unreadable_secret_file_is_named(tmp_path: Path) -> None:
    config = write(tmp_path, base().replace(f'client_secret = "{SECRET}"', ""))
    creds = tmp_path / "creds"
    creds.mkdir()
    secret = creds / "streams__main__auth__client_secret"
    secret.write_text(SECRET)
    secret.chmod(0)
    result = check_config_unprivileged(config, CREDENTIALS_DIRECTORY=str(creds))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot read {secret}: Permission denied" in result.stderr


def test_a_config_name_too_long_for_the_file_system(tmp_path: Path) -> None:
    refused("check-config", "--config", str(tmp_path / ("a" * 5000)), says=("File name too long",))


@pytest.mark.parametrize("nesting", [("[" * 5000, "]" * 5000), ("{a=" * 5000, "}" * 5000)])
def test_toml_nested_too_deeply_is_refused_naming_the_file(
    tmp_path: Path, nesting: tuple[str, str]
) -> None:
    """tomllib recursed until RecursionError."""
    config = write(tmp_path, base() + f"\n[sink]\nx = {nesting[0]}1{nesting[1]}\n")
    refused("check-config", "--config", str(config), says=(f"{config}: values nested too deeply",))


# --- a python sink whose module fails to import ---------------------------------------------------


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("def broken(:\n", "SyntaxError: invalid syntax"),
        ("raise RuntimeError('no database here')\n", "RuntimeError: no database here"),
    ],
)
def test_a_python_target_whose_module_fails_to_import(
    tmp_path: Path, source: str, says: str
) -> None:
    (tmp_path / "failing_target.py").write_text(source)
    config = write(tmp_path, base() + '[sink]\ntype = "python"\ntarget = "failing_target:handle"\n')
    refused(
        "check-config",
        "--config",
        str(config),
        says=(
            f"sink.target: importing module 'failing_target' failed: {says}",
            "python -c 'import failing_target'",
        ),
    )


EXITS_AT_IMPORT = [
    (
        "import os, sys\nTOKEN = os.environ.get('DOWNSTREAM_TOKEN_NEVER_SET') or sys.exit(0)\n",
        "SystemExit: 0",
    ),
    (
        "import sys\nsys.exit('DOWNSTREAM_TOKEN is not set')\n",
        "SystemExit: DOWNSTREAM_TOKEN is not",
    ),
    ("class Abort(BaseException):\n    pass\nraise Abort('gave up at import')\n", "Abort: gave up"),
]


@pytest.mark.parametrize(("source", "says"), EXITS_AT_IMPORT, ids=["exit-0", "exit-text", "base"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_python_target_whose_module_exits_at_import(
    tmp_path: Path, source: str, says: str, command: str
) -> None:
    """resolve() caught Exception only: sys.exit() at import (the "required variable missing"
    idiom) or another BaseException went through the validator: check-config and run exited 0
    (sys.exit(0): systemd's "stopped on request", the daemon left down, nothing said) or 1 with
    a bare message naming no key."""
    (tmp_path / "exiting_target.py").write_text(source + "\nasync def handle(s, e):\n    pass\n")
    config = write(tmp_path, base() + '[sink]\ntype = "python"\ntarget = "exiting_target:handle"\n')
    refused(
        command,
        "--config",
        str(config),
        says=(f"sink.target: importing module 'exiting_target' failed: {says}",),
    )


def test_transient_exceptions_whose_module_exits_at_import(tmp_path: Path) -> None:
    (tmp_path / "exiting_errors.py").write_text("import sys\nsys.exit(3)\n")
    config = write(
        tmp_path,
        base()
        + '[sink]\ntype = "python"\ntarget = "pysink_ok:handle"\n'
        + 'transient_exceptions = ["exiting_errors.Busy"]\n',
    )
    (tmp_path / "pysink_ok.py").write_text("async def handle(s, e):\n    pass\n")
    refused(
        "check-config",
        "--config",
        str(config),
        says=(
            "sink.transient_exceptions",
            "importing module 'exiting_errors' failed: SystemExit: 3",
        ),
    )


def test_a_keyboard_interrupt_while_importing_goes_through(tmp_path: Path) -> None:
    """^C while a slow module imports is the operator's: it stops the command, as anywhere."""
    from consumer.config.settings import resolve

    (tmp_path / "interrupted_target.py").write_text("raise KeyboardInterrupt\n")
    sys.path.append(str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):
            resolve("interrupted_target:handle")
    finally:
        sys.path.remove(str(tmp_path))


def test_a_python_sink_built_in_code_says_which_target_failed(tmp_path: Path) -> None:
    from consumer.config import PythonSinkSettings
    from consumer.errors import ConfigError

    (tmp_path / "failing_at_build.py").write_text("raise RuntimeError('boom')\n")
    sys.path.append(str(tmp_path))
    try:
        settings = PythonSinkSettings.model_construct(type="python", target="failing_at_build:h")
        with pytest.raises(ConfigError) as info:
            PythonSink(settings)
        assert "sink.target: importing module 'failing_at_build' failed" in str(info.value)
    finally:
        sys.path.remove(str(tmp_path))


# --- jsonl paths that name no file ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "path", "key"),
    [
        ("sink", "", "sink.path"),
        ("sink", "out/", "sink.path"),
        ("sink", "existing", "sink.path"),
        ("state", "", "state.path"),
        ("state", "existing", "state.path"),
    ],
)
def test_a_path_that_is_empty_or_a_directory_is_refused(
    tmp_path: Path, table: str, path: str, key: str
) -> None:
    """check-config said OK; run failed with IsADirectoryError (a traceback, exit 1)."""
    (tmp_path / "existing").mkdir()
    config = write(tmp_path, base() + f'[{table}]\npath = "{path}"\n')
    refused("check-config", "--config", str(config), says=(f"{key}: ", "not a directory"))


async def test_run_with_a_jsonl_file_it_cannot_create_exits_78_naming_it(tmp_path: Path) -> None:
    """A regular file where the sink's directory should be: check-config cannot know (the
    directory is created at run), run said FileExistsError in a traceback, exit 1."""
    (tmp_path / "a-file").write_text("")
    sink = tmp_path / "a-file" / "events.jsonl"

    def config(url: str) -> Path:
        return write(
            tmp_path,
            base(url)
            + f'[sink]\npath = "{sink}"\n[state]\npath = "{tmp_path / "state.db"}"\n'
            + "[metrics]\nenabled = false\n",
        )

    out = await run_refused(config)
    assert f"jsonl sink: cannot open {tmp_path / 'a-file'}" in out
    assert f"check sink.path ({sink})" in out


@pytest.mark.parametrize(
    ("auth", "given", "says"),
    [
        ("none", 'token = "tok-Unused-0003"', "sink.token"),
        ("none", 'username = "u"\npassword = "pw-Unused-0004"', "sink.password"),
        ("bearer", 'token = "tok-Used-0005"\nusername = "u"', "sink.username"),
        ("basic", 'username = "u"\npassword = "pw-Used-0006"\ntoken = "tok-X-0007"', "sink.token"),
    ],
)
def test_a_webhook_credential_its_auth_never_sends_is_refused(
    tmp_path: Path, auth: str, given: str, says: str
) -> None:
    """A token (or username and password) beside an auth that does not send it was loaded
    without a word: the POSTs went out without it, the receiver answered 401 (permanent) and
    every event went to the DLQ, with check-config saying OK. The credential as a secret from
    the environment, as README's systemd and Docker sections give it, likewise."""
    sink = f'\n[sink]\ntype = "webhook"\nurl = "https://hooks.example.com/x"\nauth = "{auth}"\n'
    config = write(tmp_path, base() + sink + given + "\n")
    stderr = refused("check-config", "--config", str(config), says=(says, "has no effect"))
    assert "Unused-0003" not in stderr and "Unused-0004" not in stderr
    if auth == "none":
        bare = write(tmp_path, base() + sink, "bare.toml")
        env = {"OPERA_CONSUMER_SINK__TOKEN": "tok-FromEnv-0008"}
        refused("check-config", "--config", str(bare), env=env, says=("sink.token",))
