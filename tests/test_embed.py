"""cfm.embed: teacher CLS embeddings for every tile in a shard folder, with the manifest keys."""

import csv
import json

import numpy as np

from cfm import embed, train
from cfm.data.sources import ShardSource, SyntheticSource
from tests.test_pipeline import _write_shards
from tests.test_train import _tiny


def test_embed_every_tile_with_keys(tmp_path, capsys):
    run = tmp_path / "run"
    train.train(_tiny(total_steps=2, log_every=1, checkpoint_every=2, **{"mesh.data": -1}),
                str(run))
    synth = SyntheticSource(7, 40, seed=1)
    _write_shards(tmp_path / "shards", [synth[i] for i in range(7)], per_shard=3)
    out = tmp_path / "emb"
    assert embed.main(["--model", str(run), "--shards", str(tmp_path / "shards"),
                       "--out", str(out), "--batch", "4", "--per-file", "5"]) == 0
    files = sorted(p.name for p in out.glob("embeddings-*.npy"))
    assert files == ["embeddings-00000-of-00002.npy", "embeddings-00001-of-00002.npy"]
    a, b = (np.load(out / f, allow_pickle=False) for f in files)
    assert a.shape == (5, 32) and b.shape == (2, 32) and a.dtype == np.float32
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [(r["file"], r["row"], r["tile"], r["x"]) for r in rows][:6] == [
        ("0", str(i), str(i), str(i)) for i in range(5)] + [("1", "0", "5", "5")]
    assert json.loads((out / "embed.json").read_text())["dim"] == 32
    # the same numbers as applying the checkpoint's teacher backbone directly
    config, backbone, params, step = embed.load_backbone(str(run))
    assert step == 2
    src = ShardSource(str(tmp_path / "shards"))
    x = embed._prepare(src[6], config.model.img_size, config.augment.mean, config.augment.std)
    direct = np.asarray(backbone.apply({"params": params}, x[None])["cls"])[0]
    np.testing.assert_allclose(b[1], direct, rtol=1e-4, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in np.concatenate([a, b])}) == 7  # tiles differ
    # a non-empty --out and a folder without checkpoints are refused with a message
    assert embed.main(["--model", str(run), "--shards", str(tmp_path / "shards"),
                       "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert embed.main(["--model", str(tmp_path), "--shards", str(tmp_path / "shards"),
                       "--out", str(tmp_path / "e2")]) == 2
    assert "checkpoints" in capsys.readouterr().err


def test_real_slide_to_tiles_to_pretraining_to_embeddings(shared_data, tmp_path):
    """The README's slide path end to end on the real H&E slide in ../shared/data/wsi."""
    from data_prep import tile_wsi

    tiles = tmp_path / "tiles"
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert tile_wsi.main(["--slides", str(slide), "--out", str(tiles), "--mpp", "0.5",
                          "--tile-size", "224"]) == 0
    n_tiles = len((tiles / "manifest.csv").read_text().splitlines()) - 1
    assert n_tiles > 20
    c = _tiny(total_steps=2, log_every=1, checkpoint_every=2, **{"mesh.data": -1})
    c.data.source, c.data.path = "shards", str(tiles)
    last = train.train(c, str(tmp_path / "run"))
    assert np.isfinite(last["loss"])
    out = tmp_path / "emb"
    assert embed.main(["--model", str(tmp_path / "run"), "--shards", str(tiles),
                       "--out", str(out)]) == 0
    assert np.load(out / "embeddings-00000-of-00001.npy").shape == (n_tiles, 32)
    rows = list(csv.DictReader(open(out / "index.csv")))
    manifest = list(csv.DictReader(open(tiles / "manifest.csv")))
    assert [(r["slide_id"], r["x"], r["y"]) for r in rows] == [
        (m["slide_id"], m["x"], m["y"]) for m in manifest]
