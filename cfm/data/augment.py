"""DINOv2 multi-crop augmentation on the host, in numpy + PIL, keyed by an explicit generator.

The recipe is DINOv2's `DataAugmentationDINO` (Oquab et al. 2023, arXiv:2304.07193), itself
DINO's (Caron et al. 2021, arXiv:2104.14294): per crop a random-resized crop (aspect 3/4..4/3,
bicubic), horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur with sigma in
[0.1, 2.0] (p 1.0 / 0.1 / 0.5 for global crop 1 / global crop 2 / local crops) and solarisation
at 128 on the second global crop only. Pathology recipes (UNI, Phikon-v2) add vertical flips and
90-degree rotations, as tissue has no canonical orientation. Two pathology options:
  * HED stain jitter (Tellez et al. 2018, IEEE TMI 37:2126; Tellez et al. 2019, MedIA 58:101544):
    each crop's haematoxylin / eosin / DAB concentrations (Ruifrok & Johnston 2001 colour
    deconvolution) are scaled by U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma), before
    the colour jitter.
  * Virchow2's extended-context translation (Zimmermann et al. 2024, arXiv:2408.00738): the two
    global crops are global_size windows translated inside a larger tile, never rescaled, so
    tissue keeps its magnification; local crops stay random-resized.

Crops stay uint8: the jitted train step normalises on device, which quarters host-to-device
bytes. Every crop consumes the same fixed number of draws whatever the probabilities are, so
switching one augmentation on or off leaves all the other random choices unchanged. The stain
jitter's draws come after all the crops' draws, so its settings change no other choice either,
and with it off the crops are the same as before it existed.
"""

import math
import threading

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

_ASPECT = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect range (torchvision / DINOv2)
_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before a centre crop
_BLUR_SIGMA = (0.1, 2.0)  # DINOv2 GaussianBlur radius range, in output pixels
_SOLARIZE_THRESHOLD = 128  # DINOv2 / BYOL RandomSolarize threshold
# Uniform draws per crop: 4 per crop attempt, then 8 coin/scalar draws, 4 jitter strengths and
# 4 keys whose argsort is the jitter order.
_N_DRAWS = 4 * _RRC_ATTEMPTS + 16
# Stain jitter draws per crop: 3 concentration scales then 3 shifts (H, E, DAB).
_N_HED_DRAWS = 6
_ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
              Image.Transpose.ROTATE_270)  # counter-clockwise, as np.rot90(k)


# Ruifrok & Johnston (2001) stain vectors as rows (optical density of unit haematoxylin, eosin,
# DAB in R, G, B), the values of scikit-image's `rgb_from_hed`; concentrations are OD @ inverse.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# scikit-image's formulation of Beer-Lambert: OD = log(max(rgb / 255, 1e-6)) / log(1e-6), i.e.
# -log10(transmission) / 6, so black (0) has OD 1 and white (255) OD 0. Matching it keeps
# `hed_jitter` sigmas in the units of the HED jitters built on `skimage.color.rgb2hed` (scikit-image
# >= 0.19). In these units a shift of 0.05 in H alone takes white to (163, 157, 209).
_OD_EPS = 1e-6
_LOG_EPS = math.log(_OD_EPS)
_OD_LUT = (np.log(np.maximum(np.arange(256) / 255.0, _OD_EPS)) / _LOG_EPS).astype(np.float32)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """HED stain concentrations, float32 [..., 3], of a uint8 RGB image [..., 3].

    Same as `skimage.color.rgb2hed` except that negative concentrations (colours outside the
    stain cone) are kept rather than clipped at 0, so `hed_to_rgb` inverts it exactly.
    """
    return np.take(_OD_LUT, np.asarray(rgb, np.uint8)) @ _HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """RGB in [0, 1], float32 [..., 3], of HED concentrations (`skimage.color.hed2rgb`)."""
    od = np.asarray(hed, np.float32) @ _RGB_FROM_HED.astype(np.float32)
    return np.minimum(np.exp(od * np.float32(_LOG_EPS)), np.float32(1.0))


