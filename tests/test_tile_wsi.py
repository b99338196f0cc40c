"""Slide tiling CLI: grids, level choice, failures, restart, sharding, privacy, record format."""

import csv
import importlib
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cfm.data.records import decode_tile, encode_tile
from data_prep import tile_wsi

from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402

# Whole-slide formats need the `slides` extra (openslide-python, openslide-bin, tifffile);
# the PNG-based tests run without it.
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:  # openslide-python without openslide-bin raises here too
        return False
    return True


needs_slides = pytest.mark.skipif(
    not all(_importable(m) for m in ("openslide", "tifffile")),
    reason="needs openslide-python, openslide-bin and tifffile (pip install -e '.[slides]')")

CMU_W, CMU_H, CMU_MPP = 2220, 2967, 0.499
PRIVATE_NAMES = {"CMU-1-Small-Region.svs": "Doe-Jane-S12-3456.svs",
                 "unopenable.tiff": "Roe-Rick-S12-7777.tiff",
                 "unreadable.svs": "Poe-Pam-S12-8888.svs"}


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _records(out):
    for row in _rows(os.path.join(out, "manifest.csv")):
        reader = ArrayRecordReader(os.path.join(out, row["shard"]))
        record = reader.read([int(row["index"])])[0]
        reader.close()
        yield row, record


