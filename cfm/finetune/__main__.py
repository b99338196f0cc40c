"""`python -m cfm.finetune --config configs/finetune/<task>.py:<arg> --workdir DIR
[--config.key=value ...]`: parse flags as cfm.train does, run the task, exit 2 with a one-line
message on a bad command line, bad config or bad input (FinetuneError)."""

from __future__ import annotations

import signal
import sys

from absl import flags
from ml_collections import config_flags

from cfm import finetune


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on a bad command line, config or input."""
    flags_def = flags.FlagValues()
    argv = sys.argv if argv is None else argv
    saved, sys.argv = sys.argv, argv  # config_flags finds --config.key overrides in sys.argv
    try:
        config_flags.DEFINE_config_file("config", None, "configs/finetune/<task>.py:<arg>",
                                        flag_values=flags_def, lock_config=True)
        flags.DEFINE_string("workdir", None, "where results.json, report.md and plots go",
                            flag_values=flags_def)
        flags_def(argv)
        config = flags_def.config
        if config is not None:
            config.to_dict()  # the file is loaded lazily: a missing or broken one raises here
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        # ml_collections: KeyError (did-you-mean) for a misspelt key, TypeError/ValueError for a
        # value of the wrong type; absl: flags.Error; the config file itself may raise too.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cfm.finetune: bad command line: {msg}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
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
