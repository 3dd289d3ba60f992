"""Benchmark datasets (MVTec AD, VisA): download, verify, unpack into our `mvtec` layout.

`download_dataset("mvtec", root)` leaves `root/<category>/{train,test,ground_truth}` for every
category, ready for `patchcore fit root`. Each archive is fetched resumably (fetch.py), checked
against its published SHA-256 before it is opened, and unpacked safely (archives.py). An archive
already in `root` under its published file name (e.g. fetched by hand in a browser) is used as
it is. VisA's own folders (`<object>/Data/Images/{Normal,Anomaly}`) are rearranged by its
official 1-class split, `split_csv/1cls.csv`, into train/good, test/good, test/bad and
ground_truth/bad/<stem>_mask.png (VisA masks mark defects with non-zero values, which is what
our mask loader reads).

Finished categories are recorded in `root/.patchcore-datasets.json`; a rerun skips them, and a
category folder that is not recorded there (the user's own data) is never replaced.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .archives import safe_extract
from .fetch import DownloadError, check_url, fetch, sha256_file

log = logging.getLogger(__name__)

MIRROR_ENV = "PATCHCORE_DATASETS_MIRROR"
MANIFEST = ".patchcore-datasets.json"


class LicenceError(DownloadError):
    """The dataset's licence has not been accepted yet."""


@dataclass(frozen=True)
class Archive:
    """One published archive: where it is, its file name, and its SHA-256 (None: unpublished)."""

    url: str
    filename: str
    sha256: str | None
    size: int | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset we can download: its archives, categories, licence and layout conversion."""

    name: str
    title: str
    homepage: str
    licence: str
    categories: tuple[str, ...]
    archive: Archive  # the whole dataset
    category_archives: dict[str, Archive] = field(default_factory=dict)
    layout: str = "mvtec"  # how the unpacked archive becomes our layout: "mvtec" or "visa"


_MVTEC_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
# Per-category archives of MVTec AD: MVTec publishes no checksums for these, so none is
# recorded; their SHA-256 is computed, logged and kept in the manifest instead.
_MVTEC_PARTS = {
    "bottle": "420937370-1629951468", "cable": "420937413-1629951498",
    "capsule": "420937454-1629951595", "carpet": "420937484-1629951672",
    "grid": "420937487-1629951814", "hazelnut": "420937545-1629951845",
    "leather": "420937607-1629951964", "metal_nut": "420937637-1629952063",
    "screw": "420938130-1629953152", "tile": "420938133-1629953189",
    "toothbrush": "420938134-1629953256", "transistor": "420938166-1629953277",
    "wood": "420938383-1629953354", "zipper": "420938385-1629953449",
}
_MVTEC_CATEGORY_ARCHIVES = {
    c: Archive(f"{_MVTEC_SHARE}{part}/{c}.tar.xz", f"{c}.tar.xz", None)
    for c, part in _MVTEC_PARTS.items()
} | {"pill": Archive("https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/"
                     "download/420938129-1629953099/pill.tar.xz", "pill.tar.xz", None)}

DATASETS: dict[str, DatasetInfo] = {
    "mvtec": DatasetInfo(
        name="mvtec", title="MVTec AD",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        licence=(
            "MVTec AD (MVTec Software GmbH) is licensed under Creative Commons Attribution-"
            "NonCommercial-ShareAlike 4.0 International (CC BY-NC-SA 4.0, "
            "https://creativecommons.org/licenses/by-nc-sa/4.0/): you may use it for "
            "non-commercial purposes only, must give credit and share adaptations under the "
            "same licence. Please cite Bergmann et al., \"The MVTec Anomaly Detection Dataset\", "
            "IJCV 2021, and \"MVTec AD\", CVPR 2019. Terms: "
            "https://www.mvtec.com/company/research/datasets/mvtec-ad"),
        categories=("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper"),
        # The checksum and size anomalib and others publish for the official archive.
        archive=Archive("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
                        "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
                        "mvtec_anomaly_detection.tar.xz",
                        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
                        5_264_982_680),
        category_archives=_MVTEC_CATEGORY_ARCHIVES,
    ),
    "visa": DatasetInfo(
        name="visa", title="VisA (Visual Anomaly)",
        homepage="https://github.com/amazon-science/spot-diff",
        licence=(
            "VisA (Amazon) is licensed under Creative Commons Attribution 4.0 International "
            "(CC BY 4.0, https://creativecommons.org/licenses/by/4.0/): you must give credit. "
            "Please cite Zou et al., \"SPot-the-Difference Self-Supervised Pre-training for "
            "Anomaly Detection and Segmentation\", ECCV 2022."),
        categories=("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
        archive=Archive("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/"
                        "VisA_20220922.tar", "VisA_20220922.tar",
                        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
                        1_929_840_640),
        layout="visa",
    ),
}


def dataset_info(name: str | DatasetInfo) -> DatasetInfo:
    """The registry entry of `name`; DownloadError listing the known datasets otherwise."""
    if isinstance(name, DatasetInfo):
        return name
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


# -- the manifest of finished categories and accepted licences ---------------------------------

def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{path} is damaged ({exc}); remove it and run the command again"
                            ) from None
    return data if isinstance(data, dict) else {}


def _write_manifest(root: Path, data: dict) -> None:
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


def _entry(manifest: dict, name: str) -> dict:
    entry = manifest.setdefault(name, {})
    entry.setdefault("categories", {})
    return entry


def licence_accepted(name: str | DatasetInfo, root: str | Path) -> bool:
    """Whether the licence of dataset `name` was accepted for downloads into `root`."""
    key = dataset_info(name).name
    return bool(_read_manifest(Path(root)).get(key, {}).get("licence_accepted"))


# -- the download -------------------------------------------------------------------------------

def _url(archive: Archive, mirror: str | None) -> str:
    """The archive's URL, or the same file name under `mirror` (or $PATCHCORE_DATASETS_MIRROR)."""
    base = mirror or os.environ.get(MIRROR_ENV)
    return check_url(f"{base.rstrip('/')}/{archive.filename}" if base else archive.url)


