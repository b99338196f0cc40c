"""Exit status: 0 when done (results in --workdir); 2 for a bad command line, config, workdir
or input (FinetuneError): one line on stderr naming it, nothing written; 1 for a bug in cfm,
with its traceback. The work happens in a staging folder beside --workdir, renamed into place
only when the task succeeds."""

from __future__ import annotations

import sys

from cfm import preemption

if __name__ == "__main__":  # before the imports below load JAX (seconds): a signal
    preemption.note_signals()  # meanwhile is noted, then acted on (cfm.preemption)

from absl import flags

from cfm import config_loader, errors, finetune


def _main(argv: list[str]) -> None:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("workdir", None, "where results.json, report.md and plots go (a "
                            "new folder, or one to replace with --config.overwrite=True)",
                            flag_values=fv)

    flags_def = config_loader.parse_command_line(
        argv, define, "configs/finetune/<task>.py:<arg>", doc=f"{finetune.__doc__}\n{__doc__}",
        required=("config", "workdir"),
        example="python -m cfm.finetune --config configs/finetune/icb_response.py:test "
                "--workdir /tmp/cfm_icb")
    errors.check_workdir(flags_def.workdir)  # a file, /proc, read-only: refused, nothing made
    config = flags_def.config
    # SIGTERM / SIGINT: the staging folder is removed on the way out, one line says so, exit
    # 143 / 130 (cfm.preemption)
    with preemption.stop_on_signals("cfm.finetune", preemption.folder_kept(flags_def.workdir)):
        results = finetune.run(config, flags_def.workdir)
        summary = results.get("summary_line") if isinstance(results, dict) else None
        print(f"cfm.finetune: done; results in {flags_def.workdir}"
              + (f" ({summary})" if summary else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 (one line on stderr) on a bad command line, config, workdir or
    input, 1 (with the traceback) on a bug."""
    return errors.run_cli("cfm.finetune", lambda: _main(sys.argv if argv is None else argv), {
        config_loader.CommandLineError: "bad command line", finetune.FinetuneError: "bad input"})


if __name__ == "__main__":
    preemption.exit_now(main())  # no interpreter teardown under XLA's threads (cfm.preemption)
