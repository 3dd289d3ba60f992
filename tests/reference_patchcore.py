"""Literal, slow re-statements of reference algorithms, for equivalence tests.

The patch-embedding pipeline:

Unfold each layer into p x p patches, bilinearly resize deeper layers' patch grids to the first
layer's grid, adaptive-average-pool each flattened patch to the pretrain dimension, then pool the
concatenated layers to the target dimension (as described in the PatchCore paper's reference code).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reference_embeddings(
    grids: list[torch.Tensor], patchsize: int, stride: int, pretrain_dim: int, target_dim: int
) -> torch.Tensor:
    """B x C x H x W maps of each layer -> (B*h*w) x target_dim embeddings."""
    pad = (patchsize - 1) // 2
    patches, shapes = [], []
    for g in grids:
        b, c = g.shape[:2]
        unfolded = F.unfold(g, kernel_size=patchsize, stride=stride, padding=pad)  # B x C*p*p x L
        h = (g.shape[2] + 2 * pad - patchsize) // stride + 1
        w = (g.shape[3] + 2 * pad - patchsize) // stride + 1
        unfolded = unfolded.reshape(b, c, patchsize, patchsize, h, w)
        patches.append(unfolded)
        shapes.append((h, w))
    ref_h, ref_w = shapes[0]
    for i in range(1, len(patches)):
        x = patches[i]
        b, c, p, _, h, w = x.shape
        x = x.reshape(b * c * p * p, 1, h, w)
        x = F.interpolate(x, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
        patches[i] = x.reshape(b, c, p, p, ref_h, ref_w)
    per_layer = []
    for x in patches:
        b, c, p, _, h, w = x.shape
        flat = x.permute(0, 4, 5, 1, 2, 3).reshape(b * h * w, 1, c * p * p)
        per_layer.append(F.adaptive_avg_pool1d(flat, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1)  # N x L x D
    n = stacked.shape[0]
    return F.adaptive_avg_pool1d(stacked.reshape(n, 1, -1), target_dim).reshape(n, -1)


def greedy_k_center_dense(
    x: torch.Tensor, n: int, min_sq: torch.Tensor | None = None, seed: int = 0
) -> np.ndarray:
    """The plain greedy k-center loop, one full pass per pick (reference for the batched one)."""
    total = len(x)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    sq = (x * x).sum(1)
    if min_sq is None:
        min_sq = torch.full((total,), torch.finfo(torch.float32).max, device=x.device)
        first = int(np.random.default_rng(seed).integers(total))
        min_sq[first] = float("inf")
    cur = min_sq.clone().float()
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    for step in range(n):
        p = torch.argmax(cur)
        chosen[step] = p
        d2 = (sq + sq[p] - 2.0 * (x @ x[p])).clamp_min(0)
        cur = torch.minimum(cur, d2)
        cur[p] = 0.0
    return np.sort(chosen.cpu().numpy())
