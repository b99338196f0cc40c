"""cfm.export and cfm.load_pretrained: the teacher backbone of a checkpoint saved on an 8-device
FSDP mesh round-trips through orbax and safetensors exports (float32 exactly, bfloat16 closely),
config.json records architecture, tile preprocessing and provenance, timm exports have timm's
names and shapes (and, where torch and timm are installed, timm's embeddings), bad inputs exit 2
naming the path, and a failed export leaves nothing behind."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cfm
from cfm import checkpoint, export, objectives, pretrained, setup
from cfm.models import vit
from tests.conftest import ROOT, damage_checkpoint, load_config
from tests.test_train import _tiny

STEPS = (2, 4)


def _fake_tiles(folder) -> None:
    """A data_prep.tile_wsi --out folder as far as export reads it: manifest.csv, config.json."""
    folder.mkdir(parents=True)
    rows = [{"shard": "tiles-00000.array_record", "index": i, "slide_id": "ab" * 8, "x": i,
             "y": 0, "level": 0, "mpp": mpp, "tissue_fraction": 1.0, "cohort": ""}
            for i, mpp in enumerate([0.5, 0.5, 1.0])]
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "config.json").write_text(json.dumps({"mpp": [0.5, 1.0], "tile_size": 224}))


def _backbone(c):
    """The backbone module the run of config `c` trains."""
    objective = objectives.get(c)
    return objective.build_models(objective.prepare_config(c)).backbone


def _make_workdir(path, steps=STEPS, **overrides):
    """A cfm.train workdir whose checkpoints hold a FSDP-sharded state (8 devices unless
    `overrides` change config.mesh) with a teacher that differs from the student and between
    steps. Returns (config, {step: teacher backbone}, student backbone) as numpy."""
    c = _tiny(**{"mesh.data": 1, "mesh.fsdp": 8, "sharding.min_shard_size": 0, **overrides})
    s = setup.setup(c, devices=jax.devices()[:c.mesh.data * c.mesh.fsdp * c.mesh.tensor])
    c, state = s.config, setup.create_state(s)
    mngr = checkpoint.manager(str(path), c)
    teachers = {}
    for s in steps:
        rng = np.random.default_rng(s)
        teacher = jax.tree.map(lambda x: jax.device_put(
            np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), x.sharding),
            state.teacher)
        checkpoint.save(mngr, s, state.replace(step=jnp.asarray(s, jnp.int32), teacher=teacher),
                        c, force=True)
        teachers[s] = jax.device_get(teacher["backbone"])
    mngr.wait_until_finished()
    mngr.close()
    return c, teachers, jax.device_get(state.params["backbone"])


def _images(size: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)


def _embed(module, params, x) -> np.ndarray:
    """[B, 1 + R + N, D]: CLS, registers and patch tokens after the final norm."""
    out = module.apply({"params": params}, x)
    return np.asarray(jnp.concatenate([out["cls"][:, None], out["registers"], out["patch"]], 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, config, teachers, student): registers, LayerScale, GELU MLP, shard data."""
    root = tmp_path_factory.mktemp("export")
    _fake_tiles(root / "tiles")
    c, teachers, student = _make_workdir(root / "run", **{
        "model.num_registers": 2, "data.source": "shards", "data.path": str(root / "tiles")})
    return root / "run", c, teachers, student


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trips_in_jax(run, tmp_path, fmt, dtype):
    workdir, c, teachers, student = run
    out = tmp_path / "model"
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--format", fmt,
                        "--dtype", dtype]) == 0
    model, params = cfm.load_pretrained(str(out))
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
    x = _images(c.model.img_size)
    backbone = _backbone(c)
    want = _embed(backbone, teachers[4], x)  # the latest step's teacher
    got = _embed(model, params, x)
    if dtype == "float32":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())
        assert not np.array_equal(got, want)
    assert np.abs(_embed(backbone, student, x) - want).max() > 0.01  # teacher, not student
    stored = pretrained.load(str(out), param_dtype=None).params
    assert {v.dtype.name for v in jax.tree.leaves(stored)} == {dtype}


