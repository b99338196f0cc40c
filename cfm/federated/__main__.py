"""python -m cfm.federated server|client|local --config configs/federated.py:<preset> ...

    server --workdir DIR          the SuperLink and the federation's ServerApp; resumes in DIR
    client --site NAME            this site's SuperNode (its data: the config's data.path)
    local --workdir DIR           the server and one client process per site of data.sites

Any `--config.key=value` override is passed on (the clients must use the server's model
keys: a client whose model config differs is refused with the keys named). Exit status 0 when
done, 2 with one line on stderr for a bad command line, config, site or peer, 1 for a bug.
"""

from __future__ import annotations

import sys

from absl import flags

from cfm import config_loader, errors
from cfm.federated import deploy, secagg
from cfm.federated.sites import FederatedError
from cfm.finetune.fusion_data import split_list

PROG = "cfm.federated"
MODES = ("server", "client", "local")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "server and local: checkpoints, history.jsonl, "
                        "result.json", flag_values=fv)
    flags.DEFINE_string("site", None, "client: this site's name (one of data.sites)",
                        flag_values=fv)
    flags.DEFINE_float("wait", 60.0, "client: seconds to wait for the server", flag_values=fv)


def _main(argv: list[str]) -> int:
    asks_help = config_loader.help_requested(argv)
    if not asks_help and (len(argv) < 2 or argv[1] not in MODES):
        raise config_loader.CommandLineError(f"the first argument must be one of {MODES}; "
                                             "see --help")
    mode = argv[1] if len(argv) >= 2 and argv[1] in MODES else "local"
    rest = [argv[0]] + argv[2:] if len(argv) >= 2 and argv[1] in MODES else list(argv)
    required = ("config", "site") if mode == "client" else ("config", "workdir")
    fv = config_loader.parse_command_line(
        rest, _define, "configs/federated.py:<preset>", doc=__doc__, required=required,
        example=f"python -m {PROG} local --config configs/federated.py:icb --workdir "
                "/tmp/fed_icb")
    config = fv.config
    spec = next(a.split("=", 1)[1] if a.startswith("--config=") else rest[i + 1]
                for i, a in enumerate(rest) if a in ("--config",) or a.startswith("--config="))
    overrides = [a for a in rest[1:] if a.startswith("--config.")]
    if mode != "client" and secagg.enabled(config):  # before any process starts
        secagg.check_config(config, len(split_list(config.data.sites)))
    if config.model.kind == "mgm":  # refuse a missing or wrong export before any process
        from cfm.federated import pretrain
        pretrain.check_init_from(config)
    if config.model.kind == "dino":
        from cfm.federated import dino
        dino.check_init_from(config)
    if mode == "server":
        errors.check_workdir(fv.workdir)
        res = deploy.serve(spec, overrides, fv.workdir, config.server.address)
        print(f"{PROG}: done; {res['rounds']} rounds, results in {fv.workdir}", flush=True)
        return 0
    if mode == "client":
        return deploy.join(spec, overrides, fv.site, config.server.address, fv.wait)
    errors.check_workdir(fv.workdir)
    return deploy.local(spec, overrides, fv.workdir, config.data.sites)


def main(argv: list[str] | None = None) -> int:
    """The CLI (module docstring); its exit status."""
    return errors.run_cli(PROG, lambda: _main(sys.argv if argv is None else argv),
                          {config_loader.CommandLineError: "bad command line",
                           FederatedError: ""})


if __name__ == "__main__":
    sys.exit(main())
