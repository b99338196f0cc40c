"""Real processes on Flower's Deployment Runtime (not the deprecated start_server /
start_client): the server is a SuperLink plus the ServerApp it runs (`flwr run`), each site a
SuperNode whose ClientApp processes train on the site's data.

- `serve`: start `flower-superlink` on `server.address`, submit the app folder (a
  pyproject.toml naming cfm.federated.apps) with `flwr run`, stream its log, stop the
  SuperLink when the run ends; result.json or error.txt in the workdir say how it ended.
- `join`: check the site has data and the server answers, then run `flower-supernode` with
  the site's node config (`site`, `cfm-config`, `cfm-overrides`).
- `local`: one machine: the server and one client process per site of `data.sites`, the
  pattern of launch.local (children die with the launcher).

HTTP without TLS on localhost (`--insecure`); across hospitals give the SuperLink certificates
(Flower's `--ssl-*` flags) and SuperNode authentication.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from cfm.federated.sites import FederatedError
from cfm.finetune.fusion_data import split_list
from launch.local import _die_with_parent, free_port

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "cfm-federated"
version = "1.0.0"
description = "cfm federated fine-tuning"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "cfm"

[tool.flwr.app.components]
serverapp = "cfm.federated.apps:server_app"
clientapp = "cfm.federated.client:app"

[tool.flwr.app.config]
cfm-config = {spec}
cfm-overrides = {overrides}
workdir = {workdir}
"""


def _q(s: str) -> str:
    if '"' in s or "\\" in s:
        raise FederatedError(f"{s!r}: quotes and backslashes cannot travel in Flower's config")
    return f'"{s}"'


def abs_spec(spec: str) -> str:
    """`file.py:arg` with the file made absolute (Flower's processes run elsewhere)."""
    path, sep, arg = spec.partition(":")
    return os.path.abspath(path) + sep + arg


def _env() -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)  # flwr-serverapp / flwr-clientapp found here
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1"}


def _exe(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def reachable(address: str, timeout_s: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout_s` seconds."""
    host, port = address.rsplit(":", 1)
    t0 = time.time()
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.time() - t0 > timeout_s:
                return False
            time.sleep(0.3)


def write_app(workdir: str, spec: str, overrides: list[str], address: str) -> tuple[str, str]:
    """The Flower app folder and FLWR_HOME (CLI config naming this SuperLink) in workdir."""
    app = os.path.join(workdir, "flower_app")
    home = os.path.join(workdir, "flower_home")
    for d in (app, home):
        os.makedirs(d, exist_ok=True)
    text = PYPROJECT.format(spec=_q(abs_spec(spec)),
                            overrides=_q(" ".join(overrides)),
                            workdir=_q(os.path.abspath(workdir)))
    for path, body in ((os.path.join(app, "pyproject.toml"), text),
                       (os.path.join(home, "config.toml"),
                        f'[superlink]\ndefault = "cfm"\n\n[superlink.cfm]\naddress = '
                        f'"{address}"\ninsecure = true\n')):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(body)
        os.replace(path + ".tmp", path)
    return app, home


def serve(spec: str, overrides: list[str], workdir: str, address: str) -> dict:
    """Start the SuperLink, run the federation to its end, stop the SuperLink."""
    host, port = address.rsplit(":", 1)
    if reachable(address, 0.0):
        raise FederatedError(f"{address} is already in use (another server?); set "
                             "--config.server.address")
    os.makedirs(workdir, exist_ok=True)
    for f in ("error.txt", "result.json"):
        if os.path.exists(os.path.join(workdir, f)):
            os.remove(os.path.join(workdir, f))
    app, home = write_app(workdir, spec, overrides, address)
    env = {**_env(), "FLWR_HOME": home}
    link = subprocess.Popen(
        [_exe("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", host, "--port", port, "--database", os.path.join(home, "state.db")],
        env=env, stdout=open(os.path.join(workdir, "superlink.log"), "a"),
        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        if not reachable(address, 60.0):
            raise FederatedError(f"the SuperLink did not start on {address} (see "
                                 f"{workdir}/superlink.log)")
        time.sleep(1.0)
        subprocess.run([_exe("flwr"), "run", app, "cfm", "--stream"], env=env, check=False,
                       cwd=workdir)
    finally:
        link.terminate()
        try:
            link.wait(timeout=10)
        except subprocess.TimeoutExpired:
            link.kill()
    err = os.path.join(workdir, "error.txt")
    if os.path.exists(err):
        raise FederatedError(open(err, encoding="utf-8").read().strip())
    if not os.path.exists(os.path.join(workdir, "result.json")):
        raise FederatedError(f"the run ended without a result (see {workdir}/superlink.log)")
    with open(os.path.join(workdir, "result.json"), encoding="utf-8") as fh:
        return json.load(fh)


def join(spec: str, overrides: list[str], site: str, address: str, wait_s: float) -> int:
    """Run this site's SuperNode until it is stopped; FederatedError first if the site has
    no data or the server does not answer within `wait_s` seconds."""
    from cfm.federated.client import load_site  # loads JAX: after the cheap checks above
    load_site(spec, " ".join(overrides), site)  # FederatedError: no data, bad config
    if not reachable(address, wait_s):
        raise FederatedError(f"the server at {address} is unreachable (waited {wait_s:.0f} s); "
                             "is `python -m cfm.federated server` running there?")
    node_config = (f"site={_q(site)} cfm-config={_q(abs_spec(spec))} "
                   f"cfm-overrides={_q(' '.join(overrides))}")
    node = subprocess.Popen([_exe("flower-supernode"), "--insecure", "--superlink", address,
                             "--port", str(free_port()), "--node-config", node_config],
                            env=_env(), preexec_fn=_die_with_parent)  # dies with this client
    try:
        return node.wait()
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()


def local(spec: str, overrides: list[str], workdir: str, sites: str) -> int:
    """The server and one client per site on this machine; the server's exit status."""
    os.makedirs(workdir, exist_ok=True)
    me = [sys.executable, "-m", "cfm.federated"]
    cfg = ["--config", spec, *overrides]
    server = subprocess.Popen(me + ["server", *cfg, "--workdir", workdir], env=_env(),
                              preexec_fn=_die_with_parent)
    clients = []
    for s in split_list(sites):
        log = open(os.path.join(workdir, f"client_{s}.log"), "a")
        clients.append(subprocess.Popen(me + ["client", *cfg, "--site", s], env=_env(),
                                        stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent))
    try:
        return server.wait()
    finally:
        for c in clients:
            c.terminate()
        for c in clients:
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
