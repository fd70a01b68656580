"""TopoFR's random structure perturbation (RSP): each image, with probability ξ, gets one of four torchvision/timm
style corruptions, applied batched on the images' device.

The random draws (which rows, which op, its parameters) are made on the CPU generator: they are a few numbers per
perturbed row, and knowing the rows on the host lets each op run on just its rows without a device synchronisation
(host-to-device copies are non-blocking and no tensor is built from Python numbers on the device).
Ops work on images in [-1, 1]; blur, grayscale and jitter act on the [0, 1] view as torchvision does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from faceforge.runtime import at_least_fp32

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
BLUR_KERNEL = (5, 9)  # torchvision GaussianBlur(kernel_size=(5, 9)): 5 taps across the width, 9 down the height
BLUR_SIGMA = (0.1, 5.0)
JITTER = {"brightness": (0.1, 0.5), "contrast": (0.3, 0.6), "saturation": (0.2, 0.5), "hue": (-0.1, 0.3)}
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing defaults, probability 1, constant 0 fill, one region, 10 attempts
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def grayscale(x01: torch.Tensor) -> torch.Tensor:
    """Luma [n, 1, H, W] of RGB images in [0, 1]."""
    r, g, b = x01.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _gaussian_taps(sigma: torch.Tensor, size: int) -> torch.Tensor:
    t = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    taps = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image [n, C, H, W] with its own sigma [n], reflect padding (torchvision)."""
    n, c, h, w = x.shape
    kx, ky = BLUR_KERNEL
    sigma = sigma.to(x.device, x.dtype, non_blocking=True)
    taps_x = _gaussian_taps(sigma, kx).repeat_interleave(c, dim=0)
    taps_y = _gaussian_taps(sigma, ky).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    y = F.conv2d(y, taps_x[:, None, None, :], groups=n * c)
    y = F.conv2d(y, taps_y[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def rgb_to_hsv(x01: torch.Tensor) -> torch.Tensor:
    """HSV [n, 3, H, W], all channels in [0, 1], of RGB images in [0, 1]."""
    r, g, b = x01.unbind(dim=1)
    v = x01.amax(dim=1)
    spread = v - x01.amin(dim=1)
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(spread > 0, torch.remainder(hue / 6, 1.0), torch.zeros_like(hue))
    sat = torch.where(v > 0, spread / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([hue, sat, v], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: channel k = V − V·S·clamp(min(t, 4 − t), 0, 1), t = (m_k + 6H) mod 6, m = 5, 3, 1."""
    hue, sat, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    m = 5 - 2 * torch.arange(3, dtype=hsv.dtype, device=hsv.device)[:, None, None]
    t = torch.remainder(m + 6 * hue, 6.0)
    return v - v * sat * torch.minimum(t, 4 - t).clamp(0.0, 1.0)


def _on_rows(x: torch.Tensor, rows: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """x[rows] = fn(x[rows], rows on x's device), in place; `rows` [k] is a CPU index tensor (no device sync)."""
    if len(rows):
        idx = rows.to(x.device, non_blocking=True)
        x.index_copy_(0, idx, fn(x.index_select(0, idx), idx).to(x.dtype))


def color_jitter(x01: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter on images in [0, 1]: factors [n, 4] = (brightness, contrast, saturation, hue),
    applied in each row's own order [n, 4] (a permutation of 0..3, on the CPU)."""
    ops = (
        lambda y, b: (b * y).clamp(0, 1),
        lambda y, c: (c * y + (1 - c) * grayscale(y).mean(dim=(2, 3), keepdim=True)).clamp(0, 1),
        lambda y, s: (s * y + (1 - s) * grayscale(y)).clamp(0, 1),
        _shift_hue,
    )
    out = x01.clone()
    factors = factors.to(x01.device, x01.dtype, non_blocking=True)
    for step in range(4):
        for k, op in enumerate(ops):
            _on_rows(out, torch.nonzero(order[:, step] == k).flatten(),
                     lambda y, idx: op(y, factors[idx, k, None, None, None]))
    return out


def _shift_hue(x01: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x01)
    return hsv_to_rgb(torch.cat([torch.remainder(hsv[:, :1] + shift, 1.0), hsv[:, 1:]], dim=1))


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero each image's box [n, 4] = (top, left, height, width); a box of height 0 leaves the image unchanged."""
    top, left, height, width = (v.to(x.device, non_blocking=True)[:, None, None, None] for v in boxes.unbind(dim=1))
    rows = torch.arange(x.shape[2], device=x.device)[None, None, :, None]
    cols = torch.arange(x.shape[3], device=x.device)[None, None, None, :]
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return x.masked_fill(inside, 0.0)


def draw_erase_boxes(n: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """timm's box search, batched: the first of 10 (area, aspect) draws that fits; (0, 0, 0, 0) when none does."""
    area = height * width * _uniform(n * ERASE_ATTEMPTS, *ERASE_AREA, generator).view(n, ERASE_ATTEMPTS)
    log_aspect = _uniform(n * ERASE_ATTEMPTS, *(math.log(a) for a in ERASE_ASPECT), generator).view(n, ERASE_ATTEMPTS)
    h = torch.round(torch.sqrt(area * torch.exp(log_aspect))).long()
    w = torch.round(torch.sqrt(area / torch.exp(log_aspect))).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1, keepdim=True)
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(dim=1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = (u[:, 0] * (height - h + 1)).long()
    left = (u[:, 1] * (width - w + 1)).long()
    return torch.stack([top, left, h, w], dim=1) * found[:, None]


def _blur(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return gaussian_blur(x, _uniform(len(x), *BLUR_SIGMA, generator))


def _gray(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return grayscale(x * 0.5 + 0.5).expand_as(x) * 2 - 1


def _jitter(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    factors = torch.stack([_uniform(len(x), *r, generator) for r in JITTER.values()], dim=1)
    order = torch.rand(len(x), 4, generator=generator).argsort(dim=1)
    return color_jitter(x * 0.5 + 0.5, factors, order) * 2 - 1


def _erase(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return erase(x, draw_erase_boxes(len(x), x.shape[2], x.shape[3], generator))


OPS = {"erase": _erase, "blur": _blur, "gray": _gray, "jitter": _jitter}


def random_structure_perturbation(
    images: torch.Tensor, xi: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A perturbed copy of `images` [B, 3, H, W] in [-1, 1] (never modified) and the op index per row (-1: none).

    Each row is perturbed with probability `xi` by one op drawn uniformly from OPS.
    """
    out = images.clone()
    n = images.shape[0]
    chosen = torch.rand(n, generator=generator) < xi
    op = torch.where(chosen, torch.randint(len(OPS), (n,), generator=generator), -1)
    for k, fn in enumerate(OPS.values()):
        _on_rows(out, torch.nonzero(op == k).flatten(), lambda y, idx: fn(at_least_fp32(y), generator))
    return out, op