def test_config_json_records_architecture_preprocessing_provenance(run, tmp_path):
    workdir, c, _, _ = run
    out = tmp_path / "model"
    assert export.main(["--workdir", str(workdir), "--step", "2", "--out", str(out),
                        "--format", "safetensors"]) == 0
    info = json.loads((out / "config.json").read_text())
    s = vit.spec(c.model.variant)
    want = {"variant": "vit_test", "width": s.width, "depth": s.depth, "heads": s.heads,
            "patch": s.patch, "num_registers": 2, "layerscale": 0.1, "ffn": "mlp",
            "img_size": 32, "qkv_bias": True}
    assert {k: info["architecture"][k] for k in want} == want
    prep = info["preprocessing"]
    assert prep["mean"] == list(c.augment.mean) and prep["std"] == list(c.augment.std)
    assert prep["tile_size_px"] == 224 and prep["microns_per_pixel"] == [0.5, 1.0]
    prov = info["provenance"]
    manifest = workdir.parent / "tiles" / "manifest.csv"
    assert prov["data_manifests"] == [{"path": "manifest.csv", "tiles": 3, "sha256":
                                       hashlib.sha256(manifest.read_bytes()).hexdigest()}]
    assert prov["step"] == 2 and prov["training_config"] == json.loads(
        json.dumps(c.to_dict())) and prov["cfm_version"] and prov["export_time_utc"]
    assert info["export"] == {"format": "safetensors", "dtype": "float32"}
    assert "cfm.load_pretrained" in (out / "README.md").read_text()
    # flat "a.b.c" keys of the cfm tree; the step-2 teacher
    from safetensors.numpy import load_file

    flat = load_file(str(out / "model.safetensors"))
    assert "block_1.attn.qkv_kernel" in flat and "mask_token" in flat
    np.testing.assert_array_equal(flat["block_0.mlp.fc1.kernel"],
                                  run[2][2]["block_0"]["mlp"]["fc1"]["kernel"])


def test_load_pretrained_reads_workdirs_and_scanned_runs(run, tmp_path):
    workdir, c, teachers, _ = run
    x = _images(c.model.img_size)
    backbone = _backbone(c)
    for step in (None, 2):
        model, params = cfm.load_pretrained(str(workdir), step=step)
        np.testing.assert_array_equal(_embed(model, params, x),
                                      _embed(backbone, teachers[step or 4], x))
    # a run trained with nn.scan over blocks exports (and loads) in the per-block layout
    cs, ts, _ = _make_workdir(tmp_path / "scan", steps=(1,),
                              **{"model.scan_layers": True, "mesh.fsdp": 1})
    out = tmp_path / "scan_export"
    assert export.main(["--workdir", str(tmp_path / "scan"), "--out", str(out),
                        "--format", "orbax"]) == 0
    model, params = cfm.load_pretrained(str(out))
    assert "block_1" in params and "blocks" not in params and not model.scan_layers
    np.testing.assert_allclose(_embed(model, params, x),
                               _embed(_backbone(cs), ts[1], x),
                               rtol=1e-5, atol=1e-5)


# ================================================================================ timm ========
def _expected_timm(d, depth, n_patches, patch, regs, layerscale, fc1, fc2_in, qkv_bias=True):
    """timm VisionTransformer state-dict shapes for the given sizes (written out by hand)."""
    keys = {"cls_token": (1, 1, d),
            "pos_embed": (1, n_patches, d) if regs else (1, 1 + n_patches, d),
            "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    if regs:
        keys["reg_token"] = (1, regs, d)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                     b + "attn.qkv.weight": (3 * d, d), b + "attn.proj.weight": (d, d),
                     b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                     b + "mlp.fc1.weight": (fc1, d), b + "mlp.fc1.bias": (fc1,),
                     b + "mlp.fc2.weight": (d, fc2_in),
                     b + "mlp.fc2.bias": (d,)})
        if qkv_bias:
            keys[b + "attn.qkv.bias"] = (3 * d,)
        if layerscale:
            keys.update({b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)})
    return keys


