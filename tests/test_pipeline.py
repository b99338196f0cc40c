"""Sources, the grain pipeline's determinism contract across hosts / resumes, and demo_tiles."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from cfm.data import pipeline
from cfm.data.masking import sample_batch_masks
from cfm.data.pipeline import make_train_iterator, mask_buffer_size_for
from cfm.data.records import encode_tile
from cfm.data.sources import FolderSource, ShardSource, SyntheticSource, make_source
from data_prep import demo_tiles
from tests.conftest import load_config

PATCH = 8  # test preset: 32-pixel global crops -> 4 x 4 patch grid


def _config():
    c = load_config("dino_vit.py", "test")
    c.data.synthetic_size = 12  # an epoch ends mid-batch, so resumes cross epoch boundaries
    return c


def _take(config, n, **kwargs):
    it = make_train_iterator(config, patch_size=PATCH, **kwargs)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Sources ---------------------------------------------------------------------------------------

def test_synthetic_source_is_deterministic_and_varied():
    src = SyntheticSource(5, 40, seed=0)
    assert len(src) == 5
    img = src[2]
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img, SyntheticSource(5, 40, seed=0)[2])
    assert not np.array_equal(img, src[3])
    assert not np.array_equal(img, SyntheticSource(5, 40, seed=1)[2])
    assert img.std() > 10  # structured, not flat
    with pytest.raises(IndexError):
        src[5]


def test_folder_source_reads_nested_images_as_rgb(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    Image.new("L", (10, 12), 77).save(tmp_path / "b" / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "b" / "c" / "clear.PNG")
    Image.new("RGB", (9, 9), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    src = FolderSource(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in src.files] == [
            "a.jpg", os.path.join("b", "c", "clear.PNG"), os.path.join("b", "gray.png")]
    imgs = [src[i] for i in range(len(src))]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in imgs)
    assert imgs[2].shape == (12, 10, 3) and (imgs[2] == 77).all()
    assert (imgs[1] == 255).all()  # fully transparent -> white background


def test_folder_source_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        FolderSource(str(missing))
    with pytest.raises(ValueError, match="holds no"):
        FolderSource(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    src = FolderSource(str(tmp_path))
    with pytest.raises(ValueError, match="broken.png"):
        src[0]


def test_make_source_choices():
    c = _config()
    assert isinstance(make_source(c.data, 0), SyntheticSource)
    c.data.source = "tfrecord"
    with pytest.raises(ValueError, match="data.source"):
        make_source(c.data, 0)


# Pipeline --------------------------------------------------------------------------------------

def test_batch_shapes_and_mask_budget():
    c = _config()
    batches = _take(c, 3)
    b = batches[0]
    assert b["global_crops"].shape == (8, 2, 32, 32, 3) and b["global_crops"].dtype == np.uint8
    assert b["local_crops"].shape == (8, 2, 16, 16, 3) and b["local_crops"].dtype == np.uint8
    assert b["masks"].shape == (8, 2, 16) and b["masks"].dtype == bool
    bound = mask_buffer_size_for(c, PATCH)
    for b in batches:
        masked = b["masks"].reshape(16, -1).any(axis=1).sum()
        assert masked <= int(16 * c.ibot.mask_sample_probability)
        assert b["masks"].sum() <= bound


def test_two_hosts_together_equal_one_host():
    c, steps = _config(), 4
    single = _take(c, steps)
    hosts = [_take(c, steps, process_index=p, process_count=2) for p in range(2)]
    for i in range(steps):
        assert hosts[0][i]["global_crops"].shape[0] == 4
        joined = {k: np.concatenate([hosts[0][i][k], hosts[1][i][k]]) for k in single[i]}
        assert _equal(joined, single[i]), f"step {i}"


def test_masks_are_the_global_step_masks_split_by_sample():
    c = _config()
    for step, batch in enumerate(_take(c, 3)):
        rng = np.random.default_rng([c.seed, pipeline._MASKS, step])
        masks = sample_batch_masks(rng, 16, (4, 4), c.ibot.mask_sample_probability,
                                   tuple(c.ibot.mask_ratio_min_max), c.ibot.min_block_patches,
                                   c.ibot.min_aspect, c.ibot.max_mask_fraction)
        # Row c * B + s is crop c of sample s (DINOv2's collate order).
        assert np.array_equal(batch["masks"], masks.reshape(2, 8, 16).transpose(1, 0, 2))


def test_start_step_resumes_without_replay():
    c = _config()
    fresh = _take(c, 5)
    for k in (1, 2, 4):
        assert _equal(_take(c, 1, start_step=k)[0], fresh[k])
    resumed = _take(c, 2, start_step=3, process_index=1, process_count=2)
    assert _equal(resumed[0], {key: v[4:] for key, v in fresh[3].items()})


def test_same_config_same_batches_other_seed_differs():
    a, b = _take(_config(), 3), _take(_config(), 3)
    assert all(_equal(x, y) for x, y in zip(a, b))
    c = _config()
    c.seed = 1
    other = _take(c, 3)
    for key in ("global_crops", "local_crops", "masks"):
        assert not np.array_equal(a[0][key], other[0][key])
    assert not _equal(a[0], a[1])  # and steps differ from each other


def test_worker_processes_give_the_same_batches():
    c = _config()
    c.data.worker_count = 1
    it = make_train_iterator(c, patch_size=PATCH, start_step=1)
    try:
        got = [next(it) for _ in range(2)]
    finally:
        it.close()
    want = _take(_config(), 3)[1:]
    assert all(_equal(x, y) for x, y in zip(got, want))


def test_every_record_gets_its_own_augmentation():
    c = _config()
    c.data.synthetic_size = 1  # one image: any two equal crops would mean reused random draws
    crops = np.concatenate([b["global_crops"] for b in _take(c, 3)])  # [24, 2, G, G, 3]
    flat = crops.reshape(len(crops), -1)
    assert len(np.unique(flat, axis=0)) == len(crops)


def test_each_epoch_is_a_fresh_permutation(monkeypatch):
    class Flat:  # image i is the constant colour i, so crops reveal which image they came from
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return np.full((20, 20, 3), int(i), np.uint8)

    monkeypatch.setattr(pipeline, "make_source", lambda data_cfg, seed: Flat())
    c = _config()
    c.augment.color_jitter = c.augment.grayscale = c.augment.solarize = 0.0
    ids = np.concatenate([b["global_crops"][:, 0, 0, 0, 0] for b in _take(c, 6)])
    epochs = ids.reshape(3, 16)  # batch 8, 16 images: two steps per epoch
    assert all(sorted(e) == list(range(16)) for e in epochs)
    assert not np.array_equal(epochs[0], np.arange(16))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_bad_batch_size_and_patch_size():
    c = _config()
    with pytest.raises(ValueError, match="batch_size"):
        make_train_iterator(c, patch_size=PATCH, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="global_size"):
        make_train_iterator(c, patch_size=5)


def test_buffer_size_for_config():
    c = _config()  # 16 global crops, p = 0.5 -> 8 masked crops on 16 patches
    expected = sum(int(16 * p) for p in np.linspace(0.1, 0.5, 9)[1:])
    assert mask_buffer_size_for(c, PATCH) == expected


# Folder data end to end, and the demo tiles job ------------------------------------------------

def test_demo_tiles_then_folder_pipeline(tmp_path, capsys):
    out = tmp_path / "tiles"
    assert demo_tiles.main(["--out", str(out), "--tile", "64", "--stride", "128",
                            "--synthetic", "8"]) == 0
    assert "wrote 16 tiles of 64 px (stride 128) and 8 synthetic" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert len(names) == 24 and all(n.endswith(".png") for n in names)
    assert sum(n.startswith("he_") for n in names) == 8
    assert sorted(os.listdir(tmp_path)) == ["tiles"]  # no temporary folders left behind
    for name in (names[0], names[-1]):
        with Image.open(out / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"

    c = _config()
    c.data.source, c.data.path = "folder", str(out)
    batch = _take(c, 1)[0]
    assert batch["global_crops"].shape == (8, 2, 32, 32, 3)


def test_demo_tiles_refuses_non_empty_dir_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "tiles"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert demo_tiles.main(["--out", str(out), "--tile", "256", "--stride", "256",
                            "--synthetic", "0"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert demo_tiles.main(["--out", str(out), "--tile", "256", "--stride", "256",
                            "--synthetic", "0", "--overwrite"]) == 0
    assert len(os.listdir(out)) == 4 and "keep.txt" not in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["tiles"]


def test_demo_tiles_without_scikit_image_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` fail
    assert demo_tiles.main(["--out", str(tmp_path / "tiles")]) == 1
    assert 'pip install -e ".[demo]"' in capsys.readouterr().err
    assert not (tmp_path / "tiles").exists()


def _write_shards(folder, images, per_shard):
    """ArrayRecord tile shards in tile_wsi's record format, written directly."""
    # optional: array_record is not in install_requires (grain brings it, except on Windows)
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(images), per_shard):
        w = ArrayRecordWriter(os.path.join(folder, f"tiles-{s // per_shard:05d}.array_record"),
                              "group_size:1")
        for i, img in enumerate(images[s:s + per_shard], start=s):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            w.write(encode_tile(buf.getvalue(), {"slide_id": f"s{i % 3}", "x": i, "y": 0}))
        w.close()


def test_shard_source_reads_tile_shards_into_the_pipeline(tmp_path):
    synth = SyntheticSource(10, 48, seed=3)
    images = [synth[i] for i in range(10)]
    _write_shards(tmp_path / "shards" / "part0", images, per_shard=4)
    src = ShardSource(str(tmp_path / "shards"))
    assert len(src) == 10 and len(src.files) == 3
    for i in (0, 5, 9):  # record order = sorted shards, then position: JPEG-close to the input
        assert src[i].shape == (48, 48, 3)
        assert np.abs(src[i].astype(int) - images[i]).mean() < 6
        assert src.record(i)[1]["x"] == i
    c = _config()
    c.data.source, c.data.path = "shards", str(tmp_path / "shards")
    batch = _take(c, 1)[0]
    assert batch["global_crops"].shape == (c.batch_size, 2, 32, 32, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="array_record"):
        ShardSource(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="data.path"):
        ShardSource(str(tmp_path / "missing"))
