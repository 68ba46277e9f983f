"""Tests for config files and the environment (``tunnel2/_config.py``, issues #8.5 and #6.8):
``tunnel2 server --config relay.toml`` and ``tunnel2 http --config agent.toml``, every option
also a ``TUNNEL2_<COMMAND>_<OPTION>`` variable, precedence command line > file > environment >
defaults, one-line errors, the examples and the systemd unit in ``examples/``.
"""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import shutil
import signal
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from httpbackend import Backend, serve_backend
from test_cli import CLI, Proc, run
from test_e2e_sockets import fetch, wait_until

from tunnel2 import _config, cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMANDS = ("server", "http")


def parse(
    argv: list[str], env: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    return _config.parse_args(cli.build_parser(), argv, env or {}, cli._ENV_ALIASES)


def keys(command: str) -> dict[str, argparse.Action]:
    parser = _config._subcommands(cli.build_parser())[command]
    return {key: option.action for key, option in _config._options(parser, command, {}).items()}


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def error_of(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(_config.ConfigError) as info:
        parse(argv, env)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- precedence ---


def test_command_line_over_file_over_environment_over_defaults(tmp_path: Path) -> None:
    config = write(tmp_path / "relay.toml", "drain-timeout = 3\nhead-timeout = 4\n")
    env = {"TUNNEL2_SERVER_DRAIN_TIMEOUT": "2", "TUNNEL2_SERVER_HEAD_TIMEOUT": "2"}
    env |= {"TUNNEL2_SERVER_IDLE_TIMEOUT": "2"}
    args, _ = parse(["server", "--config", str(config), "--drain-timeout", "7"], env)
    assert args.drain_timeout == 7.0  # the command line
    assert args.head_timeout == 4.0  # the file
    assert args.idle_timeout == 2.0  # the environment
    assert args.write_timeout == 30.0  # the default
    assert args.config == str(config)
    assert parse(["server"])[0].drain_timeout == 10.0


def test_a_repeatable_option_comes_whole_from_one_source(tmp_path: Path) -> None:
    config = write(tmp_path / "relay.toml", 'trusted-proxy = ["10.0.0.0/8", "::1"]\n')
    env = {"TUNNEL2_SERVER_TRUSTED_PROXY": "192.0.2.0/24\n198.51.100.0/24\n"}
    assert parse(["server"], env)[0].trusted_proxy == ["192.0.2.0/24", "198.51.100.0/24"]
    assert parse(["server", "--config", str(config)], env)[0].trusted_proxy == [
        "10.0.0.0/8",
        "::1",
    ]
    args, _ = parse(["server", "--config", str(config), "--trusted-proxy", "127.0.0.1"], env)
    assert args.trusted_proxy == ["127.0.0.1"]
    assert parse(["server"])[0].trusted_proxy == []


def test_flags_and_verbosity_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert parse(["server"], {"TUNNEL2_SERVER_NO_STATE": "yes"})[0].no_state is True
    off = write(tmp_path / "off.toml", "no-state = false\n")
    args, _ = parse(["server", "--config", str(off)], {"TUNNEL2_SERVER_NO_STATE": "1"})
    assert args.no_state is False  # the file's false wins over the environment's true
    assert parse(["server", "--config", str(off), "--no-state"])[0].no_state is True
    assert parse(["server"], {"TUNNEL2_SERVER_QUIET": "on"})[0].verbose == -1
    loud = write(tmp_path / "loud.toml", "verbose = 2\n")
    assert parse(["server", "--config", str(loud)], {"TUNNEL2_SERVER_QUIET": "on"})[0].verbose == 2
    assert parse(["server", "--config", str(loud), "-q"])[0].verbose == -1
    quiet_off = write(tmp_path / "q.toml", "quiet = false\n")
    assert parse(["server", "--config", str(quiet_off)])[0].verbose == 0


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", 'target = "8080"\nsession = "app"\n')
    args, _ = parse(["http"], {"TUNNEL2_HTTP_CONFIG": str(config)})
    assert (args.target, args.session) == ("8080", "app")
    assert parse(["http", "9000"], {"TUNNEL2_HTTP_CONFIG": str(config)})[0].target == "9000"


def test_agent_token_and_token_file_exclude_each_other_across_sources(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", 'token-file = "agent-token"\n')
    args, _ = parse(["http", "8080", "--config", str(config)], {"TUNNEL2_TOKEN": "from-env"})
    assert (args.token, args.token_file) == (None, str(tmp_path / "agent-token"))
    args, _ = parse(["http", "8080", "--config", str(config), "--token", "t"])
    assert (args.token, args.token_file) == ("t", None)
    both = write(tmp_path / "both.toml", 'token = "t"\ntoken-file = "f"\n')
    message = error_of(["http", "8080", "--config", str(both)])
    assert message == (
        f"tunnel2 http: {both}:1: token and {both}:2: token-file exclude each other"
    ), message


def test_options_added_later_are_covered_by_the_same_rules(tmp_path: Path) -> None:
    """Keys, variables, types and flags come from the parser: a subcommand with options of
    every supported kind, as other topics add them (``--inspect`` / ``--no-inspect``...)."""
    parser = argparse.ArgumentParser(prog="tunnel2")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("demo")
    sub.add_argument("--inspect", action=argparse.BooleanOptionalAction, default=True)
    sub.add_argument("--ring", type=int, default=100, metavar="N")
    sub.add_argument("--header", action="append", metavar="NAME")
    sub.add_argument("--cert", metavar="FILE")
    _config.add_config_option(sub, "demo")
    config = write(tmp_path / "demo.toml", 'inspect = false\nheader = ["a", "b"]\ncert = "c.pem"\n')
    args, _ = _config.parse_args(parser, ["demo", "--config", str(config)], {}, {})
    assert (args.inspect, args.header, args.cert) == (False, ["a", "b"], str(tmp_path / "c.pem"))
    args, _ = _config.parse_args(parser, ["demo", "--config", str(config), "--inspect"], {}, {})
    assert args.inspect is True
    env = {"TUNNEL2_DEMO_INSPECT": "off", "TUNNEL2_DEMO_RING": "7"}
    args, _ = _config.parse_args(parser, ["demo"], env, {})
    assert (args.inspect, args.ring, args.header) == (False, 7, None)
    bad = write(tmp_path / "bad.toml", "no-inspect = true\n")
    with pytest.raises(_config.ConfigError, match="no-inspect: unknown key"):
        _config.parse_args(parser, ["demo", "--config", str(bad)], {}, {})


# --- the environment ---


def test_every_option_has_a_variable_and_none_is_shared_by_the_two_commands() -> None:
    names: dict[str, set[str]] = {}
    for command in COMMANDS:
        parser = _config._subcommands(cli.build_parser())[command]
        options = _config._options(parser, command, cli._ENV_ALIASES[command])
        assert set(options) == set(keys(command))
        names[command] = {env.name for option in options.values() for env in option.env}
        prefix = f"TUNNEL2_{command.upper()}_"
        for key, option in options.items():
            assert option.env[0].name == prefix + key.upper().replace("-", "_")
    assert not names["server"] & names["http"]
    assert {"TUNNEL2_SERVER", "TUNNEL2_TOKEN"} <= names["http"]
    assert {"TUNNEL2_TOKENS", "TUNNEL2_TOKEN_FILE", "TUNNEL2_STATE_DIR"} <= names["server"]


def test_the_existing_short_names_still_work() -> None:
    env = {
        "TUNNEL2_TOKENS": "alice=t1, t2\nt3",
        "TUNNEL2_TOKEN_FILE": "/etc/tunnel2/tokens.txt",
        "TUNNEL2_STATE_DIR": "/var/lib/tunnel2",
    }
    args, _ = parse(["server"], env)
    assert args.token == ["alice=t1", "t2", "t3"]
    assert (args.token_file, args.state_dir) == ("/etc/tunnel2/tokens.txt", "/var/lib/tunnel2")
    env = {
        "TUNNEL2_SERVER": "https://relay.example.com",
        "TUNNEL2_TOKEN": "agent-token",
        "TUNNEL2_BASIC_AUTH": "alice:pa, ss\n\nbob:x",
        "TUNNEL2_BEARER_TOKEN": "visitor",
    }
    args, _ = parse(["http", "8080"], env)
    assert (args.server, args.token) == ("https://relay.example.com", "agent-token")
    assert args.basic_auth == ["alice:pa, ss", "bob:x"]
    assert args.bearer_token == "visitor"
    # The systematic name wins over the short one; an empty variable is unset.
    env = {"TUNNEL2_HTTP_TOKEN": "long", "TUNNEL2_TOKEN": "short", "TUNNEL2_HTTP_SERVER": ""}
    args, _ = parse(["http", "8080"], env)
    assert (args.token, args.server) == ("long", "http://127.0.0.1:8000")


def test_one_commands_variables_do_not_reach_the_other() -> None:
    env = {"TUNNEL2_SERVER_ADMIN": "127.0.0.1:9100", "TUNNEL2_HTTP_DRAIN_TIMEOUT": "3"}
    server, _ = parse(["server"], env)
    http, _ = parse(["http", "8080"], env)
    assert (server.admin, server.drain_timeout) == (("127.0.0.1", 9100), 10.0)
    assert (http.admin, http.drain_timeout) == (None, 3.0)
    # TUNNEL2_SERVER is the agent's relay, not a prefix the relay reads.
    assert parse(["server"], {"TUNNEL2_SERVER": "http://x:1"})[0].host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"TUNNEL2_SERVER_PORT": "99999"}, "TUNNEL2_SERVER_PORT: port 99999 is out of range"),
        ({"TUNNEL2_SERVER_PORT": "http"}, "TUNNEL2_SERVER_PORT: 'http' is not a port number"),
        ({"TUNNEL2_SERVER_NO_STATE": "maybe"}, "TUNNEL2_SERVER_NO_STATE: expected 1/true/yes"),
        ({"TUNNEL2_SERVER_VERBOSE": "-1"}, "TUNNEL2_SERVER_VERBOSE: expected a whole number"),
        ({"TUNNEL2_SERVER_LOG_FORMAT": "xml"}, "TUNNEL2_SERVER_LOG_FORMAT: invalid choice: 'xml'"),
        (
            {"TUNNEL2_SERVER_TRUSTED_PROXY": "10.0.0.0/8,10.1.0.0/16"},
            "TUNNEL2_SERVER_TRUSTED_PROXY: '10.0.0.0/8,10.1.0.0/16' is not an IP network",
        ),
        ({"TUNNEL2_SERVER_CONFIG": "/nonexistent.toml"}, "/nonexistent.toml: cannot read"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(env: dict[str, str], says: str) -> None:
    message = error_of(["server"], env)
    assert message.startswith("tunnel2 server: ")
    assert says in message, message


# --- the file: errors ---


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("port = 99999\n", ":1: port: port 99999 is out of range 0-65535"),
        ("port = true\n", ":1: port: expected a number or a string, got a boolean"),
        ('port = "eighty"\n', ":1: port: 'eighty' is not a port number"),
        ("\n\ndrain-timout = 5\n", ":3: drain-timout: unknown key (did you mean drain-timeout?)"),
        ("drain_timeout = 5\n", ":1: drain_timeout: unknown key (did you mean drain-timeout?)"),
        ("drain-timeout = -1\n", ":1: drain-timeout: '-1' must be positive"),
        ('domain = "bad/domain"\n', ":1: domain: 'bad/domain' is not a domain name"),
        ("public-url = 8000\n", ":1: public-url: expected a string, got an integer"),
        ('token = "abc"\n', ":1: token: expected an array (repeatable option), got a string"),
        ('trusted-proxy = ["10.0.0.0/33"]\n', ":1: trusted-proxy: '10.0.0.0/33' is not an IP"),
        ("no-state = 1\n", ":1: no-state: expected true or false, got an integer"),
        ("verbose = true\n", ":1: verbose: expected a whole number of at least 0, got True"),
        ('log-format = "xml"\n', ":1: log-format: invalid choice: 'xml' (choose from 'text',"),
        ('admin = "9100"\n', ":1: admin: '9100' is not HOST:PORT"),
        ("[host]\nname = 1\n", ":1: host: expected a string, got a table"),
        ("started = 2026-12-01\n", ":1: started: unknown key"),
        ("host = 2026-12-01\n", ":1: host: expected a string, got a date or time"),
        ('config = "other.toml"\n', ":1: config: a config file cannot name another one"),
        ("verbose = 1\nquiet = true\n", ":2: quiet: conflicts with "),
        ("port = 1\ndrain-timeout = [\n", ": not valid TOML: "),
        (
            "port = 1\nhost = 127.0.0.1\n",
            ": not valid TOML: Expected newline or end of document after a statement (at line 2,",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_the_key_and_what_is_wrong(
    tmp_path: Path, text: str, says: str
) -> None:
    config = write(tmp_path / "relay.toml", text)
    message = error_of(["server", "--config", str(config)])
    assert message.startswith(f"tunnel2 server: {config}"), message
    assert says in message, message


def test_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    message = error_of(["server", "--config", str(tmp_path / "nope.toml")])
    assert message == (
        f"tunnel2 server: {tmp_path / 'nope.toml'}: cannot read the config file: "
        "No such file or directory"
    )
    message = error_of(["server", "--config", str(tmp_path)])
    assert "cannot read the config file: Is a directory" in message
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"port = 1\n\xff\xfe\n")
    assert error_of(["server", "--config", str(binary)]).endswith("is not UTF-8 text")


@pytest.mark.parametrize(
    ("argv", "text", "says"),
    [
        (["server"], "port = 99999\n", "port 99999 is out of range 0-65535"),
        (["server"], "nonsense = 1\n", "nonsense: unknown key"),
        (["http"], "max-concurrent = 0\n", "max-concurrent: '0' must be at least 1"),
        (["http"], 'server = "ftp://x"\ntarget = "80"\n', "must be http://, https://"),
        (["http"], "session = 'a'\n", "no PORT_OR_URL (an argument, or target in --config)"),
        (["http", "80"], 'token-file = "missing"\n', "cannot read the token file"),
    ],
)
async def test_config_mistakes_in_the_real_command_exit_2_with_one_line(
    tmp_path: Path, argv: list[str], text: str, says: str
) -> None:
    config = write(tmp_path / "x.toml", text)
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, *argv, "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"tunnel2 {argv[0]}: "), stderr
    assert says in stderr, stderr


# --- the file: paths and secrets ---


def test_relative_paths_in_the_file_are_relative_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.chdir(tmp_path)
    relay = write(
        etc / "relay.toml",
        'token-file = "tokens.txt"\ntls-cert = "tls/cert.pem"\ntls-key = "/abs/key.pem"\n'
        'state-dir = "../state"\n',
    )
    args, _ = parse(["server", "--config", "etc/relay.toml"])
    assert args.token_file == str(etc / "tokens.txt")
    assert args.tls_cert == str(etc / "tls" / "cert.pem")
    assert args.tls_key == "/abs/key.pem"
    assert args.state_dir == str(etc / ".." / "state")
    agent = write(
        etc / "agent.toml",
        'target = "8080"\nca-file = "ca.pem"\nbackend-ca-file = "b.pem"\ntoken-file = "t"\n',
    )
    args, _ = parse(["http", "--config", str(agent)])
    assert (args.ca_file, args.backend_ca_file) == (str(etc / "ca.pem"), str(etc / "b.pem"))
    assert args.token_file == str(etc / "t")
    assert args.target == "8080"  # not a path
    # On the command line and in the environment, relative to the working directory.
    args, _ = parse(
        ["server", "--config", str(relay), "--tls-cert", "c.pem"],
        {"TUNNEL2_SERVER_TLS_KEY": "k.pem"},
    )
    assert (args.tls_cert, args.tls_key) == ("c.pem", "/abs/key.pem")
    assert parse(["server"], {"TUNNEL2_SERVER_TLS_KEY": "k.pem"})[0].tls_key == "k.pem"


def test_path_and_secret_options_are_known_by_their_metavar() -> None:
    paths = {c: {k for k, a in keys(c).items() if a.metavar in ("FILE", "DIR")} for c in COMMANDS}
    assert paths["server"] == {"token-file", "state-dir", "tls-cert", "tls-key"}
    assert {"ca-file", "backend-ca-file", "token-file"} <= paths["http"]
    parser = _config._subcommands(cli.build_parser())["http"]
    secrets = {k for k, o in _config._options(parser, "http", {}).items() if o.is_secret}
    assert secrets == {"token", "basic-auth", "bearer-token"}


def test_a_world_readable_file_with_a_token_gets_a_warning(tmp_path: Path) -> None:
    config = write(tmp_path / "relay.toml", 'token = ["t1"]\nport = 0\n', mode=0o644)
    _, warnings = parse(["server", "--config", str(config)])
    assert warnings == [
        f"tunnel2 server: warning: {config} holds token and every user may read it "
        f"(chmod o-r {config})"
    ]
    config.chmod(0o640)
    assert parse(["server", "--config", str(config)])[1] == []
    plain = write(tmp_path / "plain.toml", "port = 0\n", mode=0o644)
    assert parse(["server", "--config", str(plain)])[1] == []
    agent = write(tmp_path / "agent.toml", 'bearer-token = "v"\ntoken = "a"\n', mode=0o604)
    (warning,) = parse(["http", "80", "--config", str(agent)])[1]
    assert f"{agent} holds bearer-token, token and every user may read it" in warning


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "must hold one token, and nothing else"),
        ("one two\n", "must hold one token, and nothing else"),
        (None, "cannot read the token file"),
    ],
)
def test_a_bad_agent_token_file(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "agent-token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=says):
        cli._agent_token(str(path))
    path.write_text("  the-token\n")
    assert cli._agent_token(str(path)) == "the-token"


# --- the examples stay complete ---

_COMMENTED_KEY = re.compile(r"^# ([a-z][a-z-]*) = ")


@pytest.mark.parametrize(("command", "name"), [("server", "relay.toml"), ("http", "agent.toml")])
def test_the_example_files_show_every_option_and_only_real_ones(
    tmp_path: Path, command: str, name: str
) -> None:
    """Fails when an option is added to the command but not to its example: add the key
    (set, or commented out with an example value) to examples/relay.toml or agent.toml."""
    example = EXAMPLES / name
    text = example.read_text()
    active = set(tomllib.loads(text))
    commented = {}
    for line in text.splitlines():
        if match := _COMMENTED_KEY.match(line):
            commented[match[1]] = line[2:]
    assert not active & commented.keys(), "set and commented out"
    assert active | commented.keys() == set(keys(command))
    parse([command, "--config", str(example)])  # loads as it is
    for key, line in commented.items():  # and every commented-out value is valid
        alone = write(tmp_path / f"{key}.toml", line + "\n")
        parse([command, "--config", str(alone)])
        assert key in tomllib.loads(line)


def test_the_readme_example_loads(tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("### Configuration files and environment", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    args, _ = parse(["server", "--config", str(write(tmp_path / "relay.toml", block))])
    assert (args.port, args.trusted_proxy) == (443, ["10.0.0.0/8"])
    assert args.token_file == str(tmp_path / "tokens.txt")


# --- systemd ---


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((EXAMPLES / "tunnel2-relay.service").read_text())
    return unit


def test_the_systemd_unit_runs_the_example_relay_toml(tmp_path: Path) -> None:
    service = _unit()["Service"]
    program, *argv = shlex.split(service["ExecStart"])
    assert program.endswith("/tunnel2")
    argv = [str(EXAMPLES / "relay.toml") if a == "/etc/tunnel2/relay.toml" else a for a in argv]
    argv = [str(tmp_path) if a == "${STATE_DIRECTORY}" else a for a in argv]
    args, warnings = parse(argv)
    assert args.command == "server"
    assert args.config == str(EXAMPLES / "relay.toml")
    assert args.state_dir == str(tmp_path)
    assert warnings == []
    assert (args.port, args.host) == (443, "0.0.0.0")
    assert args.token_file == str(EXAMPLES / "tokens.txt")
    # systemd waits longer than the relay drains before it kills.
    assert float(service["TimeoutStopSec"]) > args.drain_timeout
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["StateDirectory"] == "tunnel2"
    assert service["User"] == "tunnel2"
    assert service["Restart"] == "on-failure"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[hardening] == "yes", hardening
    assert service["ProtectSystem"] == "strict"
    assert int(service["LimitNOFILE"]) > args.max_visitor_connections + 1000


async def test_systemd_accepts_the_unit_and_rates_it_safe(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (with ExecStart pointed at this tunnel2, which must exist)
    and ``security --offline``, whose exposure must stay "OK": at most 2 of 10 (the
    threshold counts tenths)."""
    tunnel2 = Path(sys.executable).parent / "tunnel2"
    assert tunnel2.exists(), "pip install -e . puts the tunnel2 script beside python"
    text = (EXAMPLES / "tunnel2-relay.service").read_text()
    unit = tmp_path / "tunnel2-relay.service"
    unit.write_text(text.replace("/opt/tunnel2/bin/tunnel2", str(tunnel2)))
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "apt-get install systemd (bash .ci/peers does)"
    with trio.fail_after(60):
        verify = await trio.run_process(
            [analyze, "verify", str(unit)], capture_stdout=True, capture_stderr=True, check=False
        )
        assert verify.returncode == 0, verify.stderr.decode()
        assert verify.stderr == b"", verify.stderr.decode()
        security = await trio.run_process(
            [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    report = security.stdout.decode()
    assert security.returncode == 0, report[-2000:]
    assert "Overall exposure level for tunnel2-relay.service: 1." in report, report[-300:]


# --- real processes ---


async def _public_url(agent: Proc) -> str:
    line = await agent.readline()
    assert line.startswith("Forwarding "), (line, agent.stderr())
    return line.split()[1]


async def test_relay_and_agent_from_their_files_serve_and_sighup_reloads(tmp_path: Path) -> None:
    """A relay started from relay.toml (its token file named relative to it), an agent from
    agent.toml (its token from a file beside it), a request through both; then a token added
    to the relay's file and SIGHUP let a second agent in."""
    etc = tmp_path / "etc"
    etc.mkdir()
    tokens = write(etc / "tokens.txt", "bob-token-1 bob\n")
    write(
        etc / "relay.toml",
        'port = 0\ntoken-file = "tokens.txt"\nstate-dir = "state"\ndrain-timeout = 2\n',
        mode=0o644,  # no token in it: no warning
    )
    write(etc / "bob-token", "bob-token-1\n")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend)
            async with run(
                *CLI, "server", "--config", str(etc / "relay.toml"), stderr=tmp_path / "relay.err"
            ) as relay:
                line = await relay.readline()
                assert line.startswith("tunnel2 relay on http://127.0.0.1:"), relay.stderr()
                relay_url = line.split()[3]
                write(
                    etc / "bob.toml",
                    f'target = "{backend.port}"\nserver = "{relay_url}"\n'
                    'token-file = "bob-token"\nsession = "bob-app"\n',
                )
                async with run(
                    *CLI, "http", "--config", str(etc / "bob.toml"), stderr=tmp_path / "bob.err"
                ) as bob:
                    url = await _public_url(bob)
                    assert url == f"{relay_url}/session/bob-app/"
                    response = await fetch(url + "hello?from=toml")
                    assert response.status == 200
                    assert response.echo().target == b"/hello?from=toml"

                    carol = write(
                        etc / "carol.toml",
                        f'target = "{backend.port}"\nserver = "{relay_url}"\n'
                        'token = "carol-token-1"\n',
                    )
                    refused = await trio.run_process(
                        [*CLI, "http", "--config", str(carol)],
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                    assert refused.returncode == 1
                    assert "invalid or missing token" in refused.stderr.decode()
                    tokens.write_text("bob-token-1 bob\ncarol-token-1 carol\n")
                    relay.process.send_signal(signal.SIGHUP)
                    await wait_until(lambda: "tokens reloaded" in relay.stderr())
                    async with run(
                        *CLI, "http", "--config", str(carol), stderr=tmp_path / "carol.err"
                    ) as carol_agent:
                        carol_url = await _public_url(carol_agent)
                        assert (await fetch(carol_url)).status == 200
                        assert await carol_agent.interrupt() == 0
                    assert (await fetch(url)).status == 200  # bob's connection was kept
                    assert await bob.interrupt() == 0
                assert await relay.interrupt() == 0
            nursery.cancel_scope.cancel()
    assert (etc / "state").is_dir(), "state-dir relative to relay.toml"
    for name in ("relay", "bob", "carol"):
        stderr = (tmp_path / f"{name}.err").read_text()
        assert "Traceback" not in stderr, stderr
        assert "warning:" not in stderr, stderr
