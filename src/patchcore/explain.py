"""Explanations: a test patch beside its nearest memory-bank patch, cropped from its source.

Every bank row remembers the training view it came from (`MemoryBank.image_index`: a view of
a training image, see `PatchCore.training_view`) and its (row, col) on the feature grid
(`MemoryBank.position`). A grid cell covers imagesize / grid pixels of the view (the square
the backbone saw); a patch embedding aggregates a patchsize x patchsize neighbourhood of
cells, which is the box drawn and cropped here.

The source image is found through the model's stored training paths (`train_root_` plus a
relative path). When the dataset has moved, pass `train_root` (CLI: `--train-root DIR`), the
folder that now holds what was `train_root_`. A source that is missing or not a regular file
is an error, never a silent substitute: an explanation must not show an unrelated image.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .data.images import load_image
from .engine.scoring import patch_scores
from .errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "explain_patch", "patch_box", "save_explanation", "save_explanation_gif", "training_image",
]

TRAIN_ROOT_HINT = "pass --train-root DIR (train_root= in Python)"


def _old_root(model: Any) -> Path | None:
    """The folder the stored training paths were taken relative to at fit time.

    Models of the current format store it (`train_root_`); for older models with absolute
    paths it is their deepest common folder, which is what `fit` would have stored.
    """
    if model.train_root_ is not None:
        return Path(model.train_root_)
    absolute = [p for p in model.train_paths_ if Path(p).is_absolute()]
    if not absolute:
        return None
    try:
        return Path(os.path.commonpath([os.path.dirname(p) for p in absolute]))
    except ValueError:  # different drives (Windows)
        return None


def _resolve(model: Any, index: int, train_root: str | Path | None) -> Path:
    """Where training image `index` should be now (not checked)."""
    stored = Path(model.train_paths_[index])
    if train_root is None:
        if not stored.is_absolute() and model.train_root_ is None:
            log.warning("this model stores training paths relative to the folder `fit` ran in; "
                        "resolving them against the current folder %s (%s if that is wrong)",
                        os.getcwd(), TRAIN_ROOT_HINT)
        return Path(os.path.abspath(model.training_path(index)))
    new_root = Path(train_root)
    if not new_root.is_dir():
        raise DataError(f"train root {new_root} is not a folder; pass the folder that now holds "
                        "the training images")
    if not stored.is_absolute():
        return Path(os.path.abspath(new_root / stored))
    old = _old_root(model)
    try:
        relative = stored.relative_to(old) if old is not None else None
    except ValueError:
        relative = None
    if relative is None:
        raise DataError(f"training image {index} ({stored}) is not under the model's training "
                        f"root ({old}), so train root {new_root} cannot relocate it; move the "
                        "image back or fit the model again")
    return Path(os.path.abspath(new_root / relative))


def training_image(model: Any, index: int, train_root: str | Path | None = None) -> Path:
    """The file of training image `index`, checked to exist and be a regular file.

    With `train_root`, stored relative paths are resolved against it, and stored absolute paths
    are moved from the old training root to it; otherwise `model.training_path` decides. The
    file is only stat-ed here, never opened (opening a FIFO would block forever).
    """
    n = len(model.train_paths_)
    if isinstance(index, bool) or not 0 <= int(index) < n:
        raise DataError(f"the memory bank names training image {index}, but the model has "
                        f"{n} training paths (0 to {n - 1}); the model file is inconsistent")
    index = int(index)
    path = _resolve(model, index, train_root)
    _check_source(model, index, path)
    return path


def _check_source(model: Any, index: int, path: Path) -> None:
    """DataError unless `path` (training image `index`) is an existing regular file."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise DataError(f"training image {index} ({path}) is missing; if the dataset moved, "
                        f"{_root_hint(model)}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"training image {index} ({path}) is not a regular file (a folder, FIFO, "
                        f"socket or device) and was not opened; {_root_hint(model)}")


def _root_hint(model: Any) -> str:
    """How to pass the training root, naming the old one when it is known."""
    old = _old_root(model)
    where = f"the folder that now holds what was {old}" if old is not None else (
        "the folder its relative training paths start from")
    return f"{TRAIN_ROOT_HINT}: {where}"


def preprocessed_rgb(model: Any, path: str | Path, view: int = 0) -> Image.Image:
    """View `view` of an image as the model sees it (imagesize x imagesize RGB)."""
    views = model.preprocessor.view_images(load_image(path), name=f"image {path}")
    if not 0 <= view < len(views):
        raise DataError(f"image {path} has {len(views)} views, not a view {view}; it changed "
                        "since the model was fitted")
    return views[view]


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


