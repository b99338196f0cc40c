"""One way to read a config: `--config FILE.py:ARG` plus `--config.key=value` overrides.

Every command line (`cfm.train`, `cfm.aot`, `cfm.finetune`) parses its flags with
`parse_command_line`; launchers, tests and benchmarks build a config with `load_config`, which
runs the same parser, so an override means the same thing everywhere: ml_collections' config
flags import FILE.py by path, call `get_config(ARG)`, then apply the overrides with their types
checked (a misspelt key or a value of the wrong type is an error that names it).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class CommandLineError(ValueError):
    """A bad flag, config file, preset, key or value; the message says which."""


def parse_command_line(argv: Sequence[str],
                       define_flags: Callable[[flags.FlagValues], None] = lambda fv: None,
                       config_help: str = "configs/<file>.py:<arg>") -> flags.FlagValues:
    """Parse `argv` (argv[0] is the program) with a `--config` config-file flag and the flags
    `define_flags` adds; the config file is loaded here, so a missing or broken file raises
    CommandLineError now rather than at first use."""
    argv = list(argv)
    fv = flags.FlagValues()
    saved, sys.argv = sys.argv, argv  # config_flags reads the --config.key overrides here
    try:
        config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv,
                                        lock_config=True)
        define_flags(fv)
        fv(argv)
        if fv.config is not None:
            fv.config.to_dict()  # loaded lazily: a missing or broken file raises here
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        # ml_collections: KeyError (did-you-mean) for a misspelt key, TypeError/ValueError for
        # a value of the wrong type; absl: flags.Error; the config file itself may raise too.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CommandLineError(str(msg)) from None
    finally:
        sys.argv = saved
    return fv


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `spec` ("path/to/file.py:arg" or "path/to/file.py") with `overrides`
    ("--config.key=value" strings) applied, as `cfm.train --config spec ...` would see it."""
    return parse_command_line(["cfm", "--config", spec, *overrides]).config
