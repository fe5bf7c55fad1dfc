"""Batched SSL augmentations with per-image random parameters drawn from an explicit generator.

The pipeline (BYOL / Barlow Twins recipe, docs/method.md §4), applied to a uint8 batch (B, C, H, W):

1. random resized crop to ``image_size`` (area fraction in ``crop_scale``, log-uniform aspect ratio
   in ``crop_ratio``) with the horizontal flip folded into the same affine map: one
   ``F.affine_grid`` + ``F.grid_sample`` (bilinear, border padding) for the whole batch;
2. colour jitter with probability ``jitter_p``, in the fixed order brightness, contrast,
   saturation, hue (torchvision draws a random order; we do not). Brightness ``x * b``; contrast
   ``c * x + (1 - c) * mean(gray(x))``; saturation ``s * x + (1 - s) * gray(x)``; each clamped to
   [0, 1]. Hue is a rotation by ``2 * pi * h`` of the chroma plane (I, Q) in YIQ space — one 3x3
   matrix per image applied with one ``bmm`` — an approximation of torchvision's HSV hue shift;
3. grayscale with probability ``grayscale_p`` (ITU-R 601 luma, copied to all channels);
4. Gaussian blur with probability ``blur_p`` (sigma uniform in ``blur_sigma``, kernel ~10% of the
   image side, odd, reflect padding; separable grouped convolution over the selected images);
5. solarization with probability ``solarize_p`` (pixels >= 0.5 become 1 - x);
6. normalisation ``(x - mean) / std``.

Single-channel images skip saturation, hue and grayscale. Barlow Twins uses asymmetric views:
``blur_p`` and ``solarize_p`` are (view 1, view 2) pairs, defaulting to blur (1.0, 0.1) and solarize
(0.0, 0.2). For images smaller than 64 px the default blur is (0.0, 0.0): at 32x32 the kernel is
3x3 and blurring removes much of the little detail there is; common CIFAR recipes drop it.

:class:`DiffAugment` makes views of NORMALISED FLOAT images instead (the learned pixels of a
synthetic set, which :class:`SSLAugment`'s uint8 pipeline cannot take), differentiable w.r.t. the
pixels: the same random resized crop + flip (one affine map, bilinear, border padding), colour
jitter with probability ``jitter_p`` (brightness, contrast, saturation; no hue) and grayscale with
probability ``grayscale_p``, computed in [0, 1] pixel units (x * std + mean) and normalised again;
no blur, solarisation or clamping. Given its drawn parameters (:class:`ViewParams`) a view is an
affine function of the pixels. ``mkdt analyze mtt`` uses it for its Barlow Twins experts and its
inner loop.

Why hand-written and not kornia.augmentation: measured on the 2-core CPU used for development
(torch 2.14, kornia 0.9, 2 threads, a batch of 256 uint8 3x32x32 images, crop + flip + colour
jitter + grayscale + solarize + normalise, median of 20 runs, three repeats): kornia 58-69 ms per
batch (best single run 49 ms), this module 14.0-14.7 ms per batch (best 11 ms), about 4x faster.
Kornia also draws from torch's global RNG, not from a generator, and is not a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    """n samples of U(lo, hi), drawn on the generator's device and moved to ``device``."""
    return (lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)).to(device)


