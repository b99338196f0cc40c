"""One way to read a config: `--config FILE.py:ARG` plus `--config.key=value` overrides.

Every command line (`cfm.train`, `cfm.aot`, `cfm.finetune`) parses its flags with
`parse_command_line`; launchers, tests and benchmarks build a config with `load_config`, which
runs the same parser, so an override means the same thing everywhere: ml_collections' config
flags import FILE.py by path, call `get_config(ARG)`, then apply the overrides with their types
checked (a misspelt key or a value of the wrong type is an error that names it). Every error
is a CommandLineError (a `cfm.errors.UserError`) with a one-line message; `--help`/`-h` prints
the command's docstring, its flags with their defaults and an example.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from cfm.errors import UserError

HELP_FLAGS = ("--help", "-h")


class CommandLineError(UserError):
    """A bad flag, config file, preset, key or value; the message says which, on one line."""


def help_requested(argv: Sequence[str]) -> bool:
    """Whether `argv` (argv[0] is the program) asks for --help or -h (before any `--`)."""
    for arg in list(argv)[1:]:
        if arg == "--":
            return False
        if arg in HELP_FLAGS:
            return True
    return False


def _flag_lines(fv: flags.FlagValues, required: Sequence[str]) -> list[str]:
    entries = []
    for name, flag in fv._flags().items():  # definition order; --config first
        if name != flag.name:
            continue  # a short alias
        if name == "config":
            entries += [f"--config FILE.py:ARG: the config file and its preset, {flag.help} "
                        f"({'required' if name in required else 'default: none'})",
                        "--config.KEY=VALUE: override one value of the config, type-checked, "
                        "e.g. --config.seed=1 (any number of them; default: none)"]
            continue
        default = "required" if name in required else f"default: {flag.default_as_str or None}"
        entries.append(f"--{name}: {flag.help} ({default})")
    entries.append("-h, --help: print this help and exit")
    return [textwrap.fill(e, 100, initial_indent="  ", subsequent_indent="      ")
            for e in entries]


def help_text(fv: flags.FlagValues, doc: str, example: str, required: Sequence[str]) -> str:
    """--help of a command: its docstring, every flag with its default, one example."""
    parts = [doc.strip(), "flags:\n" + "\n".join(_flag_lines(fv, required))]
    if example:
        parts.append(f"example:\n  {example}")
    return "\n\n".join(parts) + "\n"


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of --config in `argv` (`--config X` or `--config=X`), if given."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _check_config_file(spec: str, config_help: str) -> None:
    """CommandLineError unless the file of `spec` (FILE.py[:ARG]) exists and reads."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise CommandLineError(f"--config {spec}: {path} {what} (relative to {os.getcwd()}); "
                               f"give {config_help}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CommandLineError(f"--config {spec}: cannot read {path} ({e.strerror})") from None


def _message(e: Exception, argv: Sequence[str]) -> str:
    """One line for an error of absl or ml_collections: the key and its did-you-mean for a
    misspelt key, the config file's own message for an error raised in `get_config` (not the
    traceback ml_collections wraps around it)."""
    inner: BaseException = e
    while isinstance(inner, AttributeError) and inner.args and isinstance(inner.args[0],
                                                                          KeyError):
        inner = inner.args[0]  # ml_collections wraps a nested key's KeyError
    if isinstance(inner, KeyError) and inner.args:
        first, *rest = str(inner.args[0]).splitlines()
        key = first.strip("'\"")
        override = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                         and key in a.split("=", 1)[0][len("--config."):].split(".")), None)
        hint = " ".join(line.strip() for line in rest if line.strip())
        return (f"{override or '--config.' + key}: the config has no key {key!r}"
                + (f"; {hint}" if hint else ""))
    text = str(e)
    if "Traceback (most recent call last)" in text:  # ml_collections: get_config raised
        last = [line for line in text.splitlines() if line.strip()][-1]
        flag = re.match(r"flag (--config=\S+):", text)
        message = re.sub(r"^\w+(Error|Exception): ", "", last.strip())
        return f"{flag.group(1)}: {message}" if flag else message
    text = re.sub(r"^flag (--)", r"\1", text)  # absl: "flag --config.x=y: why"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_command_line(argv: Sequence[str],
                       define_flags: Callable[[flags.FlagValues], None] = lambda fv: None,
                       config_help: str = "configs/<file>.py:<arg>", doc: str = "",
                       example: str = "", required: Sequence[str] = ()) -> flags.FlagValues:
    """Parse `argv` (argv[0] is the program) with a `--config` config-file flag and the flags
    `define_flags` adds; the config file is loaded here, so a missing or broken file raises
    CommandLineError now rather than at first use, with one line naming the flag, as does a
    flag of `required` (e.g. "config", "workdir") left unset.

    `--help` or `-h` anywhere prints `doc` (the command's docstring), every flag with its
    default and the `example` command to stdout, then exits with status 0 (SystemExit) without
    loading the config."""
    argv = list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv,
                                    lock_config=True)
    define_flags(fv)
    if help_requested(argv):
        sys.stdout.write(help_text(fv, doc, example, required))
        sys.stdout.flush()
        raise SystemExit(0)
    spec = _config_spec(argv)
    if spec is not None:
        _check_config_file(spec, config_help)
    saved, sys.argv = sys.argv, argv  # config_flags reads the --config.key overrides here
    try:
        fv(argv)
        if fv.config is not None:
            fv.config.to_dict()  # loaded lazily: a missing or broken file raises here
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError,
            SyntaxError) as e:
        # ml_collections: KeyError (did-you-mean) for a misspelt key, TypeError/ValueError for
        # a value of the wrong type; absl: flags.Error; the config file itself may raise too.
        if isinstance(e, SyntaxError):
            raise CommandLineError(f"--config {spec}: {e.filename} line {e.lineno} does not "
                                   f"parse: {e.msg}") from None
        raise CommandLineError(_message(e, argv)) from None
    finally:
        sys.argv = saved
    missing = [f"--config {config_help}" if name == "config" else f"--{name}"
               for name in required if fv[name].value is None]
    if missing:
        raise CommandLineError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                               " required; see --help")
    return fv


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `spec` ("path/to/file.py:arg" or "path/to/file.py") with `overrides`
    ("--config.key=value" strings) applied, as `cfm.train --config spec ...` would see it."""
    return parse_command_line(["cfm", "--config", spec, *overrides]).config
