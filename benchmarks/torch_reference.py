"""A plain PyTorch (eager) DINOv2 train step: the peer `benchmarks/train_step.py --peer torch`
times cfm's jitted step against, same shapes in the same run.

The model and losses follow facebookresearch/dinov2 (Oquab et al. 2023, arXiv:2304.07193) as
cfm implements them (`cfm.models.vit`, `cfm.models.heads`, `cfm.ssl.dinov2`): ViT with LayerScale
and stochastic depth, `F.scaled_dot_product_attention` (flash attention on CUDA in bf16), exact
GELU, a strided-convolution patch embedding (the usual PyTorch spelling), bicubic position
embeddings for the local crops, a mask token for iBOT; the shared DINO head (3-layer MLP,
L2 normalisation, weight-normalised prototypes); an EMA teacher on the global crops with softmax
centering; DINO + iBOT (heads on DINOv2's fixed-size masked-token buffer, padding rows weighted 0)
+ 0.1 KoLeo; AdamW (foreach) with BEiT layer-wise lr decay groups, per-module gradient clipping
and the prototype layer frozen as in DINOv2's first epoch (its gradients set to None).

torch is an optional extra (`pip install torch`); nothing in cfm imports this file. On CUDA
`bf16=True` runs the forward passes under `torch.autocast(dtype=torch.bfloat16)`, DINOv2's own
mixed precision; losses stay float32.
"""

from __future__ import annotations

import copy
import json
import math
import time

import os
import sys
import types

import numpy as np