@pytest.mark.parametrize("model_cfg,fc1,fc2_in,kwargs", [
    (dict(num_registers=0, layerscale_init=0.0, ffn="mlp"), 64, 64,
     dict(no_embed_class=False, reg_tokens=0)),
    (dict(num_registers=4, layerscale_init=1e-5, ffn="mlp"), 64, 64,
     dict(no_embed_class=True, init_values=1e-5, reg_tokens=4)),
    (dict(num_registers=0, layerscale_init=0.1, ffn="swiglu"), 96, 48,  # swiglu_hidden(64)=48
     dict(no_embed_class=False, init_values=0.1, mlp_layer="SwiGLUPacked", act_layer="silu")),
])
def test_timm_names_shapes_and_kwargs_without_torch(model_cfg, fc1, fc2_in, kwargs):
    arch = pretrained.architecture(dict(variant="vit_test", img_size=32, qkv_bias=True,
                                        **model_cfg))
    shapes = pretrained.abstract_params(arch)
    params = jax.tree.map(lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(
        np.float32), shapes)
    sd = export.to_timm(params, arch)
    want = _expected_timm(32, 2, 16, 8, model_cfg["num_registers"],
                          model_cfg["layerscale_init"], fc1, fc2_in)
    assert {k: v.shape for k, v in sd.items()} == want
    spec = export.timm_spec(arch, {"mean": [0.5] * 3, "std": [0.2] * 3})
    kw = spec["kwargs"]
    assert int(kw["embed_dim"] * kw["mlp_ratio"]) == fc1  # timm's hidden-size rule
    assert {k: kw[k] for k in kwargs} == kwargs
    assert ("init_values" in kw) == bool(model_cfg["layerscale_init"])
    assert (kw["patch_size"], kw["img_size"], kw["depth"], kw["num_heads"]) == (8, 32, 2, 2)
    # layouts: qkv rows are (q|k|v, head, dim); conv weight [out, in, kh, kw]; CLS pos folded
    np.testing.assert_array_equal(sd["blocks.0.attn.qkv.weight"][32 + 16 + 3],
                                  params["block_0"]["attn"]["qkv_kernel"][:, 1, 1, 3])
    np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 1, 4],
                                  params["patch_embed"]["kernel"][1, 4, 2, 5])
    cls = params["cls_token"] + (params["pos_embed"][:, :1] if model_cfg["num_registers"] else 0)
    np.testing.assert_array_equal(sd["cls_token"], cls)
    call = export.timm_call(spec, "/m/model.safetensors")
    assert "pretrained_cfg_overlay=dict(\n        file='/m/model.safetensors'," in call
    assert ("mlp_layer=SwiGLUPacked" in call) == (model_cfg["ffn"] == "swiglu")
    with pytest.raises(export.ExportError, match="moe"):  # what timm cannot build is refused
        export.timm_spec(dict(arch, ffn="moe"), {"mean": [0.5] * 3, "std": [0.2] * 3})


def test_timm_export_file_and_readme(run, tmp_path, capsys):
    workdir, _, _, _ = run
    out = tmp_path / "timm"
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model(" in printed and str(out / "model.safetensors") in printed
    assert printed.split("load it with\n")[1].strip() in (out / "README.md").read_text()
    from safetensors.numpy import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in sd.items()} == _expected_timm(32, 2, 16, 8, 2, 0.1, 64, 64)
    with pytest.raises(pretrained.CheckpointError, match="timm"):
        cfm.load_pretrained(str(out))


@pytest.mark.parametrize("overrides", [
    {"model.num_registers": 0, "model.layerscale_init": 0.0},  # plain ViT with CLS
    {"model.num_registers": 4, "model.layerscale_init": 1e-5},  # registers + LayerScale
    {"model.ffn": "swiglu", "model.qkv_bias": False},  # SwiGLU (and no qkv bias)
], ids=["plain", "registers_layerscale", "swiglu"])
def test_timm_embeddings_match_jax(tmp_path, overrides):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install torch timm)")
    pytest.importorskip("timm", reason="timm not installed (pip install timm)")
    c, teachers, _ = _make_workdir(tmp_path / "run", steps=(1,), **overrides)
    out = tmp_path / "timm"
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out),
                        "--format", "timm"]) == 0
    info = json.loads((out / "config.json").read_text())
    namespace: dict = {}
    exec(export.timm_call(info["export"]["timm"], str(out / "model.safetensors")), namespace)
    model = namespace["model"]
    backbone = _backbone(c)
    for size in (c.model.img_size, 48):  # the stored grid, and position embeddings upsampled
        x = _images(size)
        want = _embed(backbone, teachers[1], x)
        with torch.no_grad():
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            pooled = model(xt).numpy()
            tokens = model.forward_features(xt).numpy()
        diff = max(np.abs(pooled - want[:, 0]).max(), np.abs(tokens - want).max())
        print(f"timm vs JAX ({'/'.join(f'{k}={v}' for k, v in overrides.items())}, {size} px): "
              f"max |diff| {diff:.2e}, max |x| {np.abs(want).max():.2f}")
        assert diff < 1e-4