def _bernoulli(g: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    """n boolean samples, each True with probability p."""
    return (torch.rand(n, generator=g, device=g.device) < p).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch (B, 3, H, W) -> (B, 1, H, W); identity for one channel."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(f * x + (1 - f) * other, 0, 1) with a per-image factor f of shape (B,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def _hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """Per-image RGB matrices M^-1 R(2 pi h) M, (B, 3, 3); M = RGB->YIQ, R rotates the I/Q plane."""
    theta = 2 * math.pi * hue.double()
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64, device=hue.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return _YIQ_TO_RGB.to(hue.device) @ rot @ _RGB_TO_YIQ.to(hue.device)


def _check_range(name: str, value: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must be a range (a, b) with {lo} <= a <= b <= {hi}, got {value}")
    return a, b


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


def _view_probs(name: str, value: float | Sequence[float]) -> tuple[float, float]:
    pair = (value, value) if isinstance(value, int | float) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a probability or a (view 1, view 2) pair, got {value}")
    return _check_prob(name, pair[0]), _check_prob(name, pair[1])


class SSLAugment:
    """Random SSL views of a uint8 image batch, reproducible from a ``torch.Generator``.

    ``aug(images, generator, view=0)`` returns one float32 normalised view (B, C, S, S) with
    S = ``image_size``; ``aug.two_views(images, generator)`` returns the asymmetric pair. Every
    image gets its own random parameters. ``blur_p`` and ``solarize_p`` are a probability (both
    views) or a (view 1, view 2) pair; ``blur_p=None`` means (1.0, 0.1) for images of at least
    64 px and (0.0, 0.0) below. ``jitter`` = (brightness, contrast, saturation, hue) strengths as in
    torchvision's ColorJitter. ``crop_scale=(1, 1)`` with ``crop_ratio=(1, 1)`` disables the crop.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_scale: Sequence[float] = (0.2, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float | Sequence[float] | None = None,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float | Sequence[float] = (0.0, 0.2),
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(mean) != len(std) or len(mean) == 0 or min(std) <= 0:
            raise ValueError(
                f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}"
            )
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "jitter must be (brightness, contrast, saturation, hue) with all >= 0 and "
                f"hue <= 0.5, got {jitter}"
            )
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_scale = _check_range("crop_scale", crop_scale, 1e-6, 1.0)
        self.crop_ratio = _check_range("crop_ratio", crop_ratio, 1e-6, math.inf)
        self.flip_p = _check_prob("flip_p", flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.grayscale_p = _check_prob("grayscale_p", grayscale_p)
        if blur_p is None:
            blur_p = (1.0, 0.1) if image_size >= 64 else (0.0, 0.0)
        self.blur_p = _view_probs("blur_p", blur_p)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, 1e-6, math.inf)
        self.blur_kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        self.solarize_p = _view_probs("solarize_p", solarize_p)

    def __call__(self, images: torch.Tensor, generator: torch.Generator, view: int = 0) -> torch.Tensor:
        """One augmented, normalised float32 view of ``images`` (uint8, (B, C, H, W))."""
        if images.dim() != 4 or images.dtype != torch.uint8 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"SSLAugment expects a uint8 batch (B, {len(self.mean)}, H, W), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if view not in (0, 1):
            raise ValueError(f"view must be 0 or 1, got {view}")
        x = images.float() / 255
        x = self._crop_flip(x, generator)
        if self.jitter_p > 0 and any(self.jitter):
            x = self._color_jitter(x, generator)
        if self.grayscale_p > 0 and x.shape[1] == 3:
            x = self._grayscale(x, generator)
        if self.blur_p[view] > 0:
            x = self._blur(x, generator, self.blur_p[view])
        if self.solarize_p[view] > 0:
            x = self._solarize(x, generator, self.solarize_p[view])
        return self._normalise(x)

    def two_views(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two asymmetric views (view 1 then view 2) of the Barlow Twins / BYOL recipe."""
        return self(images, generator, view=0), self(images, generator, view=1)

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random resized crop + horizontal flip as one per-image affine sampling grid.

        Crop width/height fractions w = sqrt(a * r), h = sqrt(a / r) (clamped to 1), centre uniform
        inside the image; in normalised coordinates x_in = s * w * x_out + c_x, s = -1 if flipped.
        """
        b, dev = x.shape[0], x.device
        area = _uniform(g, b, *self.crop_scale, dev)
        log_r = _uniform(g, b, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), dev)
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1)
        cx = (1 - w) * _uniform(g, b, -1, 1, dev)
        cy = (1 - h) * _uniform(g, b, -1, 1, dev)
        sign = 1 - 2 * _bernoulli(g, b, self.flip_p, dev).float()
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sign * w, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        size = (b, x.shape[1], self.image_size, self.image_size)
        grid = F.affine_grid(theta, list(size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation, hue (fixed order) on a random subset (p = jitter_p)."""
        b, dev = x.shape[0], x.device
        apply = _bernoulli(g, b, self.jitter_p, dev)
        bri, con, sat, hue = self.jitter

        def factor(strength: float) -> torch.Tensor:
            f = _uniform(g, b, max(0.0, 1 - strength), 1 + strength, dev)
            return torch.where(apply, f, torch.ones_like(f))

        f_b, f_c, f_s = factor(bri), factor(con), factor(sat)
        f_h = torch.where(apply, _uniform(g, b, -hue, hue, dev), torch.zeros(b, device=dev))
        if bri > 0:
            x = (x * f_b.view(-1, 1, 1, 1)).clamp(0, 1)
        if con > 0:
            x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f_c)
        if x.shape[1] != 3:
            return x
        if sat > 0:
            x = _blend(x, _gray(x), f_s)
        if hue > 0:
            mats = _hue_matrices(f_h).to(x.dtype)
            x = torch.bmm(mats, x.flatten(2)).view_as(x).clamp(0, 1)
        return x

    def _grayscale(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mask = _bernoulli(g, x.shape[0], self.grayscale_p, x.device).view(-1, 1, 1, 1)
        return torch.where(mask, _gray(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
        """Gaussian blur, kernel exp(-t^2 / (2 sigma^2)) normalised, on the selected images only."""
        b, c, hgt, wid = x.shape
        mask = _bernoulli(g, b, p, x.device)
        sigma = _uniform(g, b, *self.blur_sigma, x.device)
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        half = self.blur_kernel // 2
        t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
        kern = torch.exp(-(t**2) / (2 * sigma[idx, None] ** 2))
        kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        n = idx.numel() * c
        y = F.pad(x[idx].reshape(1, n, hgt, wid), (half, half, half, half), mode="reflect")
        y = F.conv2d(y, kern.view(n, 1, 1, -1), groups=n)
        y = F.conv2d(y, kern.view(n, 1, -1, 1), groups=n)
        return x.index_copy(0, idx, y.view(-1, c, hgt, wid))

    def _solarize(self, x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
        mask = _bernoulli(g, x.shape[0], p, x.device).view(-1, 1, 1, 1)
        return torch.where(mask & (x >= 0.5), 1 - x, x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one :class:`DiffAugment` view of b images."""

    affine: torch.Tensor  # (b, 2, 3): crop + flip, output -> input coordinates (affine_grid's theta)
    colour: torch.Tensor  # (b, 3): brightness, contrast, saturation factors (1 = unchanged)
    gray: torch.Tensor  # (b,) bool: grayscale


class DiffAugment:
    """Random SSL views of normalised float images, differentiable w.r.t. the pixels (see the module
    docstring): :meth:`sample` draws per-image :class:`ViewParams` from a generator, :meth:`apply`
    maps (b, C, H, W) normalised images to normalised views of the same size and dtype.

    Crop: area fraction a ~ U(``crop_scale``), log aspect ratio ~ U(log ``crop_ratio``), width and
    height fractions w = sqrt(a r), h = sqrt(a / r) (clamped to 1), centre uniform inside the image;
    flipped with probability ``flip_p``. ``jitter`` = (brightness, contrast, saturation) strengths s,
    factors ~ U(max(0, 1 - s), 1 + s) for each image selected with probability ``jitter_p``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float] = (0.4, 0.4, 0.4),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        if len(mean) != len(std) or len(mean) == 0 or min(std) <= 0:
            raise ValueError(
                f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}"
            )
        if len(jitter) != 3 or min(jitter) < 0:
            raise ValueError(f"jitter must be (brightness, contrast, saturation) with all >= 0, got {jitter}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_scale = _check_range("crop_scale", crop_scale, 1e-6, 1.0)
        self.crop_ratio = _check_range("crop_ratio", crop_ratio, 1e-6, math.inf)
        self.flip_p = _check_prob("flip_p", flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.grayscale_p = _check_prob("grayscale_p", grayscale_p)

    def describe(self) -> dict[str, Any]:
        """The augmentation's settings (JSON-able; e.g. part of a definition that uses it)."""
        return {
            "crop_scale": list(self.crop_scale),
            "crop_ratio": list(self.crop_ratio),
            "flip_p": self.flip_p,
            "jitter": list(self.jitter),
            "jitter_p": self.jitter_p,
            "grayscale_p": self.grayscale_p,
        }

    def sample(self, b: int, gen: torch.Generator, device: torch.device) -> ViewParams:
        """Parameters of one view of b images, drawn from ``gen`` (on its device), moved to ``device``."""
        g, at = gen, gen.device
        area = _uniform(g, b, *self.crop_scale, at)
        log_r = _uniform(g, b, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), at)
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1)
        cx, cy = (1 - w) * _uniform(g, b, -1, 1, at), (1 - h) * _uniform(g, b, -1, 1, at)
        sign = 1 - 2 * _bernoulli(g, b, self.flip_p, at).float()
        affine = torch.zeros(b, 2, 3, device=at)
        affine[:, 0, 0], affine[:, 0, 2], affine[:, 1, 1], affine[:, 1, 2] = sign * w, cx, h, cy
        apply = _bernoulli(g, b, self.jitter_p, at)
        factors = torch.stack([_uniform(g, b, max(0.0, 1 - s), 1 + s, at) for s in self.jitter], dim=1)
        colour = torch.where(apply[:, None], factors, torch.ones_like(factors))
        gray = _bernoulli(g, b, self.grayscale_p, at)
        return ViewParams(affine.to(device), colour.to(device), gray.to(device))

    def apply(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The view of normalised images ``x`` (b, C, H, W) with parameters ``p``: u = x * std + mean
        cropped and flipped, then u * brightness, c u + (1 - c) mean(gray(u)) (contrast), s u +
        (1 - s) gray(u) (saturation) and gray(u) where grayscaled (3 channels only for those two),
        returned as (u - mean) / std."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        u = x * std + mean
        grid = F.affine_grid(p.affine.to(x.dtype), list(u.shape), align_corners=False)
        u = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=False)
        f = p.colour.to(x.dtype)
        u = u * f[:, 0].view(-1, 1, 1, 1)
        c = f[:, 1].view(-1, 1, 1, 1)
        u = c * u + (1 - c) * _gray(u).mean(dim=(1, 2, 3), keepdim=True)
        if u.shape[1] == 3:
            s = f[:, 2].view(-1, 1, 1, 1)
            u = s * u + (1 - s) * _gray(u)
            u = torch.where(p.gray.view(-1, 1, 1, 1), _gray(u).expand_as(u), u)
        return (u - mean) / std

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random view of ``x`` (parameters drawn from ``gen``)."""
        return self.apply(x, self.sample(len(x), gen, x.device))