try:  # optional: --help works without torch; a run needs it
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    torch = F = None
    nn = types.SimpleNamespace(Module=object)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cfm import cli_help  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample (Huang et al. 2016)."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, drop: float, ls: float = 1e-5):
        super().__init__()
        self.heads, self.drop = heads, drop
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.ls1, self.ls2 = (nn.Parameter(torch.full((dim,), ls)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, Dh]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + drop_path(self.ls1 * self.proj(y), self.drop, self.training)
        y = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + drop_path(self.ls2 * y, self.drop, self.training)


class ViT(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp: int, patch: int, img: int,
                 drop: float):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        n = (img // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, width) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 1e-6)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp, drop) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, H, W] normalised -> tokens [B, 1 + N, D] after the final norm."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x)
        pos = self.pos_embed[:, 1:]
        old, grid = int(round(pos.shape[1] ** 0.5)), images.shape[-1] // self.patch
        if grid != old:
            pos = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x + pos.to(x.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class DINOHead(nn.Module):
    def __init__(self, dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1, eps=1e-12)
        return self.last_layer(x).float()


class Student(nn.Module):
    def __init__(self, spec: tuple[int, int, int, int, int], img: int, prototypes: int,
                 drop: float):
        super().__init__()
        self.backbone = ViT(*spec, img=img, drop=drop)
        self.dino_head = DINOHead(spec[0], prototypes)


def _lsm(logits: torch.Tensor, temp: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temp, dim=-1)


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019) as DINOv2's KoLeoLoss: -mean log nearest distance."""
    z = F.normalize(x.float(), dim=-1, eps=eps)
    dots = z @ z.t()
    dots.fill_diagonal_(-1.0)
    nn_idx = dots.argmax(dim=1)
    return -torch.log(torch.linalg.vector_norm(z - z[nn_idx], dim=-1) + eps).mean()


def param_groups(model: Student, lr: float, wd: float, decay: float, depth: int) -> list[dict]:
    """DINOv2's groups: BEiT layer-wise lr decay, no weight decay on biases/norms/tokens/gammas,
    patch embedding at 0.2x."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("backbone.") and not name.startswith("backbone.norm."):
            layer = 0
        else:
            layer = depth + 1
        mult = decay ** (depth + 1 - layer) * (0.2 if "patch_embed" in name else 1.0)
        no_wd = p.ndim == 1 or any(k in name for k in ("token", "pos_embed", "ls1", "ls2"))
        groups.setdefault((mult, 0.0 if no_wd else wd), []).append(p)
    return [{"params": ps, "lr": lr * m, "weight_decay": w} for (m, w), ps in groups.items()]


def benchmark(spec: tuple[int, int, int, int, int], batch: int, n_local: int, global_size: int,
              local_size: int, prototypes: int, buffer_size: int, masks: np.ndarray,
              steps: int = 3, device: str = "cpu", bf16: bool = False, drop_path_rate: float = 0.3,
              teacher_temp: float = 0.04, seed: int = 0) -> dict[str, float]:
    """Median seconds of one DINOv2 step (after one warm-up) and its loss.

    spec: (width, depth, heads, mlp hidden, patch); masks: [2 * batch, N] bool iBOT masks in
    cfm's image-major crop order (row 2i + c = crop c of image i); buffer_size: the static
    masked-token buffer cfm's step uses (DINOv2's `upperbound`)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    depth = spec[1]
    student = Student(spec, global_size, prototypes, drop_path_rate).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(student, 1e-4, 0.04, 0.9, depth), betas=(0.9, 0.999),
                            foreach=True)
    rng = np.random.default_rng(seed)
    gl = torch.from_numpy(rng.integers(0, 256, (batch * 2, 3, global_size, global_size),
                                       dtype=np.uint8)).to(dev)
    lo = torch.from_numpy(rng.integers(0, 256, (batch * n_local, 3, local_size, local_size),
                                       dtype=np.uint8)).to(dev)
    m = torch.from_numpy(np.asarray(masks, bool)).to(dev)
    centers = {k: torch.zeros(prototypes, device=dev) for k in ("dino", "ibot")}
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    st, n_terms = 0.1, 2 * (2 - 1) + 2 * n_local
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> float:
        g = (gl.float() / 255.0 - mean) / std
        loc = (lo.float() / 255.0 - mean) / std
        flat = m.reshape(-1)
        idx = torch.nonzero(flat).flatten()
        n_masked = idx.numel()
        idx = F.pad(idx, (0, buffer_size - n_masked))  # DINOv2's upperbound buffer
        valid = torch.arange(buffer_size, device=dev) < n_masked
        n_patch = m.shape[1]
        per_image = m.sum(1).clamp(min=1)
        weights = torch.where(valid, 1.0 / per_image[idx // n_patch], 0.0)
        with torch.no_grad(), autocast():
            t_tok = teacher.backbone(g)
            t_cls = teacher.dino_head(t_tok[:, 0])
            t_ibot = teacher.dino_head(t_tok[:, 1:].reshape(-1, t_tok.shape[-1])[idx])
            p_cls = F.softmax((t_cls - centers["dino"]) / teacher_temp, -1)
            p_ibot = F.softmax((t_ibot - centers["ibot"]) / teacher_temp, -1)
            centers["dino"].mul_(0.9).add_(t_cls.mean(0), alpha=0.1)
            w = valid.float()
            mean_ibot = (w[:, None] * t_ibot).sum(0) / w.sum().clamp(min=1)
            centers["ibot"].mul_(0.9).add_(mean_ibot, alpha=0.1)
        with autocast():
            s_g = student.backbone(g, m)
            s_l = student.backbone(loc)
            cls = torch.cat([s_g[:, 0], s_l[:, 0]])
            s_cls = student.dino_head(cls)
            s_ibot = student.dino_head(s_g[:, 1:].reshape(-1, s_g.shape[-1])[idx])
        k = prototypes
        lsm_g = _lsm(s_cls[: 2 * batch], st).reshape(batch, 2, k)
        lsm_l = _lsm(s_cls[2 * batch:], st).reshape(batch, n_local, k)
        t = p_cls.reshape(batch, 2, k)
        cross = torch.einsum("btk,bsk->bts", t, lsm_g) * (1 - torch.eye(2, device=dev))
        dino = -(cross.sum() + torch.einsum("btk,blk->", t, lsm_l)) / (batch * n_terms)
        per_tok = (torch.where(valid[:, None], p_ibot, 0.0)
                   * _lsm(torch.where(valid[:, None], s_ibot, 0.0), st)).sum(-1)
        ibot = -(weights * per_tok).sum() / (2 * batch)
        s_cls_g = s_g[:, 0].reshape(batch, 2, -1)
        reg = koleo(s_cls_g[:, 0]) + koleo(s_cls_g[:, 1])
        loss = dino + ibot + 0.1 * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in student.dino_head.last_layer.parameters():  # frozen in the first epoch
            p.grad = None
        nn.utils.clip_grad_norm_(student.backbone.parameters(), 3.0, foreach=True)
        nn.utils.clip_grad_norm_(student.dino_head.parameters(), 3.0, foreach=True)
        opt.step()
        with torch.no_grad():  # EMA teacher
            torch._foreach_mul_(t_params, 0.992)
            torch._foreach_add_(t_params, s_params, alpha=1 - 0.992)
        return loss.detach()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    loss = step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    out = {"step_s": step_s, "images_per_s": batch / step_s, "loss": float(loss)}
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"torch reference step: loss {out['loss']}")
    return out


def main() -> None:
    """Command line for `train_step.py --peer torch`, which runs this in its own process first
    (no shared thread pools or GPU memory with JAX); prints one JSON line."""
    ap = cli_help.parser(
        "benchmarks.torch_reference", __doc__,
        "python -m benchmarks.torch_reference --spec 384,12,6,1536,16 --batch 16 "
        "--local-crops 8 --global-size 224 --local-size 96 --prototypes 65536 --buffer 1600 "
        "--masks MASKS.npy")
    ap.add_argument("--spec", required=True, help="width,depth,heads,mlp,patch (required)")
    ap.add_argument("--batch", type=int, required=True, help="images per step (required)")
    ap.add_argument("--local-crops", type=int, required=True,
                    help="local crops per image (required)")
    ap.add_argument("--global-size", type=int, required=True,
                    help="global crop side, pixels (required)")
    ap.add_argument("--local-size", type=int, required=True,
                    help="local crop side, pixels (required)")
    ap.add_argument("--prototypes", type=int, required=True,
                    help="DINO prototypes (required)")
    ap.add_argument("--buffer", type=int, required=True,
                    help="masked-token buffer rows (required)")
    ap.add_argument("--masks", required=True,
                    help=".npy of [2 * batch, N] bool iBOT masks (required)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (DINOv2's AMP)")
    ap.add_argument("--drop-path", type=float, default=0.3, help="stochastic depth rate")
    a = ap.parse_args()
    if torch is None:
        sys.exit('torch_reference: torch is not installed; pip install torch (the peer step of '
                 'benchmarks/train_step.py --peer torch needs it)')
    spec = tuple(int(v) for v in a.spec.split(","))
    masks = np.load(a.masks, allow_pickle=False)
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    out = benchmark(spec, a.batch, a.local_crops, a.global_size, a.local_size, a.prototypes,
                    a.buffer, masks, a.steps, device, a.bf16, a.drop_path)
    out.update(torch=torch.__version__, threads=torch.get_num_threads(), device=device,
               sdpa_flash=bool(torch.backends.cuda.flash_sdp_enabled()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
