"""The README demo's data: tiles of scikit-image's bundled real IHC image plus unlabelled
synthetic H&E-like tiles to pretrain on, and (with --probe-out) a labelled held-out tile set that
the demo's evaluators probe.

    python -m data_prep.demo_tiles --out /tmp/cfm_demo/tiles [--tile 128] [--stride 32]
        [--synthetic 1024] [--probe-out /tmp/cfm_demo/probe] [--probe-per-class 128]

`skimage.data.immunohistochemistry()` is a 512 x 512 RGB micrograph of immunohistochemical
(DAB + haematoxylin) stained human colon tissue that ships inside scikit-image, so the demo needs
no download. With the defaults it yields 13 x 13 = 169 tiles of 128 pixels (`ihc_*.png`). One
image's tiles are too alike for self-supervision to find structure in 300 steps, so `--out` also
gets `--synthetic` unlabelled 64-px H&E-like tiles (`he_*.png`) drawn by
`data_prep.synthetic_tme.draw_tile`: the four tissue classes in turn, each tile with its own
strong stain (optical-density factors 0.4-1.6 per channel, `STAIN_SPREAD`).

The probe set (`--probe-out`) is a folder of class subfolders (tumour, stroma, immune,
background) of 64-px tiles drawn the same way from other seeds: the labelled tiles on which
`cfm.train`'s kNN and linear-probe evaluators (`config.evals`, `cfm.evals`) measure whether the
representation improves while it trains. Their stain varies so much that a tile's colour alone
says little about its class (a random ViT's kNN accuracy is ~0.6-0.7), so the accuracy rises
only as the network learns stain-invariant tissue features.

Every folder is written to a temporary sibling and renamed into place at the end, so it is never
half-written.
"""

import os
import sys

import numpy as np
from PIL import Image

from cfm import atomic, cli_help
from data_prep.synthetic_tme import CLASSES, draw_tile, stain

# Per-channel optical-density factors U(1 - x, 1 + x) of the demo's synthetic tiles: wide enough
# that colour alone does not give the class away (see the module docstring).
STAIN_SPREAD = 0.6
SYNTHETIC_SEED = 1  # the probe set draws from seed 0: no tile in both


def _load_image():
    """The IHC image as uint8 [512, 512, 3], or None (with a message) if scikit-image is missing."""
    try:
        from skimage import data  # optional: scikit-image (extra "demo")
    except ImportError:
        print('demo_tiles: scikit-image is not installed; run: pip install -e ".[demo]"',
              file=sys.stderr)
        return None
    return data.immunohistochemistry()


def main(argv: list[str] | None = None) -> int:
    """Writes the tiles; returns the exit status (0 ok, 1 scikit-image missing, 2 bad usage)."""
    parser = cli_help.parser("data_prep.demo_tiles", __doc__,
                             "python -m data_prep.demo_tiles --out /tmp/cfm_demo/tiles")
    parser.add_argument("--out", required=True, help="folder to create with the PNG tiles")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--stride", type=int, default=32, help="step between tiles in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--synthetic", type=int, default=1024,
                        help="unlabelled synthetic H&E-like tiles to add to --out (0: none)")
    parser.add_argument("--probe-out", default="",
                        help="also write the labelled probe set here (default: none)")
    parser.add_argument("--probe-per-class", type=int, default=128,
                        help="probe tiles of each class")
    args = parser.parse_args(argv)
    if args.synthetic < 0:
        print("demo_tiles: need --synthetic >= 0", file=sys.stderr)
        return 2
    if args.probe_out and (args.probe_per_class < 2 or os.path.isfile(args.probe_out)):
        print("demo_tiles: need --probe-per-class >= 2 and a folder for --probe-out",
              file=sys.stderr)
        return 2

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"demo_tiles: {out} exists and is not a folder; choose another --out",
              file=sys.stderr)
        return 2
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        print(f"demo_tiles: {out} exists and is not empty; pass --overwrite to replace it or "
              "choose another --out", file=sys.stderr)
        return 2
    image = _load_image()
    if image is None:
        return 1
    height, width = image.shape[:2]
    if not 0 < args.tile <= min(height, width) or args.stride < 1:
        print(f"demo_tiles: need 0 < --tile <= {min(height, width)} and --stride >= 1, got "
              f"{args.tile}, {args.stride}", file=sys.stderr)
        return 2

    count = 0
    with atomic.atomic_folder(out) as tmp:  # the old tiles (--overwrite) stay until this is in
        for top in range(0, height - args.tile + 1, args.stride):
            for left in range(0, width - args.tile + 1, args.stride):
                tile = image[top:top + args.tile, left:left + args.tile]
                name = f"ihc_y{top:04d}_x{left:04d}.png"
                Image.fromarray(tile, "RGB").save(os.path.join(tmp, name))
                count += 1
        for i in range(args.synthetic):
            save_stained_tile(os.path.join(tmp, f"he_{i:05d}.png"), CLASSES[i % len(CLASSES)],
                              [SYNTHETIC_SEED, i])
    print(f"demo_tiles: wrote {count} tiles of {args.tile} px (stride {args.stride})"
          + (f" and {args.synthetic} synthetic H&E-like tiles of 64 px" if args.synthetic else "")
          + f" to {out}")
    if args.probe_out:
        write_probe_set(args.probe_out, args.probe_per_class)
        print(f"demo_tiles: wrote {args.probe_per_class} labelled tiles of each of "
              f"{', '.join(CLASSES)} to {os.path.abspath(args.probe_out)}")
    return 0


def save_stained_tile(path: str, label: str, seed: list[int], size: int = 64,
                      mpp: float = 1.0) -> None:
    """One synthetic H&E-like tile of class `label` (`size` px at `mpp` um/px) with its own
    seeded stain (`STAIN_SPREAD`), saved as a PNG at `path`."""
    rng = np.random.default_rng(seed)
    rgb, _ = draw_tile(label, size, mpp, rng, od_scale=stain(rng, STAIN_SPREAD))
    Image.fromarray(rgb, "RGB").save(path)


def write_probe_set(out: str, per_class: int, size: int = 64, mpp: float = 1.0,
                    seed: int = 0) -> None:
    """`per_class` labelled H&E-like tiles of each class in `out/<class>/NNN.png` (replacing
    `out` whole); tile i of a class has its own seeded stain (`STAIN_SPREAD`), so the classes
    must be told apart across stains, as across patients."""
    with atomic.atomic_folder(out) as tmp:
        for c, label in enumerate(CLASSES):
            os.makedirs(os.path.join(tmp, label))
            for i in range(per_class):
                save_stained_tile(os.path.join(tmp, label, f"{i:03d}.png"), label, [seed, c, i],
                                  size, mpp)


if __name__ == "__main__":
    sys.exit(main())