def _hed_jitter_planes(planes: np.ndarray, u: np.ndarray, sigma: float) -> np.ndarray:
    """`hed_jitter` of channel planes: uint8 [3, ...] (R, G, B first) -> uint8 [3, ...].

    Channels-first throughout: adding a per-channel offset to a [N, 3] array is a length-3 inner
    loop in numpy, 5x slower than rows of N, and PIL splits and merges planes for free.
    """
    alpha = 1.0 - sigma + 2.0 * sigma * u[:3]
    beta = -sigma + 2.0 * sigma * u[3:]
    # Fold exp(OD' * log(eps)) * 255 into the matrix and offset: one multiply-add per pixel.
    matrix = (_HED_FROM_RGB * alpha) @ _RGB_FROM_HED * _LOG_EPS
    offset = beta @ _RGB_FROM_HED * _LOG_EPS + math.log(255.0)
    od = np.take(_OD_LUT, planes.reshape(3, -1))  # np.take: 2x faster than _OD_LUT[planes]
    x = matrix.T.astype(np.float32) @ od
    x += offset.astype(np.float32)[:, None]
    np.exp(x, out=x)
    np.minimum(x, np.float32(254.5), out=x)  # exp > 0, so only the top needs clipping
    x += np.float32(0.5)
    return x.astype(np.uint8).reshape(planes.shape)


def hed_jitter(rgb: np.ndarray, u: np.ndarray, sigma: float) -> np.ndarray:
    """Tellez et al. (2018) HED stain jitter of a uint8 RGB image [..., 3], from 6 uniforms.

    Concentration c becomes c * alpha + beta per stain, alpha in U(1 - sigma, 1 + sigma) and beta
    in U(-sigma, sigma) (from u[:3] and u[3:], uniforms in [0, 1)). Being linear in OD, the whole
    round trip is one 3 x 3 matrix and offset: OD' = OD @ (A diag(alpha) B) + beta @ B, with
    A = `_HED_FROM_RGB` and B = `_RGB_FROM_HED`, so a crop costs a table lookup, a 3 x 3 product
    and an exp in float32. Returns uint8 [..., 3], rounded and clipped to [0, 255].
    """
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"hed_jitter expects uint8 [..., 3], got {rgb.dtype} {rgb.shape}")
    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    return np.ascontiguousarray(np.moveaxis(_hed_jitter_planes(planes, u, sigma), 0, -1))


def _hed_jitter_image(img: Image.Image, u: np.ndarray, sigma: float) -> Image.Image:
    """`hed_jitter` of an RGB PIL image, through PIL's plane split / merge (no transposes)."""
    planes = np.stack([np.asarray(p) for p in img.split()])
    out = _hed_jitter_planes(planes, u, sigma)
    return Image.merge("RGB", [Image.fromarray(p, "L") for p in out])