def _plan(info: DatasetInfo, root: Path, wanted: list[str]) -> list[tuple[Archive, list[str]]]:
    """Which archives to fetch for which categories: the whole-dataset archive when all are
    wanted, there is no per-category archive, or the whole archive is already in `root`."""
    whole = info.archive
    if (len(wanted) == len(info.categories) or not info.category_archives
            or (root / whole.filename).is_file()):
        return [(whole, wanted)]
    return [(info.category_archives[c], [c]) for c in wanted]


def download_dataset(
    name: str | DatasetInfo, root: str | Path, categories: Sequence[str] = (), *,
    accept_licence: bool = False, mirror: str | None = None, keep_archive: bool = True,
    progress: bool = True, retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0,
    say: Callable[[str], None] = log.info,
) -> list[Path]:
    """Download dataset `name` ("mvtec", "visa" or a `DatasetInfo` of one's own) into `root`;
    return its category folders.

    `categories` (default: all) picks some; finished ones are skipped. The licence must have
    been accepted (`accept_licence=True`, remembered in `root`) before anything is fetched.
    `mirror` (or $PATCHCORE_DATASETS_MIRROR) replaces the published location by a base URL
    that serves the same file names. Archives stay in `root` unless `keep_archive` is False.
    """
    info = dataset_info(name)
    root = Path(root)
    unknown = [c for c in categories if c not in info.categories]
    if unknown:
        raise DownloadError(f"{info.title} has no category {unknown[0]!r}; its categories are "
                            f"{', '.join(info.categories)}")
    wanted = list(dict.fromkeys(categories)) or list(info.categories)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root)
    entry = _entry(manifest, info.name)
    if not (accept_licence or entry.get("licence_accepted")):
        raise LicenceError(f"{info.title} is distributed under a licence you must accept first: "
                           f"{info.licence} To accept it pass --accept-license "
                           "(Python: accept_licence=True)")
    if not entry.get("licence_accepted"):
        entry["licence_accepted"] = True
        _write_manifest(root, manifest)
    todo = [c for c in wanted if c not in entry["categories"]]
    for c in todo:
        if os.path.lexists(root / c):
            raise DownloadError(f"{root / c} exists but was not written by `patchcore download`; "
                                "move it away or choose another --root")
    for archive, cats in _plan(info, root, todo):
        path = root / archive.filename
        digest = archive.sha256
        if path.is_file():
            say(f"using the archive already in {path}")
            digest = sha256_file(path, progress)
            if archive.sha256 is not None and digest != archive.sha256:
                raise DownloadError(f"{path} has SHA-256 {digest}, but the published "
                                    f"{archive.filename} has {archive.sha256}; it is damaged or "
                                    "another file: remove it and run the command again")
        else:
            url = _url(archive, mirror)
            say(f"downloading {archive.filename} from {url}")
            digest = fetch(url, path, archive.sha256, progress=progress, retries=retries,
                           retry_wait=retry_wait, timeout=timeout, manual_hint=(
                               f"without internet access, download {archive.url} by hand, save "
                               f"it as {path} and run the same command again"))
        if archive.sha256 is None:
            log.warning("%s: no published checksum to compare with; its SHA-256 is %s",
                        archive.filename, digest)
        _unpack(info, path, root, cats, progress)
        for c in cats:
            entry["categories"][c] = {"archive": archive.filename, "sha256": digest,
                                      "verified": archive.sha256 is not None}
        _write_manifest(root, manifest)
        if not keep_archive:
            path.unlink()
        say(f"{info.title}: {', '.join(cats)} ready in {root}")
    return [root / c for c in wanted]


