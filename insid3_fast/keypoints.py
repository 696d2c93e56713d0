"""Keypoint transfer (semantic correspondence): SPEC.md "Semantic correspondence"."""

from __future__ import annotations

import torch


def rescale_points(points: torch.Tensor, src_size: tuple[int, int], dst_size: tuple[int, int]) -> torch.Tensor:
    """Scale (..., 2) (x, y) points from an (H, W) frame to another."""
    scaled = points.clone().float()
    scaled[..., 0] *= dst_size[1] / src_size[1]
    scaled[..., 1] *= dst_size[0] / src_size[0]
    return scaled


def _grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    y = torch.linspace(0, h - 1, h)
    x = torch.linspace(0, w - 1, w)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack((xx, yy), dim=2).to(device)


def soft_argmax(scores: torch.Tensor, temperature: float = 0.04, sigma: float = 7) -> torch.Tensor:
    """Expected (x, y) cell of each (K, h, w) score map after a Gaussian at its argmax and a softmax.

    The Gaussian (``sigma`` cells) centred at each map's argmax suppresses distant modes; the
    softmax has temperature ``temperature`` and subtracts the max first.
    """
    K, h, w = scores.shape
    grid = _grid(h, w, scores.device)
    idx = scores.reshape(K, -1).max(dim=-1).indices
    iy = (idx // w).view(K, 1, 1).float()
    ix = (idx % w).view(K, 1, 1).float()
    gauss = torch.exp(-((grid[..., 0] - ix) ** 2 + (grid[..., 1] - iy) ** 2) / (2 * sigma ** 2))
    s = (gauss * scores).reshape(K, -1)
    s = s - s.max(dim=-1, keepdim=True).values
    p = torch.exp(s / temperature)
    p = p / p.sum(dim=-1, keepdim=True)
    return (p.unsqueeze(-1) * grid.reshape(1, -1, 2)).sum(dim=1)


def transfer_keypoints(ref_feat: torch.Tensor, tgt_feat: torch.Tensor, ref_kps: torch.Tensor,
                       ref_size: tuple[int, int], tgt_size: tuple[int, int]) -> torch.Tensor:
    """Predict target keypoints (K, 2) in target pixels from reference keypoints in reference pixels.

    ``ref_feat`` and ``tgt_feat`` are (C, h, w) normalised features (debiased or not).
    """
    _, h, w = ref_feat.shape
    xy = rescale_points(ref_kps, ref_size, (h, w)).round().long()
    x = xy[..., 0].clamp(0, w - 1)
    y = xy[..., 1].clamp(0, h - 1)
    desc = ref_feat[:, y, x].transpose(0, 1)
    scores = (desc @ tgt_feat.flatten(1)).view(-1, h, w)
    return rescale_points(soft_argmax(scores), (h, w), tgt_size)