def _crop_box(u: np.ndarray, height: int, width: int, scale: tuple[float, float]
              ) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom) from [10, 4] uniforms."""
    area = height * width
    log_lo, log_hi = math.log(_ASPECT[0]), math.log(_ASPECT[1])
    for u_scale, u_aspect, u_top, u_left in u.tolist():
        target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))
            left = int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centred box whose aspect lies in range.
    ratio = width / height
    w, h = width, height
    if ratio < _ASPECT[0]:
        h = int(round(w / _ASPECT[0]))
    elif ratio > _ASPECT[1]:
        w = int(round(h * _ASPECT[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


# Below this many pixels the hue shift runs through PIL's HSV conversions; from here on through
# lookup tables: identical output, 3.4x faster on a 224 crop in isolation and ~2 ms less per
# 2x224 + 8x96 sample in the pipeline (benchmarks/input_pipeline.py), at the cost of 112 MiB
# per process, built in ~1.7 s on first use. Small crops (tests, the demo) never build them.
_HUE_LUT_MIN_PIXELS = 96 * 96
_hue_luts: tuple[np.ndarray, np.ndarray] | None = None
_hue_luts_lock = threading.Lock()


def _build_hue_luts() -> tuple[np.ndarray, np.ndarray]:
    """PIL's own RGB -> HSV and HSV -> RGB conversions of all 2**24 colours, as lookup tables.

    Returns (hsv_of_rgb uint32 [2**24]: h << 16 | s << 8 | v indexed by r << 16 | g << 8 | b;
    rgb_of_hsv uint8 [2**24, 3] indexed by h << 16 | s << 8 | v). Built by PIL itself, so a
    lookup reproduces PIL's per-pixel conversion exactly, rounding included.
    """
    code = np.arange(1 << 24, dtype=np.uint32)
    planes = np.empty((1 << 24, 3), np.uint8)
    for c in range(3):
        planes[:, c] = code >> np.uint32(16 - 8 * c)  # uint8 cast keeps the low byte
    hsv = np.asarray(Image.frombuffer("RGB", (4096, 4096), planes, "raw", "RGB", 0, 1)
                     .convert("HSV")).reshape(-1, 3)
    hsv_of_rgb = hsv[:, 0].astype(np.uint32) << 16
    hsv_of_rgb |= hsv[:, 1].astype(np.uint32) << 8
    hsv_of_rgb |= hsv[:, 2]
    del hsv
    rgb_of_hsv = np.asarray(Image.frombuffer("HSV", (4096, 4096), planes, "raw", "HSV", 0, 1)
                            .convert("RGB")).reshape(-1, 3)
    return hsv_of_rgb, rgb_of_hsv


def _hue_shift(img: Image.Image, shift: int) -> Image.Image:
    """Adds `shift` (0..255) to PIL's 8-bit HSV hue of an RGB image, wrapping at 256.

    Equal to PIL convert("HSV") -> add to H -> convert("RGB"); large crops take two table
    lookups per pixel instead of PIL's float conversions (2.5 -> 0.7 ms for 224 x 224).
    """
    global _hue_luts
    if img.width * img.height < _HUE_LUT_MIN_PIXELS:
        h, sat, v = img.convert("HSV").split()
        h = h.point([(i + shift) % 256 for i in range(256)])
        return Image.merge("HSV", (h, sat, v)).convert("RGB")
    if _hue_luts is None:
        with _hue_luts_lock:  # grain maps records on threads
            if _hue_luts is None:
                _hue_luts = _build_hue_luts()
    hsv_of_rgb, rgb_of_hsv = _hue_luts
    x = np.asarray(img).astype(np.uint32)
    code = x[..., 0] << 16
    code |= x[..., 1] << 8
    code |= x[..., 2]
    hsv = np.take(hsv_of_rgb, code)
    hsv += np.uint32(shift << 16)
    hsv &= np.uint32(0xFFFFFF)  # the carry out of h wraps the hue at 256
    return Image.fromarray(np.take(rgb_of_hsv, hsv, axis=0), "RGB")


def _jitter(img: Image.Image, u_strength: list[float], order: np.ndarray,
            strength: tuple[float, float, float, float]) -> Image.Image:
    """torchvision ColorJitter on a PIL image: brightness, contrast, saturation, hue.

    Factors are uniform in [max(0, 1 - s), 1 + s] for the first three and the hue shift uniform
    in [-s, s] of a full turn; the four are applied in the order given by `order`.
    """
    for op in order.tolist():
        s = strength[op]
        if s <= 0:
            continue
        if op == 3:  # hue: rotate the H channel of HSV, wrapping at 256
            shift = int(round((2.0 * u_strength[op] - 1.0) * s * 255.0)) % 256
            img = _hue_shift(img, shift)
            continue
        lo = max(0.0, 1.0 - s)
        factor = lo + (1.0 + s - lo) * u_strength[op]
        enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op]
        img = enhancer(img).enhance(factor)
    return img


class MultiCrop:
    """Two global and `crops.n_local` local uint8 crops of one image, as DINOv2 trains on.

    Args:
        crops_cfg: `config.crops` (global_size, local_size, n_local, global_scale, local_scale;
            sizes in pixels, scales as fractions of the image area; extended_context: global
            crops are translated global_size windows instead of random-resized crops).
        augment_cfg: `config.augment` (hflip, vflip, rot90, color_jitter, jitter_strength,
            grayscale, blur, solarize; probabilities in [0, 1]; hed_jitter: stain jitter sigma
            in HED concentration units, 0 = off).
    """

    def __init__(self, crops_cfg, augment_cfg):
        self.global_size = int(crops_cfg.global_size)
        self.local_size = int(crops_cfg.local_size)
        self.n_local = int(crops_cfg.n_local)
        self.global_scale = tuple(float(s) for s in crops_cfg.global_scale)
        self.local_scale = tuple(float(s) for s in crops_cfg.local_scale)
        self.extended_context = bool(crops_cfg.get("extended_context", False))
        a = augment_cfg
        self.hflip, self.vflip, self.rot90 = float(a.hflip), float(a.vflip), bool(a.rot90)
        self.color_jitter, self.grayscale = float(a.color_jitter), float(a.grayscale)
        self.jitter_strength = tuple(float(s) for s in a.jitter_strength)
        self.blur = tuple(float(p) for p in a.blur)
        self.solarize = float(a.solarize)
        self.hed_jitter = float(a.get("hed_jitter", 0.0))
        if len(self.jitter_strength) != 4 or len(self.blur) != 3:
            raise ValueError("augment.jitter_strength needs 4 values (brightness, contrast, "
                             "saturation, hue) and augment.blur 3 (global 1, global 2, local)")
        if not 0.0 <= self.hed_jitter < 1.0:
            raise ValueError(f"augment.hed_jitter must be in [0, 1) (a stain jitter sigma; "
                             f"Tellez et al. use 0.01-0.1), got {self.hed_jitter}")

    def _crop(self, img: Image.Image, u: np.ndarray, u_hed: np.ndarray, size: int,
              scale: tuple[float, float] | None, p_blur: float, p_solarize: float
              ) -> np.ndarray:
        """One augmented crop, uint8 [size, size, 3], from its `_N_DRAWS` and HED uniforms.

        scale None: a size x size window translated in `img` (extended context), not resized.
        """
        attempts = u[:4 * _RRC_ATTEMPTS].reshape(_RRC_ATTEMPTS, 4)
        (u_hflip, u_vflip, u_rot, u_jitter, u_gray, u_blur, u_sigma,
         u_solarize) = u[4 * _RRC_ATTEMPTS:4 * _RRC_ATTEMPTS + 8].tolist()
        u_strength, u_order = u[-8:-4].tolist(), u[-4:]
        if scale is None:  # translation only: the first attempt's position uniforms
            top = int(attempts[0, 2] * (img.height - size + 1))
            left = int(attempts[0, 3] * (img.width - size + 1))
            out = img.crop((left, top, left + size, top + size))
        else:
            box = _crop_box(attempts, img.height, img.width, scale)
            out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if u_hflip < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if u_vflip < self.vflip:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        rotation = _ROTATIONS[int(u_rot * 4)] if self.rot90 else None
        if rotation is not None:
            out = out.transpose(rotation)
        if self.hed_jitter > 0:
            out = _hed_jitter_image(out, u_hed, self.hed_jitter)
        if u_jitter < self.color_jitter:
            out = _jitter(out, u_strength, np.argsort(u_order), self.jitter_strength)
        if u_gray < self.grayscale:
            out = out.convert("L").convert("RGB")
        if u_blur < p_blur:
            sigma = _BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * u_sigma
            out = out.filter(ImageFilter.GaussianBlur(sigma))
        if u_solarize < p_solarize:
            out = ImageOps.solarize(out, _SOLARIZE_THRESHOLD)
        return np.asarray(out)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Returns global_crops uint8 [2, G, G, 3] and local_crops uint8 [n_local, L, L, 3].

        Draws from `rng` in a fixed order (`_N_DRAWS` each for global 1, global 2, the locals,
        then `_N_HED_DRAWS` each in the same crop order), so equal generator states give equal
        crops.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"MultiCrop expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
        gs, ls = self.global_size, self.local_size
        if self.extended_context and min(image.shape[:2]) < gs:
            raise ValueError(
                    f"crops.extended_context=True translates {gs}x{gs} global crops inside the "
                    f"tile, which must be at least crops.global_size={gs} on each side; got a "
                    f"{image.shape[0]}x{image.shape[1]} tile. Use larger tiles or set "
                    "crops.extended_context=False")
        img = Image.fromarray(image, "RGB")
        n = 2 + self.n_local
        u = rng.random((n, _N_DRAWS))  # the same numbers as n successive rng.random(_N_DRAWS)
        u_hed = rng.random((n, _N_HED_DRAWS))
        g_scale = None if self.extended_context else self.global_scale
        global_crops = np.empty((2, gs, gs, 3), np.uint8)
        global_crops[0] = self._crop(img, u[0], u_hed[0], gs, g_scale, self.blur[0], 0.0)
        global_crops[1] = self._crop(img, u[1], u_hed[1], gs, g_scale, self.blur[1],
                                     self.solarize)
        local_crops = np.empty((self.n_local, ls, ls, 3), np.uint8)
        for i in range(self.n_local):
            local_crops[i] = self._crop(img, u[2 + i], u_hed[2 + i], ls, self.local_scale,
                                        self.blur[2], 0.0)
        return {"global_crops": global_crops, "local_crops": local_crops}