# ================================================================================ errors ======
def test_bad_inputs_exit_2_naming_the_path(run, tmp_path, capsys):
    workdir, _, _, _ = run

    def fails(args, *needles):
        assert export.main(args + ["--format", "orbax"]) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err
        return err

    fails(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")], str(tmp_path),
          "checkpoints")
    fails(["--workdir", str(workdir), "--step", "3", "--out", str(tmp_path / "o")],
          str(workdir / "checkpoints"), "[2, 4]")
    # damaged checkpoints: weights truncated; config garbled
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    damage_checkpoint(broken / "checkpoints" / "4")
    fails(["--workdir", str(broken), "--out", str(tmp_path / "o")],
          str(broken / "checkpoints" / "4"), "damaged")
    (broken / "checkpoints" / "2" / "config" / "metadata").write_text("{not json")
    fails(["--workdir", str(broken), "--step", "2", "--out", str(tmp_path / "o")],
          str(broken / "checkpoints" / "2"), "damaged")
    assert not (tmp_path / "o").exists()
    # a non-empty --out is refused unless --overwrite
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    fails(["--workdir", str(workdir), "--out", str(tmp_path / "full")], str(tmp_path / "full"),
          "--overwrite")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "full"),
                        "--format", "orbax", "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "full")) == ["README.md", "config.json", "params"]
    with pytest.raises(FileNotFoundError, match="neither"):
        cfm.load_pretrained(str(tmp_path / "o"))


def test_failed_export_leaves_nothing_behind(run, tmp_path, monkeypatch, capsys):
    workdir, _, _, _ = run
    good = tmp_path / "good"
    assert export.main(["--workdir", str(workdir), "--out", str(good),
                        "--format", "safetensors"]) == 0
    before = {p: (good / p).read_bytes() for p in os.listdir(good)}

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_readme", boom)  # fails after the weights are written
    for out, extra in ((tmp_path / "new", []), (good, ["--overwrite"])):
        capsys.readouterr()
        assert export.main(["--workdir", str(workdir), "--out", str(out), "--format", "timm"]
                           + extra) == 1  # a write failure: not a bug, not bad input
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "disk full" in err[0], err
    assert not (tmp_path / "new").exists()
    assert {p: (good / p).read_bytes() for p in os.listdir(good)} == before  # old one intact
    assert sorted(os.listdir(tmp_path)) == ["good"]  # no temporary folders left


def test_cli_on_a_one_device_host(run, tmp_path):
    """As a user runs it: a fresh process with one CPU device exports the 8-device run."""
    workdir, c, teachers, _ = run
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "cfm.export", "--workdir", str(workdir), "--format",
           "safetensors", "--out"]
    proc = subprocess.run(cmd + [str(tmp_path / "m")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, params = cfm.load_pretrained(str(tmp_path / "m"))
    x = _images(c.model.img_size)
    np.testing.assert_array_equal(_embed(model, params, x),
                                  _embed(_backbone(c), teachers[4], x))
    proc = subprocess.run(cmd + [str(tmp_path / "m")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_of_a_synthetic_data_run_says_what_is_unknown(tmp_path, caplog):
    """A run without a tile manifest (synthetic data): README.md says in words that tile size
    and microns per pixel are unknown, and why, instead of printing None (issue 15). Reading
    the valid checkpoint logs no orbax warning (such as "Metadata file does not exist")."""
    workdir = tmp_path / "run"
    _make_workdir(workdir, steps=(2,), **{"mesh.fsdp": 1})
    out = tmp_path / "model"
    caplog.set_level("WARNING")
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--format",
                        "safetensors"]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    readme = (out / "README.md").read_text()
    assert "None" not in readme and "null" not in readme
    assert ("tiles' size and microns per pixel are unknown (data.source='synthetic': no tile "
            "manifest)") in readme


@pytest.mark.parametrize("tiles,words", [
    ({"tile_size_px": 224, "microns_per_pixel": [0.5, 1.0]},
     "tiles of 224 px at 0.5 or 1.0 um/px"),
    ({"tile_size_px": None, "microns_per_pixel": [0.5]}, "at 0.5 um/px, of a size not recorded"),
    ({"tile_size_px": [224, 256], "microns_per_pixel": None},
     "tiles of 224 or 256 px, microns per pixel not recorded"),
])
def test_readme_words_for_partly_known_tiles(tiles, words):
    """Tile size or microns per pixel known, the other not: the README names what it knows."""
    c = load_config().to_dict()
    info = export.build_info(c, 3, "orbax", "float32")
    info["preprocessing"].update(tiles)
    readme = export._readme(info, "/models/m")
    assert words in readme and "None" not in readme


def test_omics_readme_without_the_prepared_files_says_so(tmp_path):
    """An omics export whose prepared data is not on the exporting machine says which files it
    lacks and why, instead of pointing at a vocab.tsv that is not there."""
    c = load_config("omics_mgm.py").to_dict()
    c["data"]["path"] = str(tmp_path / "gone")
    readme = export._readme(export.build_info(c, 3, "safetensors", "float32"), "/models/m")
    assert "None" not in readme
    assert "This export lacks vocab.tsv, stats.json, manifest.json (data.source=" in readme