def _tissue_image(height, width, seed):
    """White glass with a big pink textured ellipse: 'tissue' that passes every tile filter."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.45 * width)) ** 2
    pink = np.clip(np.array([200, 110, 180]) + rng.integers(-40, 40, (height, width, 3)), 0, 255)
    image[inside < 1] = pink[inside < 1]
    return image


def _pyramid_tiff(path, mpp=0.25, levels=4, size=(1536, 2048), resolution=True):
    """Tiled generic TIFF with levels at downsample 1, 2, 4, ... (OpenSlide 'generic-tiff')."""
    import tifffile

    base = _tissue_image(*size, seed=3)
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            image = np.asarray(Image.fromarray(base).resize((size[1] >> k, size[0] >> k)))
            extra = dict(resolution=(1e4 / (mpp * 2 ** k),) * 2,
                         resolutionunit="CENTIMETER") if resolution else {}
            tif.write(image, tile=(256, 256), photometric="rgb", compression="zlib",
                      subfiletype=1 if k else 0, **extra)


# --------------------------------------------------------------------------- pure pieces
def test_record_round_trip_and_errors():
    meta = {"slide_id": "ab", "x": 3, "y": 4, "mpp": 0.5}
    jpeg, back = decode_tile(encode_tile(b"\xff\xd8jpeg", meta))
    assert jpeg == b"\xff\xd8jpeg" and back == meta
    record = encode_tile(b"data", meta)
    with pytest.raises(ValueError, match="magic"):
        decode_tile(b"XXXX" + record[4:])
    with pytest.raises(ValueError, match="truncated"):
        decode_tile(record[:10])
    with pytest.raises(ValueError, match="truncated"):
        decode_tile(b"CF")


def test_cmu_grid_by_hand():
    # 0.5 um/px from 0.499 um/px: footprint 224 * 0.5 / 0.499 = 224.449 level-0 px, so
    # floor(2220 / 224.449) = 9 columns and floor(2967 / 224.449) = 13 rows.
    grid = tile_wsi.tile_grid(CMU_W, CMU_H, 224 * 0.5 / CMU_MPP, 224 * 0.5 / CMU_MPP)
    assert len(grid) == 9 * 13
    assert [x for x, _ in grid[:9]] == [0, 224, 449, 673, 898, 1122, 1347, 1571, 1796]
    assert grid[9] == (0, 224) and grid[-1] == (1796, 2693)
    # 1.0 um/px: footprint 448.898 -> 4 columns, 6 rows.
    grid = tile_wsi.tile_grid(CMU_W, CMU_H, 224 / CMU_MPP, 224 / CMU_MPP)
    assert len(grid) == 24
    assert grid[:5] == [(0, 0), (449, 0), (898, 0), (1347, 0), (0, 449)]
    assert grid[-1] == (1347, 2244)


def test_best_level_is_coarsest_fine_enough():
    downsamples = [1.0, 2.0, 4.0, 8.0]  # level mpps 0.25, 0.5, 1.0, 2.0
    assert tile_wsi.best_level(downsamples, 0.25, 0.25) == 0
    assert tile_wsi.best_level(downsamples, 0.25, 0.5) == 1
    assert tile_wsi.best_level(downsamples, 0.25, 0.7) == 1
    assert tile_wsi.best_level(downsamples, 0.25, 1.0) == 2
    assert tile_wsi.best_level(downsamples, 0.2527, 1.0) == 2  # Aperio-like, within tolerance
    assert tile_wsi.best_level(downsamples, 0.25, 3.0) == 3
    assert tile_wsi.best_level(downsamples, 0.25, 0.1) == 0


def test_tile_filters():
    assert tile_wsi.tile_rejection(_tissue_image(224, 224, 0)[40:184, 40:184].copy()) is None
    assert tile_wsi.tile_rejection(np.full((224, 224, 3), 240, np.uint8)) == "background"
    flat = np.zeros((224, 224, 3), np.uint8) + np.array([200, 110, 180], np.uint8)
    assert tile_wsi.tile_rejection(flat) == "blur"
    inked = _tissue_image(224, 224, 1)[40:184, 40:184].copy()
    inked[:, :60] = (30, 60, 200) + np.random.default_rng(0).integers(0, 40, (144, 60, 3))
    assert tile_wsi.tile_rejection(inked) == "pen"


def test_bad_usage_is_exit_2(tmp_path):
    assert tile_wsi.main(["--slides", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert tile_wsi.main(["--slides", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                          "--mpp", "0.5"]) == 2
    assert tile_wsi.main(["--slides", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--mpp", "0.5", "--num-shards", "2", "--shard-index", "2"]) == 2


# --------------------------------------------------------------------------- real slides
@pytest.fixture
def real_run(shared_data, tmp_path):
    """CMU + the two broken fixtures, under patient-like names, tiled at 0.5 and 1.0 um/px."""
    slides = tmp_path / "Hospital-Doe" / "case-S12"
    slides.mkdir(parents=True)
    for source, name in PRIVATE_NAMES.items():
        shutil.copy(shared_data / "wsi" / source, slides / name)
    out = str(tmp_path / "out")
    args = ["--slides", str(slides), "--out", out, "--mpp", "0.5", "--mpp", "1.0",
            "--tiles-per-shard", "25", "--cohort", "demo"]
    status = tile_wsi.main(args)
    return status, out, args, slides


@needs_slides
def test_real_slides_tiles_and_failures(real_run):
    status, out, _, _ = real_run
    assert status == 1
    reasons = sorted(row["reason"].split(":")[0] for row in _rows(f"{out}/failures.csv"))
    assert reasons == ["unopenable", "unreadable"]
    manifest = _rows(f"{out}/manifest.csv")
    assert list(manifest[0]) == list(tile_wsi.MANIFEST_FIELDS)
    grid05 = set(tile_wsi.tile_grid(CMU_W, CMU_H, 224 * 0.5 / CMU_MPP, 224 * 0.5 / CMU_MPP))
    grid10 = set(tile_wsi.tile_grid(CMU_W, CMU_H, 224 / CMU_MPP, 224 / CMU_MPP))
    at05 = [(int(r["x"]), int(r["y"])) for r in manifest if r["mpp"] == "0.5"]
    at10 = [(int(r["x"]), int(r["y"])) for r in manifest if r["mpp"] == "1.0"]
    assert set(at05) <= grid05 and set(at10) <= grid10
    assert 20 <= len(at05) < 117 and 3 <= len(at10) < 24  # about a third of the crop is tissue
    assert len(set(at05)) == len(at05)
    assert {r["level"] for r in manifest} == {"0"} and {r["cohort"] for r in manifest} == {"demo"}
    assert all(float(r["tissue_fraction"]) >= 0.5 for r in manifest)
    # size-balanced shards: 25 tiles per shard target
    sizes = {}
    for row in manifest:
        sizes[row["shard"]] = sizes.get(row["shard"], 0) + 1
    assert max(sizes.values()) - min(sizes.values()) <= 1 and max(sizes.values()) <= 25
    for row, record in _records(out):
        jpeg, meta = decode_tile(record)
        assert (meta["x"], meta["y"], meta["mpp"]) == (int(row["x"]), int(row["y"]),
                                                       float(row["mpp"]))
        assert meta["slide_id"] == row["slide_id"] and meta["tile_size"] == 224
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)
    ids = {r["slide_id"] for r in manifest}
    assert len(ids) == 1 and os.path.exists(f"{out}/qc/{ids.pop()}.png")
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    assert leftovers == []


@needs_slides
def test_privacy_no_names_outside_private(real_run):
    _, out, _, slides = real_run
    needles = {str(slides).encode(), str(slides.parent).encode(), b"Hospital-Doe", b"case-S12"}
    for name in PRIVATE_NAMES.values():
        needles |= {name.encode(), os.path.splitext(name)[0].encode(),
                    str(slides / name).encode()}
    needles |= {n.lower() for n in needles}
    checked = 0
    for root, _, files in os.walk(out):
        if os.path.relpath(root, out).split(os.sep)[0] == "private":
            continue
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            checked += 1
            for needle in needles:
                assert needle not in data and needle not in data.lower(), (name, needle)
                assert needle.decode().lower() not in name.lower()
    assert checked >= 6
    mapping = _rows(f"{out}/private/slide_ids.csv")
    assert {os.path.basename(r["source_path"]) for r in mapping} == set(PRIVATE_NAMES.values())


@needs_slides
def test_restart_skips_finished_slides(real_run):
    status, out, args, _ = real_run
    before = {}
    for root, _, files in os.walk(out):
        for name in files:
            if not name.endswith(("failures.csv", "slide_ids.csv")):
                path = os.path.join(root, name)
                before[path] = (os.stat(path).st_mtime_ns, open(path, "rb").read())
    assert tile_wsi.main(args) == status  # the broken slides are retried and fail again
    after = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in before}
    assert after == before  # finished slide, shards, manifest and QC untouched
    assert len(_rows(f"{out}/failures.csv")) == 2
    # Other settings on the same --out are refused.
    assert tile_wsi.main(args + ["--jpeg-quality", "50"]) == 2


# --------------------------------------------------------------------------- synthetic slides
@needs_slides
def test_pyramid_level_choice(tmp_path):
    _pyramid_tiff(str(tmp_path / "pyr.tiff"))
    out = str(tmp_path / "out")
    assert tile_wsi.main(["--slides", str(tmp_path / "pyr.tiff"), "--out", out,
                          "--mpp", "0.5", "--mpp", "1.0", "--mpp", "2.0",
                          "--tile-size", "112"]) == 0
    manifest = _rows(f"{out}/manifest.csv")
    levels = {(r["mpp"], r["level"]) for r in manifest}
    assert levels == {("0.5", "1"), ("1.0", "2"), ("2.0", "3")}
    # 0.5 um/px from 0.25: footprint 224 level-0 px -> 9 x 6 grid over 2048 x 1536.
    at05 = {(int(r["x"]), int(r["y"])) for r in manifest if r["mpp"] == "0.5"}
    assert at05 <= {(224 * i, 224 * j) for i in range(9) for j in range(6)}
    assert (896, 672) in at05  # the centre of the tissue ellipse
    # 2.0 um/px: footprint 896 -> 2 x 1 grid; both tiles are mostly inside the ellipse.
    assert {(int(r["x"]), int(r["y"])) for r in manifest if r["mpp"] == "2.0"} == {
        (0, 0), (896, 0)}
    for _, record in _records(out):
        assert Image.open(io.BytesIO(decode_tile(record)[0])).size == (112, 112)


@needs_slides
def test_slide_without_mpp(tmp_path):
    _pyramid_tiff(str(tmp_path / "nompp.tiff"), levels=2, size=(1024, 1024), resolution=False)
    Image.fromarray(_tissue_image(768, 1024, 5)).save(tmp_path / "plain.png")
    out = str(tmp_path / "out")
    args = ["--slides", str(tmp_path), "--out", out, "--mpp", "0.5"]
    assert tile_wsi.main(args) == 1
    reasons = [r["reason"] for r in _rows(f"{out}/failures.csv")]
    assert len(reasons) == 2 and all(r.startswith("no mpp") and "--default-mpp" in r
                                     for r in reasons)
    out2 = str(tmp_path / "out2")
    assert tile_wsi.main(["--slides", str(tmp_path), "--out", out2, "--mpp", "0.5",
                          "--default-mpp", "0.25"]) == 0
    assert len({r["slide_id"] for r in _rows(f"{out2}/manifest.csv")}) == 2


def test_num_shards_partition_slides(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(5):
        Image.fromarray(_tissue_image(448, 672, 10 + i)).save(slides / f"s{i}.png")
    common = ["--slides", str(slides), "--mpp", "0.5", "--default-mpp", "0.5", "--salt", "k"]
    assert tile_wsi.main(common + ["--out", str(tmp_path / "all")]) == 0
    every = {r["slide_id"] for r in _rows(tmp_path / "all" / "manifest.csv")}
    parts = []
    for index in range(2):
        assert tile_wsi.main(common + ["--out", str(tmp_path / "split"), "--num-shards", "2",
                                       "--shard-index", str(index)]) == 0
        part = tmp_path / "split" / f"part-{index:05d}-of-00002"
        parts.append({r["slide_id"] for r in _rows(part / "manifest.csv")})
        sources = [os.path.basename(r["source_path"])
                   for r in _rows(part / "private" / "slide_ids.csv")]
        assert sorted(sources) == [f"s{i}.png" for i in range(index, 5, 2)]
    assert len(every) == 5 and parts[0] | parts[1] == every and not parts[0] & parts[1]


def test_rerun_with_new_slide_appends_a_shard(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(_tissue_image(448, 672, 20)).save(slides / "a.png")
    out = tmp_path / "slides" / "out"  # output inside the slide folder: its PNGs are no slides
    args = ["--slides", str(slides), "--out", str(out), "--mpp", "0.5", "--default-mpp", "0.5"]
    assert tile_wsi.main(args) == 0
    first = (out / "tiles-00000.array_record").read_bytes()
    Image.fromarray(_tissue_image(448, 672, 21)).save(slides / "b.png")
    assert tile_wsi.main(args) == 0
    assert (out / "tiles-00000.array_record").read_bytes() == first
    manifest = _rows(out / "manifest.csv")
    assert {r["shard"] for r in manifest} == {"tiles-00000.array_record",
                                              "tiles-00001.array_record"}
    assert len({r["slide_id"] for r in manifest}) == 2
    assert len(_rows(out / "private" / "slide_ids.csv")) == 2
    assert os.listdir(out / "staging") == []
