"""The training transforms on a whole batch on the training device, with the PIL path's decisions.

The PIL path (data/transforms.py) seeds torch's generator with each image's seed (from
SeededSampler), then RandomHorizontalFlip draws `torch.rand(1)`, RandomCrop draws the two
offsets with `torch.randint`, and RandomErasing draws its coin and rectangle. `draw_params`
replays exactly those draws, in that order, from a generator seeded the same way, so every
image is flipped, cropped and erased as the PIL path would have done it; resume and world-size
equivalence therefore hold on either path. `BatchAugment` then applies the decisions to a
uint8 N x H x W x 3 batch in a few tensor operations: flip, pad and crop as one gather (the
padding reads as 0, like T.Pad(fill=0)), ToTensor's division by 255, Normalize, erasing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from strongreid.data.transforms import RandomErasing


@dataclass
class AugmentParams:
    """Per-image decisions of a batch (CPU tensors of length N)."""

    flip: torch.Tensor  # bool
    top: torch.Tensor  # int64, crop offset in the padded image
    left: torch.Tensor  # int64
    erase: torch.Tensor  # int64 N x 4: top, left, h, w; h = 0 when not erased
    noise: list[torch.Tensor | None]  # 'random' fill: the N(0, 1) patch of each erased image


class BatchAugment:
    """Flip, pad + random crop, ToTensor, Normalize, random erasing for a batch on any device."""

    def __init__(self, size: Sequence[int], flip_prob: float, padding: int, erasing: RandomErasing,
                 mean: Sequence[float], std: Sequence[float], train: bool = True) -> None:
        self.height, self.width = int(size[0]), int(size[1])
        self.flip_prob = float(flip_prob)
        self.padding = int(padding)
        self.erasing = erasing
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.train = train
        self._consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # -- the decisions (CPU, per image, replaying the PIL path's draws) -------------------------
    def draw_params(self, seeds: Sequence[int]) -> AugmentParams:
        """Each image's decisions from its seed, as the seeded PIL transforms draw them."""
        n = len(seeds)
        flip = torch.zeros(n, dtype=torch.bool)
        top = torch.zeros(n, dtype=torch.int64)
        left = torch.zeros(n, dtype=torch.int64)
        erase = torch.zeros(n, 4, dtype=torch.int64)
        noise: list[torch.Tensor | None] = [None] * n
        h, w, p = self.height, self.width, self.padding
        ph, pw = h + 2 * p, w + 2 * p
        er = self.erasing
        g = torch.Generator()
        for k, seed in enumerate(seeds):
            g.manual_seed(int(seed))
            flip[k] = bool(torch.rand(1, generator=g) < self.flip_prob)
            if not (ph == h and pw == w):  # RandomCrop draws nothing when the sizes are equal
                top[k] = int(torch.randint(0, ph - h + 1, size=(1,), generator=g).item())
                left[k] = int(torch.randint(0, pw - w + 1, size=(1,), generator=g).item())
            if er.probability == 0.0 or torch.rand((), generator=g).item() >= er.probability:
                continue
            rect = self._erase_rect(g, h, w)
            if rect is None:
                continue
            erase[k] = torch.tensor(rect)
            if er.fill == "random":
                noise[k] = torch.randn((3, rect[2], rect[3]), generator=g)
        return AugmentParams(flip, top, left, erase, noise)

    def _erase_rect(self, g: torch.Generator, height: int, width: int) -> tuple[int, int, int, int] | None:
        # RandomErasing.get_params with an explicit generator: same draws, same order.
        er = self.erasing
        area = height * width
        for _ in range(er.attempts):
            target = (er.sl + (er.sh - er.sl) * torch.rand((), generator=g).item()) * area
            aspect = er.r1 + (1.0 / er.r1 - er.r1) * torch.rand((), generator=g).item()
            eh = round(math.sqrt(target * aspect))
            ew = round(math.sqrt(target / aspect))
            if ew < width and eh < height:
                t = int(torch.randint(0, height - eh + 1, (), generator=g).item())
                lft = int(torch.randint(0, width - ew + 1, (), generator=g).item())
                return t, lft, eh, ew
        return None

    # -- applying them (batched, on the images' device) -----------------------------------------
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._consts:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            fill = mean.clone() if self.erasing.fill == "original" else torch.zeros_like(mean)
            rows = torch.arange(self.height, device=device)
            cols = torch.arange(self.width, device=device)
            self._consts[device] = (mean, std, fill, rows, cols)
        return self._consts[device]

    def __call__(self, images: torch.Tensor, params: AugmentParams | None = None) -> torch.Tensor:
        """uint8 N x H x W x 3 (any device) -> normalised float32 N x 3 x H x W on that device."""
        device = images.device
        mean, std, fill, rows, cols = self._constants(device)
        if params is not None and self.train:
            images = (self._flip_crop_loop if device.type == "cpu" else self._flip_crop_gather)(images, params)
        # ToTensor: to float, / 255; then Normalize: (x - mean) / std, the same operations.
        x = images.permute(0, 3, 1, 2).to(torch.float32).div(255).sub_(mean).div_(std)
        if params is not None and self.train and bool((params.erase[:, 2] > 0).any()):
            x = self._erase(x, params, fill, rows, cols)
        return x.contiguous()

    def _flip_crop_gather(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Flip + pad + crop of the whole batch as one gather: a single kernel on a GPU."""
        device, n, p = images.device, images.shape[0], self.padding
        rows, cols = self._constants(device)[3:]
        flip = params.flip.to(device, non_blocking=True)
        top = params.top.to(device, non_blocking=True)
        left = params.left.to(device, non_blocking=True)
        # Output pixel (y, x) reads the flipped image at (y + top - p, x + left - p); outside the
        # image it is the zero padding.
        src_y = rows.view(1, -1) + (top - p).view(-1, 1)  # N x H
        src_x = cols.view(1, -1) + (left - p).view(-1, 1)  # N x W
        src_x = torch.where(flip.view(-1, 1), self.width - 1 - src_x, src_x)
        valid = ((src_y >= 0) & (src_y < self.height)).unsqueeze(2) & \
                ((src_x >= 0) & (src_x < self.width)).unsqueeze(1)  # N x H x W
        batch = torch.arange(n, device=device).view(-1, 1, 1)
        gathered = images[batch, src_y.clamp(0, self.height - 1).unsqueeze(2),
                          src_x.clamp(0, self.width - 1).unsqueeze(1)]  # N x H x W x 3
        return gathered * valid.unsqueeze(3).to(gathered.dtype)

    def _flip_crop_loop(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The same result by slicing, image by image: on a CPU, copies beat index arithmetic."""
        p, h, w = self.padding, self.height, self.width
        padded = images.new_zeros((images.shape[0], h + 2 * p, w + 2 * p, images.shape[3]))
        padded[:, p:p + h, p:p + w] = images
        out = torch.empty_like(images)
        for k, (flip, top, left) in enumerate(zip(params.flip.tolist(), params.top.tolist(), params.left.tolist())):
            if flip:  # flip first, then pad and crop: mirror the window and flip its content
                lft = 2 * p - left
                out[k] = padded[k, top:top + h, lft:lft + w].flip(1)
            else:
                out[k] = padded[k, top:top + h, left:left + w]
        return out

    def _erase(self, x: torch.Tensor, params: AugmentParams, fill: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
        rect = params.erase.to(x.device, non_blocking=True)
        t, lft, eh, ew = (rect[:, i].view(-1, 1) for i in range(4))
        in_y = (rows.view(1, -1) >= t) & (rows.view(1, -1) < t + eh)  # N x H
        in_x = (cols.view(1, -1) >= lft) & (cols.view(1, -1) < lft + ew)  # N x W
        mask = (in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1)  # N x 1 x H x W
        if self.erasing.fill != "random":
            return torch.where(mask, fill, x)
        for k, patch in enumerate(params.noise):  # 'random': each image's own noise patch
            if patch is not None:
                a, b, hh, ww = (int(v) for v in params.erase[k])
                x[k, :, a:a + hh, b:b + ww] = patch.to(x.device, non_blocking=True)
        return x


def build_batch_augment(cfg, train: bool = True) -> BatchAugment:
    """The batched equivalent of build_transforms(cfg, is_train=train) (after the Resize)."""
    from strongreid.data.transforms import _normalize, _size, build_transforms

    compose = build_transforms(cfg, is_train=train)  # validates the keys exactly as the PIL path
    erasing = next((t for t in compose.transforms if isinstance(t, RandomErasing)),
                   RandomErasing(probability=0.0))
    norm = _normalize(cfg)
    size = _size(cfg, "SIZE_TRAIN" if train else "SIZE_TEST")
    return BatchAugment(size, float(cfg.INPUT.PROB), int(cfg.INPUT.PADDING), erasing,
                        norm.mean, norm.std, train=train)
