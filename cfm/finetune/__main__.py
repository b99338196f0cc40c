"""`python -m cfm.finetune --config configs/finetune/<task>.py:<arg> --workdir DIR
[--config.key=value ...]`: parse flags as cfm.train does, run the task, exit 2 with a one-line
message on a bad command line, bad config or bad input (FinetuneError)."""

from __future__ import annotations

import signal
import sys

from absl import flags

from cfm import config_loader, finetune


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on a bad command line, config or input."""
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("workdir", None, "where results.json, report.md and plots go",
                            flag_values=fv)

    try:
        flags_def = config_loader.parse_command_line(
            sys.argv if argv is None else argv, define, "configs/finetune/<task>.py:<arg>")
    except config_loader.CommandLineError as e:
        print(f"cfm.finetune: bad command line: {e}", file=sys.stderr)
        return 2
    config = flags_def.config
    if config is None or flags_def.workdir is None:
        print("cfm.finetune: both --config configs/finetune/<task>.py:<arg> and --workdir DIR "
              "are required", file=sys.stderr)
        return 2
    # SIGTERM (kill, a scheduler's preemption) becomes SystemExit, so the staging folder is
    # removed on the way out instead of being left next to the workdir
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = finetune.run(config, flags_def.workdir)
    except finetune.FinetuneError as e:
        print(f"cfm.finetune: bad input: {e}", file=sys.stderr)
        return 2
    summary = results.get("summary_line") if isinstance(results, dict) else None
    print(f"cfm.finetune: done; results in {flags_def.workdir}" + (f" ({summary})" if summary
                                                                  else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