def explain_patch(
    model: Any, image_path: str | Path, patch: tuple[int, int] | None = None,
    features: np.ndarray | None = None, *, train_root: str | Path | None = None,
    view: int | None = None,
) -> dict[str, Any]:
    """The nearest memory-bank patch of one patch of an image (default: its most anomalous).

    Returns a dict with: patch (row, col), patch_score (mean distance to the k nearest, the
    model's patch score), nearest_row (bank row), distance (to the nearest row), distance_metric,
    source_path (absolute path of the training image of that row, checked to exist),
    source_index, source_view (which view of the source image), source_position (row, col
    on that view's feature grid), view (the query's view), grid (h, w), query_box and
    source_box (pixel boxes in the views). `train_root` relocates the training images (see
    `training_image`); `features` are the image's view features (V x h x w x D, or h x w x D)
    when already computed. The patch is looked for in `view` (default: the view holding the
    image's most anomalous patch; the first view when `patch` is given).
    """
    member = model.members_[0]
    feats = model.view_features(image_path) if features is None else features
    feats = feats[None] if feats.ndim == 3 else feats
    n_views, h, w, _ = feats.shape
    scores, _ = patch_scores(member.index, feats, model.config.anomaly_scorer_num_nn)
    if view is None:
        view = int(np.argmax(scores.reshape(n_views, -1).max(axis=1))) if patch is None else 0
    if not 0 <= view < n_views:
        raise DataError(f"view {view} does not exist: the image has {n_views} views")
    if patch is None:
        r, c = np.unravel_index(int(np.argmax(scores[view])), (h, w))
    else:
        r, c = patch
        if not (0 <= r < h and 0 <= c < w):
            raise DataError(f"patch ({r}, {c}) is outside the {h} x {w} feature grid")
    dist, idx = member.index.search(feats[view, r, c][None], 1)
    row = int(idx[0, 0])
    src, src_view = model.training_view(int(member.bank.image_index[row]))
    source = training_image(model, src, train_root)
    sr, sc = (int(v) for v in member.bank.position[row])
    return {
        "image_path": str(image_path), "patch": (int(r), int(c)), "view": int(view),
        "patch_score": float(scores[view, r, c]), "nearest_row": row,
        "distance": float(dist[0, 0]), "distance_metric": model.config.distance,
        "source_index": src, "source_view": src_view, "source_path": str(source),
        "source_position": (sr, sc), "grid": (h, w),
        "query_box": patch_box(model, int(r), int(c)), "source_box": patch_box(model, sr, sc),
    }


def _source_path(model: Any, info: dict[str, Any], train_root: str | Path | None) -> Path:
    """The checked source image of `info`: re-resolved with `train_root`, else its source_path."""
    if train_root is not None:
        return training_image(model, info["source_index"], train_root)
    path = Path(info["source_path"])
    _check_source(model, info["source_index"], path)
    return path


def _panel(
    model: Any, info: dict[str, Any], load: Callable[[str], Image.Image], scale: int = 2,
) -> Image.Image:
    """PIL composition: query image with box | query patch | source patch | source image.

    `load` gives a view of a path (cached across frames by the GIF).
    """
    size = model.config.imagesize
    query = load(info["image_path"], info.get("view", 0))
    source = load(info["source_path"], info.get("source_view", 0))
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


def save_explanation(
    model: Any, info: dict[str, Any], path: Path, train_root: str | Path | None = None,
) -> Path:
    """Matplotlib figure: the test patch beside its nearest bank patch, with the distance.

    The source image is `info["source_path"]` (checked again before it is opened), or training
    image `info["source_index"]` under `train_root` when that is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    source_path = _source_path(model, info, train_root)
    query = preprocessed_rgb(model, info["image_path"], info.get("view", 0))
    source = preprocessed_rgb(model, source_path, info.get("source_view", 0))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    r, c = info["patch"]
    sr, sc = info["source_position"]
    panels = [
        (query, f"test image\n{Path(info['image_path']).name}", info["query_box"], "red"),
        (query.crop(info["query_box"]), f"test patch ({r}, {c})", None, None),
        (source.crop(info["source_box"]), f"nearest bank patch ({sr}, {sc})", None, None),
        (source, f"source training image\n{source_path.name}", info["source_box"], "lime"),
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
    model: Any, image_path: str | Path, path: Path, max_frames: int = 64, duration_ms: int = 250,
    train_root: str | Path | None = None,
) -> Path:
    """Animated GIF over the image's patches in row-major order (subsampled to `max_frames`).

    Every frame's source image is checked as in `explain_patch` (relocated by `train_root`).
    """
    feats = model.view_features(image_path)
    h, w = feats.shape[1:3]
    cells = [(v, r, c) for v in range(len(feats)) for r in range(h) for c in range(w)]
    step = max(1, -(-len(cells) // max_frames))

    @lru_cache(maxsize=32)
    def load(p: str, view: int) -> Image.Image:
        return preprocessed_rgb(model, p, view)

    frames = [_panel(model, explain_patch(model, image_path, (r, c), feats, view=v,
                                          train_root=train_root), load, scale=1)
              for v, r, c in cells[::step]]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path
