"""A literal, slow re-statement of the reference patch-embedding pipeline, for equivalence tests.

Unfold each layer into p x p patches, bilinearly resize deeper layers' patch grids to the first
layer's grid, adaptive-average-pool each flattened patch to the pretrain dimension, then pool the
concatenated layers to the target dimension (as described in the PatchCore paper's reference code).
"""

from __future__ import annotations

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
