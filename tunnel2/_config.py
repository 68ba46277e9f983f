"""Options of a ``tunnel2`` subcommand from the command line, a TOML file and the environment.

Layer: top, beside :mod:`tunnel2.cli` (which is its only user). Imports the standard library
and attrs only.

Everything here is derived from the subcommand's :mod:`argparse` parser, so an option added
to the parser is a config key and an environment variable with no change here:

- **key**: the long option name without its dashes (``--drain-timeout`` → ``drain-timeout``;
  a positional argument by its name, ``target``). Values are TOML strings or numbers that go
  through the option's own ``type=`` (so ports, durations and CIDRs are checked exactly as on
  the command line), booleans for flags (``store_true``/``store_const``, and
  ``BooleanOptionalAction`` under its positive name: ``inspect = false``), a whole number for
  ``-v`` (``verbose = 2``), arrays for repeatable options.
- **environment**: ``TUNNEL2_<COMMAND>_<KEY>`` with the key upper-cased and dashes as
  underscores (``TUNNEL2_SERVER_DRAIN_TIMEOUT``), plus the short names the command line passes
  in :func:`parse_args` (``TUNNEL2_TOKEN``...). A repeatable option takes one value per line;
  a flag takes ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``; an empty
  variable counts as unset.
- **precedence**: command line, then the file, then the environment, then the built-in
  defaults; per option, and a repeatable option's values come whole from one of them. Options
  in a mutually exclusive group go together: the highest source that sets one of them decides.
- **paths**: options whose metavar is ``FILE`` or ``DIR`` are paths; relative ones in the file
  are taken relative to the file's directory (on the command line and in the environment,
  relative to the working directory, as usual).
- **secrets**: options whose metavar names a ``TOKEN`` or a ``PASS``; a file that holds one
  and is readable by every user gets a warning.

Every mistake is a :class:`ConfigError` whose text is the one line to print: the command, the
file (and line) or the variable, the key, what is wrong.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, final

import attrs

__all__ = ["ConfigError", "EnvName", "add_config_option", "parse_args"]

_PATH_METAVARS: Final = frozenset({"FILE", "DIR"})
_SECRET_RE: Final = re.compile(r"TOKEN|PASS")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_TOML_TYPES: Final = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


class ConfigError(Exception):
    """A config file, an environment variable or a value in them is wrong; ``str()`` is the
    one line to print."""


@final
@attrs.frozen
class EnvName:
    """An extra environment variable for one option (a short, older name).

    Attributes:
        name: the variable, e.g. ``TUNNEL2_TOKEN``.
        separator: a regular expression between the values of a repeatable option.
    """

    name: str
    separator: str = r"\n"


@attrs.frozen
class _Option:
    key: str
    action: argparse.Action
    env: tuple[EnvName, ...]

    @property
    def is_path(self) -> bool:
        return self.action.metavar in _PATH_METAVARS

    @property
    def is_secret(self) -> bool:
        return isinstance(self.action.metavar, str) and bool(_SECRET_RE.search(self.action.metavar))


@attrs.frozen
class _Value:
    value: object
    source: str  # "relay.toml:3: port", "TUNNEL2_SERVER_PORT"


_Layer = dict[str, _Value]  # by dest


def add_config_option(parser: argparse.ArgumentParser, command: str) -> None:
    """Give ``parser`` (the subcommand ``command``) ``--config FILE``, and say in its help where
    else options come from."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"read options from this TOML file (default $TUNNEL2_{command.upper()}_CONFIG)",
    )
    parser.epilog = (
        "Every option can also be a key in the --config file (drain-timeout = 5; lists for "
        f"repeatable options) or a variable TUNNEL2_{command.upper()}_<OPTION> "
        f"(TUNNEL2_{command.upper()}_DRAIN_TIMEOUT=5). The command line wins over the file, "
        "the file over the environment."
    )


