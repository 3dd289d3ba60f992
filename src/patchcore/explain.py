"""Explanations: a test patch beside its nearest memory-bank patch, cropped from its source.

Every bank row remembers the training image it came from (`Member.image_index`) and its
(row, col) on the feature grid (`Member.position`). A grid cell covers imagesize / grid pixels
of the preprocessed (resized, center-cropped) image; a patch embedding aggregates a
patchsize x patchsize neighbourhood of cells, which is the box drawn and cropped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .data.images import load_image
from .engine.scoring import patch_scores
from .errors import DataError

__all__ = ["explain_patch", "patch_box", "save_explanation", "save_explanation_gif"]


def preprocessed_rgb(model: Any, path: str | Path) -> Image.Image:
    """The resized, center-cropped RGB image (imagesize x imagesize) the model sees."""
    pre = model.preprocessor
    img = load_image(path).convert("RGB")
    return img.resize(pre.resized_size(img.size), Image.BILINEAR).crop(pre.crop_box(img.size))


def patch_box(model: Any, row: int, col: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel box of patch (row, col) in the preprocessed crop.

    The box is the patchsize x patchsize cell neighbourhood (the patch's receptive region as
    aggregated by PatchCore), clipped to the image.
    """
    h, w = model.feature_grid_
    size = model.config.imagesize
    cell_y, cell_x = size / h, size / w
    half = model.config.patchsize * model.config.patchstride / 2.0
    cy, cx = (row + 0.5) * cell_y, (col + 0.5) * cell_x
    left, top = max(0, round(cx - half * cell_x)), max(0, round(cy - half * cell_y))
    right, bottom = min(size, round(cx + half * cell_x)), min(size, round(cy + half * cell_y))
    return int(left), int(top), int(right), int(bottom)


def image_features(model: Any, path: str | Path) -> np.ndarray:
    """Patch features (h x w x D) of one image from the model's first member."""
    return model.patch_features(path)


def explain_patch(
    model: Any, image_path: str | Path, patch: tuple[int, int] | None = None,
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    """The nearest memory-bank patch of one patch of an image (default: its most anomalous).

    Returns a dict with: patch (row, col), patch_score (mean distance to the k nearest, the
    model's patch score), nearest_row (bank row), distance (to the nearest row), distance_metric,
    source_path (training image of that row), source_index, source_position (row, col on the
    source's feature grid), grid (h, w), query_box and source_box (pixel boxes in the
    preprocessed crops).
    """
    member = model.members_[0]
    feats = image_features(model, image_path) if features is None else features
    h, w, d = feats.shape
    scores, _ = patch_scores(member.index, feats[None], model.config.anomaly_scorer_num_nn)
    scores = scores[0]
    if patch is None:
        r, c = np.unravel_index(int(np.argmax(scores)), scores.shape)
    else:
        r, c = patch
        if not (0 <= r < h and 0 <= c < w):
            raise DataError(f"patch ({r}, {c}) is outside the {h} x {w} feature grid")
    dist, idx = member.index.search(feats[r, c][None], 1)
    row = int(idx[0, 0])
    src = int(member.bank.image_index[row])
    sr, sc = (int(v) for v in member.bank.position[row])
    return {
        "image_path": str(image_path), "patch": (int(r), int(c)),
        "patch_score": float(scores[r, c]), "nearest_row": row, "distance": float(dist[0, 0]),
        "distance_metric": model.config.distance, "source_index": src,
        "source_path": str(model.training_path(src)), "source_position": (sr, sc), "grid": (h, w),
        "query_box": patch_box(model, int(r), int(c)), "source_box": patch_box(model, sr, sc),
    }


def _panel(model: Any, info: dict[str, Any], scale: int = 2) -> Image.Image:
    """PIL composition: query image with box | query patch | source patch | source image."""
    size = model.config.imagesize
    query = preprocessed_rgb(model, info["image_path"])
    source = preprocessed_rgb(model, info["source_path"])
    crop = 2 * size // 3
    q_crop = query.crop(info["query_box"]).resize((crop, crop), Image.NEAREST)
    s_crop = source.crop(info["source_box"]).resize((crop, crop), Image.NEAREST)
    query, source = query.copy(), source.copy()
    ImageDraw.Draw(query).rectangle(info["query_box"], outline=(255, 0, 0), width=2)
    ImageDraw.Draw(source).rectangle(info["source_box"], outline=(0, 200, 0), width=2)
    pad, text_h = 8, 44
    canvas = Image.new("RGB", (2 * size + 2 * crop + 5 * pad, size + text_h + 2 * pad), "white")
    x = pad
    for im, top in ((query, pad), (q_crop, pad + (size - crop) // 2),
                    (s_crop, pad + (size - crop) // 2), (source, pad)):
        canvas.paste(im, (x, top))
        x += im.width + pad
    draw = ImageDraw.Draw(canvas)
    r, c = info["patch"]
    sr, sc = info["source_position"]
    draw.text((pad, size + 2 * pad),
              f"test patch ({r},{c}) of {Path(info['image_path']).name}  ->  nearest bank row "
              f"{info['nearest_row']}: {Path(info['source_path']).name} patch ({sr},{sc})",
              fill="black")
    draw.text((pad, size + 2 * pad + 18),
              f"{info['distance_metric']} distance {info['distance']:.4f}   "
              f"patch score {info['patch_score']:.4f}", fill="black")
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    return canvas


def save_explanation(model: Any, info: dict[str, Any], path: Path) -> Path:
    """Matplotlib figure: the test patch beside its nearest bank patch, with the distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    query = preprocessed_rgb(model, info["image_path"])
    source = preprocessed_rgb(model, info["source_path"])
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    r, c = info["patch"]
    sr, sc = info["source_position"]
    panels = [
        (query, f"test image\n{Path(info['image_path']).name}", info["query_box"], "red"),
        (query.crop(info["query_box"]), f"test patch ({r}, {c})", None, None),
        (source.crop(info["source_box"]), f"nearest bank patch ({sr}, {sc})", None, None),
        (source, f"source training image\n{Path(info['source_path']).name}", info["source_box"],
         "lime"),
    ]
    for ax, (img, title, box, colour) in zip(axes, panels, strict=True):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if box is not None:
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1],
                                   fill=False, edgecolor=colour, linewidth=2))
    fig.suptitle(f"{info['distance_metric']} distance to nearest memory-bank patch "
                 f"(bank row {info['nearest_row']}): {info['distance']:.4f}   "
                 f"patch score {info['patch_score']:.4f}", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_explanation_gif(
    model: Any, image_path: str | Path, path: Path, max_frames: int = 64, duration_ms: int = 250
) -> Path:
    """Animated GIF over the image's patches in row-major order (subsampled to `max_frames`)."""
    feats = image_features(model, image_path)
    h, w = feats.shape[:2]
    cells = [(r, c) for r in range(h) for c in range(w)]
    step = max(1, -(-len(cells) // max_frames))
    frames = [_panel(model, explain_patch(model, image_path, cell, feats), scale=1)
              for cell in cells[::step]]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path
