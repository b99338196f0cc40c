"""DINOv2 multi-crop augmentation on the host, in numpy + PIL, keyed by an explicit generator.

The recipe is DINOv2's `DataAugmentationDINO` (Oquab et al. 2023, arXiv:2304.07193), itself
DINO's (Caron et al. 2021, arXiv:2104.14294): per crop a random-resized crop (aspect 3/4..4/3,
bicubic), horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur with sigma in
[0.1, 2.0] (p 1.0 / 0.1 / 0.5 for global crop 1 / global crop 2 / local crops) and solarisation
at 128 on the second global crop only. Pathology recipes (UNI, Phikon-v2) add vertical flips and
90-degree rotations, as tissue has no canonical orientation.

Crops stay uint8: the jitted train step normalises on device, which quarters host-to-device
bytes. Every crop consumes the same fixed number of draws whatever the probabilities are, so
switching one augmentation on or off leaves all the other random choices unchanged.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

_ASPECT = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect range (torchvision / DINOv2)
_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before a centre crop
_BLUR_SIGMA = (0.1, 2.0)  # DINOv2 GaussianBlur radius range, in output pixels
_SOLARIZE_THRESHOLD = 128  # DINOv2 / BYOL RandomSolarize threshold
# Uniform draws per crop: 4 per crop attempt, then 8 coin/scalar draws, 4 jitter strengths and
# 4 keys whose argsort is the jitter order.
_N_DRAWS = 4 * _RRC_ATTEMPTS + 16
_ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
              Image.Transpose.ROTATE_270)  # counter-clockwise, as np.rot90(k)


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
            h, sat, v = img.convert("HSV").split()
            h = h.point([(i + shift) % 256 for i in range(256)])
            img = Image.merge("HSV", (h, sat, v)).convert("RGB")
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
            sizes in pixels, scales as fractions of the image area).
        augment_cfg: `config.augment` (hflip, vflip, rot90, color_jitter, jitter_strength,
            grayscale, blur, solarize); probabilities in [0, 1].
    """

    def __init__(self, crops_cfg, augment_cfg):
        self.global_size = int(crops_cfg.global_size)
        self.local_size = int(crops_cfg.local_size)
        self.n_local = int(crops_cfg.n_local)
        self.global_scale = tuple(float(s) for s in crops_cfg.global_scale)
        self.local_scale = tuple(float(s) for s in crops_cfg.local_scale)
        a = augment_cfg
        self.hflip, self.vflip, self.rot90 = float(a.hflip), float(a.vflip), bool(a.rot90)
        self.color_jitter, self.grayscale = float(a.color_jitter), float(a.grayscale)
        self.jitter_strength = tuple(float(s) for s in a.jitter_strength)
        self.blur = tuple(float(p) for p in a.blur)
        self.solarize = float(a.solarize)
        if len(self.jitter_strength) != 4 or len(self.blur) != 3:
            raise ValueError("augment.jitter_strength needs 4 values (brightness, contrast, "
                             "saturation, hue) and augment.blur 3 (global 1, global 2, local)")

    def _crop(self, img: Image.Image, rng: np.random.Generator, size: int,
              scale: tuple[float, float], p_blur: float, p_solarize: float) -> np.ndarray:
        """One augmented crop, uint8 [size, size, 3]."""
        u = rng.random(_N_DRAWS)
        box = _crop_box(u[:4 * _RRC_ATTEMPTS].reshape(_RRC_ATTEMPTS, 4), img.height, img.width,
                        scale)
        (u_hflip, u_vflip, u_rot, u_jitter, u_gray, u_blur, u_sigma,
         u_solarize) = u[4 * _RRC_ATTEMPTS:4 * _RRC_ATTEMPTS + 8].tolist()
        u_strength, u_order = u[-8:-4].tolist(), u[-4:]
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if u_hflip < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if u_vflip < self.vflip:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        rotation = _ROTATIONS[int(u_rot * 4)] if self.rot90 else None
        if rotation is not None:
            out = out.transpose(rotation)
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

        Draws from `rng` in a fixed order (global 1, global 2, locals), so equal generator
        states give equal crops.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"MultiCrop expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
        img = Image.fromarray(image, "RGB")
        gs, ls = self.global_size, self.local_size
        global_crops = np.empty((2, gs, gs, 3), np.uint8)
        global_crops[0] = self._crop(img, rng, gs, self.global_scale, self.blur[0], 0.0)
        global_crops[1] = self._crop(img, rng, gs, self.global_scale, self.blur[1], self.solarize)
        local_crops = np.empty((self.n_local, ls, ls, 3), np.uint8)
        for i in range(self.n_local):
            local_crops[i] = self._crop(img, rng, ls, self.local_scale, self.blur[2], 0.0)
        return {"global_crops": global_crops, "local_crops": local_crops}
