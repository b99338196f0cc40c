"""Every preset of every config file builds and passes its checks (a typo in a preset would
otherwise only show when someone runs it)."""

import pytest

from cfm import config_check, objectives
from tests.conftest import ROOT, load_config

DINO = ["demo", "test", "vit_s16", "vit_b16", "vit_l16", "vit_g14", "uni", "phikon2"]


@pytest.mark.parametrize("arg", DINO)
def test_dino_presets_validate(arg):
    config_check.validate_dino(load_config("dino_vit.py", arg))


@pytest.mark.parametrize("arg", ["test", "demo"])
def test_omics_presets_validate(arg):
    raw = load_config("omics_mgm.py", arg)
    assert config_check.validate_mgm(raw) is None  # checks only
    c = objectives.get(raw).prepare_config(raw)  # fills vocab_size/n_bins from the data
    assert c.model.vocab_size > 2 and c.model.n_bins > 1
    assert (raw.model.vocab_size, raw.model.n_bins) == (-1, -1)  # a copy: the input unchanged


@pytest.mark.parametrize("arg", ["test", "uni", "vit_g14"])
def test_domain_adaptation_presets_shorten_and_validate(arg):
    base = load_config("dino_vit.py", arg)
    c = load_config("finetune/domain_adapt.py", arg)
    if arg != "test":
        with pytest.raises(config_check.ConfigError, match="data.path"):
            config_check.validate_dino(c)  # the new cohort's tiles must be named
        c.data.path = "/data/new_cohort_tiles"
    config_check.validate_dino(c)
    assert c.epochs == max(1, base.epochs // 10)
    assert c.optim.base_lr == pytest.approx(base.optim.base_lr / 4)
    assert c.data.source == ("synthetic" if arg == "test" else "shards")


def test_every_finetune_config_has_a_docstring_command():
    for path in sorted((ROOT / "configs" / "finetune").glob("*.py")):
        text = path.read_text()
        assert "python -m cfm." in text.split('"""')[1], path.name
