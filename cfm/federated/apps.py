"""The ServerApp that Flower's runtime loads (`[tool.flwr.app.components]` of the app folder
cfm.federated.deploy writes; the ClientApp is cfm.federated.client.app, kept apart so a site's
processes do not import orbax): `server_app` runs cfm.federated.server's round loop on the
SuperLink's grid.

The ServerApp reads `cfm-config`, `cfm-overrides` and `workdir` from its run config. A user
error (a client with another model config, a site without data, too few sites) is written to
`workdir/error.txt` (one line) for `python -m cfm.federated server` to report.
"""

from __future__ import annotations

import os
import shlex

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cfm import config_loader
from cfm.errors import UserError, one_line
from cfm.federated.server import run_server

ERROR_FILE = "error.txt"
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation of the run config's cfm config; a user error goes to error.txt."""
    rc = context.run_config
    workdir = str(rc["workdir"])
    try:
        config = config_loader.load_config(str(rc["cfm-config"]),
                                           shlex.split(str(rc.get("cfm-overrides", ""))))
        run_server(grid, config, workdir, log=lambda m: print(m, flush=True))
    except UserError as e:
        tmp = os.path.join(workdir, ERROR_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(one_line(e) + "\n")
        os.replace(tmp, os.path.join(workdir, ERROR_FILE))
        raise