def _options(
    parser: argparse.ArgumentParser, command: str, aliases: Mapping[str, Sequence[EnvName]]
) -> dict[str, _Option]:
    prefix = f"TUNNEL2_{command.upper()}_"
    options = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if action.dest == "config":
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        key = longs[0][2:] if longs else action.dest
        single = isinstance(action, argparse._StoreAction | argparse._AppendAction)
        flag = _is_flag(action) or isinstance(action, argparse._CountAction)
        if not (flag or (single and action.nargs in (None, "?"))):
            raise TypeError(f"{command} {key}: this kind of option cannot come from a file")
        env = (EnvName(prefix + key.upper().replace("-", "_")), *aliases.get(key, ()))
        options[key] = _Option(key, action, env)
    return options


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _has_config(parser: argparse.ArgumentParser) -> bool:
    return any(action.dest == "config" for action in parser._actions)


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    aliases: Mapping[str, Mapping[str, Sequence[EnvName]]],
) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` with ``parser``; fill what it leaves unset from the file and ``environ``.

    Applies to subcommands that have ``--config`` (:func:`add_config_option`); the others parse
    as usual. Command-line mistakes end the process as argparse does (status 2).

    Args:
        parser: the top-level parser, whose subcommands are ``COMMAND`` names.
        argv: the arguments (None: ``sys.argv[1:]``).
        environ: the environment.
        aliases: by subcommand, then key: extra environment variables for that option.

    Returns:
        The namespace as ``parser.parse_args`` would give it, and warnings (lines to print).

    Raises:
        ConfigError: the file cannot be read or parsed, or a key, a value or a variable is
            wrong.
    """
    parser.parse_args(argv)  # --help (showing the real defaults) and CLI mistakes exit here
    configurable = [p for p in _subcommands(parser).values() if _has_config(p)]
    # Parsed again with no defaults: what is left unset was not on the command line.
    saved = {id(a): a.default for p in configurable for a in p._actions}
    try:
        for p in configurable:
            for action in p._actions:
                action.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for p in configurable:
            for action in p._actions:
                action.default = saved[id(action)]
    command = str(getattr(given, "command", ""))
    sub = _subcommands(parser).get(command)
    if sub is None or sub not in configurable:
        return given, []
    options = _options(sub, command, aliases.get(command, {}))
    warnings: list[str] = []
    try:
        env = _env_layer(options, environ)
        config = getattr(given, "config", None) or _env_text(
            environ, f"TUNNEL2_{command.upper()}_CONFIG"
        )
        given.config = config
        file: _Layer = {} if config is None else _file_layer(options, Path(config), warnings)
        cli = {dest: _Value(v, "the command line") for dest, v in vars(given).items()}
        layers = [cli, file, env]
        _resolve(sub, options, layers, given)
    except ConfigError as exc:
        raise ConfigError(f"{sub.prog}: {exc}") from None
    return given, [f"{sub.prog}: warning: {w}" for w in warnings]


def _env_text(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name) or None


def _env_layer(options: Mapping[str, _Option], environ: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for option in options.values():
        for env in option.env:
            text = _env_text(environ, env.name)
            if text is None:
                continue
            try:
                value = _from_env(option, text, env.separator)
            except _Bad as exc:
                raise ConfigError(f"{env.name}: {exc}") from None
            if value is not _UNSET:
                _put(layer, option, _Value(value, env.name))
            break  # the first name set wins
    return layer


def _file_layer(options: Mapping[str, _Option], path: Path, warnings: list[str]) -> _Layer:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        text = data.decode()
        table = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.absolute().parent
    layer: _Layer = {}
    for key, raw in table.items():
        where = f"{path}{_line_of(text, key)}: {key}"
        option = options.get(key)
        if option is None:
            raise ConfigError(f"{where}: {_unknown(key, options)}")
        try:
            value = _from_toml(option, raw, base)
        except _Bad as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if value is not _UNSET:
            _put(layer, option, _Value(value, where))
    secrets = [key for key in table if options[key].is_secret]
    if secrets and mode & stat.S_IROTH:
        warnings.append(
            f"{path} holds {', '.join(secrets)} and every user may read it (chmod o-r {path})"
        )
    return layer


def _line_of(text: str, key: str) -> str:
    """``:N`` for the line where the top-level ``key`` is set (or its table begins), or
    nothing."""
    name = re.escape(key)
    pattern = re.compile(rf"""\s*((["']?){name}\2\s*=|\[\s*(["']?){name}\3\s*\])""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return f":{number}"
    return ""


def _unknown(key: str, options: Iterable[str]) -> str:
    if key == "config":
        return "a config file cannot name another one"
    close = difflib.get_close_matches(key.replace("_", "-"), list(options), n=1)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _put(layer: _Layer, option: _Option, value: _Value) -> None:
    dest = option.action.dest
    if dest in layer:
        raise ConfigError(f"{value.source}: conflicts with {layer[dest].source}")
    layer[dest] = value


def _resolve(
    parser: argparse.ArgumentParser,
    options: Mapping[str, _Option],
    layers: list[_Layer],
    namespace: argparse.Namespace,
) -> None:
    """Set every dest of ``options`` on ``namespace`` from the first layer that has it."""
    groups = [{a.dest for a in group._group_actions} for group in parser._mutually_exclusive_groups]
    for group in groups:
        sources = [layer for layer in layers if group & layer.keys()]
        if not sources:
            continue
        values = [sources[0][dest] for dest in sorted(group & sources[0].keys())]
        if len(values) > 1:
            raise ConfigError(f"{values[0].source} and {values[1].source} exclude each other")
        for layer in sources[1:]:
            for dest in group:
                layer.pop(dest, None)
    defaults: dict[str, object] = {}
    for option in options.values():
        action = option.action
        default, convert = action.default, _converter(action)
        if isinstance(default, str) and convert is not None:
            default = convert(default)  # as argparse converts string defaults
        defaults.setdefault(action.dest, default)
    for dest, default in defaults.items():
        for layer in layers:
            if dest in layer:
                setattr(namespace, dest, layer[dest].value)
                break
        else:
            setattr(namespace, dest, default)


class _Bad(Exception):
    """What is wrong with one value (the caller says where it came from)."""


_UNSET: Final = object()


def _kind(raw: object) -> str:
    return next((name for t, name in _TOML_TYPES.items() if type(raw) is t), "a date or time")


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreConstAction | argparse.BooleanOptionalAction)


def _flag(action: argparse.Action, on: bool) -> object:
    if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
        return on
    if on:
        return action.const
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return not action.const
    return _UNSET  # e.g. quiet = false: as if not given


def _from_toml(option: _Option, raw: object, base: Path) -> object:
    action = option.action
    if _is_flag(action):
        if not isinstance(raw, bool):
            raise _Bad(f"expected true or false, got {_kind(raw)}")
        return _flag(action, raw)
    if isinstance(action, argparse._CountAction):
        if type(raw) is not int or raw < 0:
            raise _Bad(f"expected a whole number of at least 0, got {raw!r}")
        return raw
    if isinstance(action, argparse._AppendAction):
        if not isinstance(raw, list):
            raise _Bad(f"expected an array (repeatable option), got {_kind(raw)}")
        return [_scalar(option, _toml_text(action, item), base) for item in raw]
    return _scalar(option, _toml_text(action, raw), base)


def _toml_text(action: argparse.Action, raw: object) -> str:
    if isinstance(raw, str):
        return raw
    if action.type is not None and type(raw) in (int, float):
        return str(raw)
    wanted = "a string" if action.type is None else "a number or a string"
    raise _Bad(f"expected {wanted}, got {_kind(raw)}")


def _from_env(option: _Option, text: str, separator: str) -> object:
    action = option.action
    if _is_flag(action):
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise _Bad(f"expected 1/true/yes/on or 0/false/no/off, got {text!r}")
        return _flag(action, word in _TRUE)
    if isinstance(action, argparse._CountAction):
        if not text.strip().isdigit():
            raise _Bad(f"expected a whole number of at least 0, got {text!r}")
        return int(text)
    if isinstance(action, argparse._AppendAction):
        items = [item for item in re.split(separator, text) if item]
        return [_scalar(option, item, None) for item in items]
    return _scalar(option, text, None)


def _converter(action: argparse.Action) -> Callable[[str], object] | None:
    if action.type is None:
        return None
    if not callable(action.type):
        raise TypeError(f"{action.dest}: type={action.type!r} is not a function")
    return action.type


def _scalar(option: _Option, text: str, base: Path | None) -> object:
    """``text`` through the option's ``type=`` and ``choices``, as argparse would."""
    action = option.action
    if base is not None and option.is_path and not os.path.isabs(text):
        text = str(base / text)
    value: object = text
    convert = _converter(action)
    if convert is not None:
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as exc:
            raise _Bad(str(exc)) from None
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", repr(convert))
            raise _Bad(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise _Bad(f"invalid choice: {value!r} (choose from {choices})")
    return value
