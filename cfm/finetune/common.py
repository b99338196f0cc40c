"""What every `cfm.finetune` task shares: the bad-input error, config checks, the staged
workdir (results go to a temp folder next to the workdir and are renamed into place at the
end by `cfm.atomic.atomic_folder`, so a failed or interrupted run leaves nothing half-written
and never replaces earlier results unless `overwrite=True`), and JSON conversion of numpy
values.

A task module is `cfm.finetune.<name>` with `run(config, workdir) -> dict`; `workdir` is the
fresh, empty staging folder. The dispatcher (`cfm.finetune.run`) writes `config.json`, and
writes the returned dict as `results.json` if the task did not write one itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator

import numpy as np

from cfm.atomic import atomic_folder


class FinetuneError(ValueError):
    """Bad input for a fine-tuning job (config, labels, features); the CLI exits with status 2.
    The message names the offending input (config key, file, cohort, modality)."""


def check(cond: bool, key: str, value: Any, why: str) -> None:
    """Raise FinetuneError("config.<key>=<value>: <why>") unless `cond`."""
    if not cond:
        raise FinetuneError(f"config.{key}={value!r}: {why}")


def to_jsonable(x: Any) -> Any:
    """numpy scalars/arrays, tuples and NaN -> plain JSON values (NaN/inf -> None)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON at `path`, numpy values converted by `to_jsonable`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")


def workdir_has_results(workdir: str) -> bool:
    """True if `workdir` exists and is not an empty folder."""
    return os.path.exists(workdir) and (not os.path.isdir(workdir) or bool(os.listdir(workdir)))


@contextlib.contextmanager
def staged_workdir(workdir: str, overwrite: bool) -> Iterator[str]:
    """Yield a fresh temp folder next to `workdir`; on success it replaces `workdir`
    (`cfm.atomic.atomic_folder`).

    FinetuneError before any work if `workdir` already holds something and not `overwrite`.
    On an exception the temp folder is removed and `workdir` is left as it was."""
    workdir = os.path.abspath(workdir)
    if workdir_has_results(workdir) and not overwrite:
        raise FinetuneError(f"workdir {workdir} already holds results; pass "
                            "--config.overwrite=True to replace them, or choose another --workdir")
    with atomic_folder(workdir) as tmp:
        yield tmp
