"""One way for an argparse command line to explain itself: `parser(module, doc, example)`.

`--help` / `-h` of every argparse CLI (cfm.export, cfm.embed, data_prep.*, launch.*,
benchmarks.*) prints the usage, the whole module docstring as written, every option with its
default (or "(required)"), and one example command; argparse exits 0 after it. The absl CLIs
(cfm.train, cfm.finetune, cfm.aot) explain themselves through `cfm.config_loader`.

A default of None, False, "" or [] says nothing by itself, so such an option is shown without
one: its help text says in words what happens when it is not given ("default: latest").
"""

from __future__ import annotations

import argparse
import inspect


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog kept as written; each option's help ends with its default,
    or with "(required)" for a required option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            tail = "(required)"
        elif action.default is None or action.default is False or action.default in ("", []):
            return text
        elif isinstance(action.default, (list, tuple)):  # as typed: --splits val test
            tail = "(default: " + " ".join(map(str, action.default)).replace("%", "%%") + ")"
        else:
            tail = "(default: %(default)s)"
        return f"{text} {tail}" if text else tail


def parser(module: str, doc: str | None, example: str) -> argparse.ArgumentParser:
    """An ArgumentParser for `python -m MODULE` whose --help shows `doc` (the module docstring)
    whole, every option's default, and `example` (one command, without a leading `$`) under
    "example:"."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=inspect.cleandoc(doc or ""),
        epilog=f"example:\n  {example}", formatter_class=HelpFormatter)
