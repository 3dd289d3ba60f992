"""No input under 1 MB makes prediction allocate more than a fixed memory budget."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore
from patchcore.data.synthetic import make_synthetic_dataset

BUDGET_MB = 3 * 1024


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height whose pixel data is one compressed row (a bomb/huge file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def hostile_files(folder: Path) -> list[Path]:
    """Small files that used to make predict allocate gigabytes or crash."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "line_1x20000.png": _encoded(Image.new("L", (1, 20000)), "PNG"),
        "line_100000x1.png": _encoded(Image.new("L", (100000, 1)), "PNG"),
        "bomb_30000.png": _png_header_only(30000, 30000),
        "tall_20x20000.png": _encoded(Image.new("RGB", (20, 20000)), "PNG"),
        "large_valid_6000.jpg": _encoded(Image.new("RGB", (6000, 6000), (90, 90, 90)), "JPEG"),
        "gray16_4000.png": _encoded(Image.fromarray(np.zeros((4000, 4000), np.uint16)), "PNG"),
    }
    paths = []
    for name, data in files.items():
        assert len(data) < 2**20, name
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


@pytest.mark.slow
def test_predict_on_hostile_small_files_stays_within_budget(tmp_path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, categories=("tile",), n_train=4, n_test_good=1,
                           n_test_defect=1, size=48, seed=2)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, resize=32,
                      target_embed_dimension=16, pretrain_embed_dimension=16, device="cpu",
                      progress=False).fit(data / "tile")
    saved = model.save(tmp_path / "model")
    files = hostile_files(tmp_path / "hostile")
    script = textwrap.dedent(f"""
        import json, sys
        from patchcore import PatchCore, PatchCoreError
        model = PatchCore.load({str(saved)!r}, device="cpu", progress=False)
        outcomes = {{}}
        for path in {[str(p) for p in files]!r}:
            try:
                pred = model.predict(path)
                outcomes[path] = "scored %dx%d" % pred.sizes[0]
                pred.original_map(0)
            except PatchCoreError as exc:
                outcomes[path] = "error: " + str(exc)
        # VmHWM: this process's own peak (ru_maxrss would include the forking parent's RSS).
        status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
        peak = int(status) / 1024
        print(json.dumps({{"peak_mb": peak, "outcomes": outcomes}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = {Path(k).name: v for k, v in report["outcomes"].items()}
    print(f"peak RSS {report['peak_mb']:.0f} MB")
    assert report["peak_mb"] < BUDGET_MB, report
    for name in ("line_1x20000.png", "line_100000x1.png", "tall_20x20000.png"):
        assert outcomes[name].startswith("error:") and "aspect" in outcomes[name], outcomes
    assert outcomes["bomb_30000.png"].startswith("error:"), outcomes
    assert outcomes["large_valid_6000.jpg"] == "scored 6000x6000", outcomes
    assert outcomes["gray16_4000.png"] == "scored 4000x4000", outcomes
    assert all("\n" not in v for v in outcomes.values())
