"""`cfm.objectives` is the one map from `config.objective` to an implementation: both configs
get theirs, an unknown name is refused with the choices, and no other module of cfm branches on
the objective's name."""

import re

import ml_collections
import pytest

from cfm import objectives
from cfm.config_check import ConfigError
from cfm.ssl import align, dinov2, mgm
from cfm.ssl.objective import Objective
from tests.conftest import ROOT, load_config


@pytest.mark.parametrize("name, expected", [("dino_vit.py", dinov2.OBJECTIVE),
                                            ("omics_mgm.py", mgm.OBJECTIVE)])
def test_each_config_gets_its_objective(name, expected):
    config = load_config(name, "test")
    got = objectives.get(config)
    assert got is expected and isinstance(got, Objective)
    assert got.name == config.objective
    assert objectives.get(config.to_dict()) is expected  # a checkpoint's config dict


def test_objective_fields():
    assert (dinov2.OBJECTIVE.name, dinov2.OBJECTIVE.unit, dinov2.OBJECTIVE.export_tree) == (
        "dinov2", "images", "teacher")
    assert (mgm.OBJECTIVE.name, mgm.OBJECTIVE.unit, mgm.OBJECTIVE.export_tree) == (
        "mgm", "samples", "params")
    assert objectives.OBJECTIVES == {"dinov2": dinov2.OBJECTIVE, "mgm": mgm.OBJECTIVE,
                                     "align": align.OBJECTIVE}


def test_config_without_objective_is_dinov2():
    """Configs and checkpoints from before `config.objective` existed."""
    config = load_config("dino_vit.py", "test").to_dict()
    del config["objective"]
    assert objectives.get(config) is dinov2.OBJECTIVE


def test_unknown_objective_names_the_choices():
    config = ml_collections.ConfigDict(load_config("dino_vit.py", "test").to_dict())
    config.objective = "simclr"
    with pytest.raises(ConfigError, match=r"config.objective='simclr': choose one of "
                                          r"\['align', 'dinov2', 'mgm'\]"):
        objectives.get(config)


# Ways a module could test which objective a config names: `... objective == / != / in ...`,
# `.get("objective"`, `["objective"]`, `getattr(config, "objective"`, or the old is_mgm().
BRANCH = re.compile(r"""objective\s*(==|!=|\bin\b|\bnot\s+in\b)"""
                    r"""|\bget\(\s*["']objective["']"""
                    r"""|\[\s*["']objective["']\s*\]"""
                    r"""|getattr\([^)]*["']objective["']"""
                    r"""|\bis_mgm\(""")


def test_branch_pattern_catches_the_usual_forms():
    for line in ['if config.objective == "mgm":', "x = config.get('objective', 'dinov2')",
                 'net = "params" if config["objective"] != "dinov2" else "teacher"',
                 'if is_mgm(config):', 'if c.objective in ("mgm",):',
                 'getattr(config, "objective", None)']:
        assert BRANCH.search(line), line
    for line in ["s.objective.batches(config, 0, 0, 1)", "objective = objectives.get(config)",
                 "from cfm.ssl.objective import Objective", "unit=s.objective.unit"]:
        assert not BRANCH.search(line), line


def test_only_cfm_objectives_looks_at_config_objective():
    """Everything else asks the objective (`objectives.get(config).<field>`): a new objective
    is one line in cfm/objectives.py, not a hunt for branches."""
    found = []
    for path in sorted((ROOT / "cfm").rglob("*.py")):
        if path == ROOT / "cfm" / "objectives.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if BRANCH.search(code):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "branches on config.objective outside cfm/objectives.py:\n" + "\n".join(
        found)