# -- layout conversion --------------------------------------------------------------------------

def _unpack(info: DatasetInfo, archive: Path, root: Path, cats: list[str], progress: bool
            ) -> None:
    """Unpack the categories `cats` of `archive` into `root/<category>` (one rename each)."""
    staging = root / f".patchcore-unpack-{info.name}"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir()
    try:
        keep = set(cats) | ({"split_csv"} if info.layout == "visa" else set())
        safe_extract(archive, staging / "raw", lambda parts: parts[0] in keep, progress=progress)
        built = staging / "raw" if info.layout == "mvtec" else _visa_layout(
            staging / "raw", staging / "built", cats)
        for c in cats:
            if not (built / c / "train").is_dir():
                raise DownloadError(f"{archive} holds no {c}/train folder; it is not the "
                                    f"published {info.title} archive")
            os.replace(built / c, root / c)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _inside(raw: Path, relative: str, csv_path: Path) -> Path:
    """A path named in the split file, checked to stay inside the unpacked archive."""
    parts = PurePosixPath(relative).parts
    if not relative or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise DownloadError(f"{csv_path} names an unsafe path {relative!r}")
    path = raw.joinpath(*parts)
    if not path.is_file():
        raise DownloadError(f"{csv_path} lists {relative}, which the archive lacks")
    return path


def _visa_layout(raw: Path, built: Path, cats: list[str]) -> Path:
    """VisA's folders, arranged by split_csv/1cls.csv into our mvtec layout under `built`."""
    csv_path = raw / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DownloadError("the VisA archive lacks split_csv/1cls.csv; it is not the published "
                            "archive")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or [h.strip() for h in rows[0]] != ["object", "split", "label", "image", "mask"]:
        raise DownloadError(f"{csv_path} does not start with object,split,label,image,mask")
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 5:
            raise DownloadError(f"{csv_path} line {n} has {len(row)} fields, expected 5")
        obj, split, label, image, mask = (x.strip() for x in row)
        if obj not in cats:
            continue
        if split not in ("train", "test") or label not in ("normal", "anomaly") or (
                split == "train" and label != "normal"):
            raise DownloadError(f"{csv_path} line {n}: unexpected split/label {split}/{label}")
        group = "good" if label == "normal" else "bad"
        source = _inside(raw, image, csv_path)
        target = built / obj / split / group / source.name
        moves = [(source, target)]
        if group == "bad" and mask:
            mask_source = _inside(raw, mask, csv_path)
            moves.append((mask_source, built / obj / "ground_truth" / group
                          / f"{source.stem}_mask{mask_source.suffix}"))
        for src, dst in moves:
            if dst.exists():
                raise DownloadError(f"{csv_path} line {n}: two images map to {dst.name}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    return built
