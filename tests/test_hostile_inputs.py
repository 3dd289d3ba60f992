"""Hostile and odd inputs: every image either decodes correctly or gives a one-line DataError."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from patchcore.data import as_samples, category_folders, load_dataset, to_pil_image
from patchcore.data import images as images_mod
from patchcore.data.images import MAX_IMAGE_PIXELS, load_image, load_mask
from patchcore.data.layouts import Sample, list_images
from patchcore.data.loader import batches
from patchcore.data.preprocess import Preprocessor
from patchcore.errors import ConfigError, DataError

FEW = settings(max_examples=60, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])


# -- crafted files -----------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int = 8, color: int = 0, raw: bytes = b"") -> bytes:
    """A PNG with the given IHDR; `raw` is the unfiltered scanline data (may be absent)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _png16_rgb(values: np.ndarray) -> bytes:
    """16-bit RGB PNG (colour type 2) of an H x W x 3 array (Pillow cannot write one)."""
    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, 2, rows)


def _tiff_int16_signed(values: np.ndarray) -> bytes:
    """Uncompressed little-endian TIFF, 16-bit signed grayscale (Pillow opens it as mode I)."""
    h, w = values.shape
    data = values.astype("<i2").tobytes()
    entries = [(256, 3, w), (257, 3, h), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 3, h), (279, 4, len(data)), (339, 3, 2)]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def _encoded(fmt: str, seed: int = 0, mode: str = "RGB", size: tuple[int, int] = (12, 9)) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


VALID = [_encoded("PNG"), _encoded("JPEG"), _encoded("BMP"), _encoded("TIFF"),
         _encoded("PNG", mode="L"), _encoded("WEBP")]


# -- property tests ----------------------------------------------------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


_MUTATED = st.builds(
    _mutate, st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, 400)),
)


@FEW
@given(data=st.one_of(st.binary(max_size=300), _MUTATED))
def test_any_file_bytes_give_rgb_or_data_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.png"
    path.write_bytes(data)
    for load in (load_image, to_pil_image):
        try:
            img = load(path if load is load_image else data)
        except DataError as exc:
            assert "\n" not in str(exc)
            continue
        assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.bool_, np.float16, np.float32, np.float64,
                           np.int8, np.int32, np.int64, np.uint32, np.complex64, object])


_SHAPES = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3, 4])),
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
)


def _arrays(dtype: type) -> st.SearchStrategy[np.ndarray]:
    if dtype is object:
        return hnp.arrays(np.uint8, _SHAPES).map(lambda a: a.astype(object))
    return hnp.arrays(dtype, _SHAPES)


@FEW
@given(arr=_DTYPES.flatmap(_arrays))
def test_any_array_gives_rgb_or_data_error(arr):
    try:
        img = to_pil_image(arr)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert img.mode == "RGB"
    assert img.size == (arr.shape[1], arr.shape[0])


# -- decompression bombs and oversized images --------------------------------------------------


@pytest.mark.parametrize("side", [30000, 9500])  # Pillow's error, and above our limit only
def test_bomb_png_is_a_data_error_naming_file_and_limit(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side))  # 60 bytes, no pixels allocated
    with pytest.raises(DataError, match=r"bomb\.png declares .*limit of 89,478,485"):
        load_image(path)
    with pytest.raises(DataError, match=r"mask .*bomb\.png declares .*MAX_IMAGE_PIXELS"):
        load_mask(path, (side, side))
    with pytest.raises(DataError, match="image bytes declares"):
        to_pil_image(path.read_bytes())


def test_our_pixel_limit_holds_when_pillow_check_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("L", (11, 10)).save(path)
    with pytest.raises(DataError, match=r"big\.png declares 11x10 = 110 pixels.*limit of 100"):
        load_image(path)
    with pytest.raises(DataError, match="limit of 100"):
        to_pil_image(np.zeros((10, 11), np.uint8))


@pytest.mark.parametrize("height", [20000, 100000])
def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path, monkeypatch, height):
    path = tmp_path / f"tall{height}.png"
    Image.new("L", (1, height)).save(path)
    assert path.stat().st_size < 1000

    def no_resize(*args, **kwargs):
        raise AssertionError("resize must not run")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"tall{height}\.png is 1x{height}.*MAX_ASPECT_RATIO"):
        next(iter(batches([Sample(path, -1, "x")], Preprocessor(256, 224), 1)))
    assert time.perf_counter() - t0 < 5
    pre = Preprocessor(256, 224)
    with pytest.raises(DataError, match="MAX_ASPECT_RATIO"):
        pre.mask(np.zeros((height, 1), bool), name="m.png")
    with pytest.raises(DataError, match="MAX_ASPECT_RATIO"):
        pre.to_original(np.zeros((224, 224), np.float32), (1, height))


def test_resized_pixel_limit(monkeypatch):
    pre = Preprocessor(4000, 224)  # a 100x1900 image would become 4000x76000
    with pytest.raises(DataError, match=r"photo\.png is 100x1900 .*4000x76000.*MAX_RESIZED"):
        pre.image(Image.new("RGB", (100, 1900)), name="photo.png")
    with pytest.raises(DataError, match="MAX_RESIZED_PIXELS"):
        pre.to_original(np.zeros((224, 224), np.float32), (100, 1900))
    assert Preprocessor(256, 224).image(Image.new("RGB", (100, 1900))).shape == (3, 224, 224)


# -- EXIF orientation --------------------------------------------------------------------------


def _rotated_jpeg(path: Path, orientation: int = 6) -> None:
    """Stored 512x300, left half red, right half blue; EXIF says: display rotated 90 degrees."""
    arr = np.zeros((300, 512, 3), np.uint8)
    arr[:, :256, 0] = 255
    arr[:, 256:, 2] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


def test_exif_rotated_jpeg_is_used_as_displayed(tmp_path):
    path = tmp_path / "rot.jpg"
    _rotated_jpeg(path)
    img = load_image(path)
    assert img.size == (300, 512)
    arr = np.asarray(img).astype(int)
    # Orientation 6: turn 90 degrees clockwise, so the stored left (red) half is on top.
    assert arr[:200, :, 0].mean() > 200 and arr[:200, :, 2].mean() < 50
    assert arr[-200:, :, 2].mean() > 200
    with Image.open(path) as raw:
        assert to_pil_image(raw).size == (300, 512)
    assert to_pil_image(path.read_bytes()).size == (300, 512)
    # A mask with the same EXIF tag is oriented the same way, so it matches its image.
    mask = Image.new("L", (512, 300), 0)
    exif = mask.getexif()
    exif[0x0112] = 6
    mask.save(tmp_path / "rot_mask.png", exif=exif.tobytes())
    assert load_mask(tmp_path / "rot_mask.png", img.size).shape == (512, 300)


# -- pixel depth by data type ------------------------------------------------------------------


def test_16bit_gray_png_with_small_values_is_dark(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode == "I;16"  # how this Pillow opens 16-bit grayscale PNGs
    assert np.asarray(load_image(tmp_path / "g16.png")).max() <= 1  # 200 / 65535, not 200 / 255
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert np.asarray(load_image(tmp_path / "white16.png")).min() == 255


def test_16bit_rgb_png_with_small_values_is_dark(tmp_path):
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(np.full((4, 5, 3), 200)))
    (tmp_path / "white.png").write_bytes(_png16_rgb(np.full((4, 5, 3), 65535)))
    img = load_image(tmp_path / "rgb16.png")
    assert img.size == (5, 4) and np.asarray(img).max() <= 1
    assert np.asarray(load_image(tmp_path / "white.png")).min() == 255


def test_mode_i_scaled_by_declared_bit_depth(tmp_path):
    (tmp_path / "s16.tif").write_bytes(_tiff_int16_signed(np.full((4, 4), 16384)))
    with Image.open(tmp_path / "s16.tif") as raw:
        assert raw.mode == "I"
    assert np.asarray(load_image(tmp_path / "s16.tif"))[0, 0, 0] == 128  # 16384 / 32767
    # A mode-I image of unknown origin is 16-bit: 1000 / 65535 * 255 = 3.9, not clipped to 255.
    in_memory = Image.fromarray(np.full((4, 4), 1000, np.int32))
    assert in_memory.mode == "I"
    assert np.asarray(to_pil_image(in_memory))[0, 0, 0] == 4


def test_arrays_by_dtype():
    assert np.asarray(to_pil_image(np.full((3, 3), 200, np.uint16))).max() <= 1
    assert np.asarray(to_pil_image(np.full((3, 3), 200, np.uint8))).min() == 200
    assert np.asarray(to_pil_image(np.ones((3, 3), bool))).min() == 255
    assert np.asarray(to_pil_image(np.full((3, 3, 3), 0.5, np.float32)))[0, 0, 0] == 128
    assert np.asarray(to_pil_image(np.full((3, 3), 1.0001)))[0, 0, 0] == 255  # overshoot of 0-1
    assert np.asarray(to_pil_image(np.full((3, 3), 200.0)))[0, 0, 0] == 200  # 0-255 floats
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # only this pixel is opaque
    out = np.asarray(to_pil_image(rgba))
    assert out[0, 0, 0] == 255 and out[1, 1, 0] == 0
    big_endian = np.full((2, 2), 65535, ">u2")
    assert np.asarray(to_pil_image(big_endian)).min() == 255
    with pytest.raises(DataError, match="NaN or infinite"):
        to_pil_image(np.array([[0.1, np.nan]]))
    with pytest.raises(DataError, match="negative .*normalised"):
        to_pil_image(np.full((3, 3), -2.0, np.float32))
    with pytest.raises(DataError, match="dtype int64.*uint8"):
        to_pil_image(np.zeros((3, 3), np.int64))


@pytest.mark.parametrize("value, fix", [
    (None, "cannot use None as an image"),
    (3, "object of type int"),
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros(5, np.uint8), r"shape \(5,\)"),
    (np.zeros((2, 2, 3, 1), np.uint8), "H x W or H x W x C"),
    (np.zeros((1, 2, 2, 3, 1), np.uint8), "H x W or H x W x C"),
    (np.zeros((4, 4, 2), np.uint8), r"C = 1, 3 or 4"),
    (np.zeros((2, 2), object), "dtype object"),
    (b"", "empty"),
    (b"GIF89a not really", "not a readable image"),
])
def test_to_pil_image_refuses_with_the_fix(value, fix):
    with pytest.raises(DataError, match=fix):
        to_pil_image(value)


def test_closed_pil_image_is_a_data_error():
    img = Image.new("RGB", (4, 4))
    img.close()
    with pytest.raises(DataError, match="closed"):
        to_pil_image(img)


def test_non_rgb_pil_modes_and_encoded_bytes():
    for mode in ("1", "L", "P", "LA", "RGBA", "CMYK", "I;16", "F", "La", "RGBa"):
        assert to_pil_image(Image.new(mode, (3, 2))).mode == "RGB"
    assert to_pil_image(VALID[0]).size == (12, 9)


def test_formats_outside_the_image_suffixes_are_not_decoded(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")  # decodable by Pillow, not accepted here
    (tmp_path / "g.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"g\.png is not a readable image"):
        load_image(tmp_path / "g.png")


# -- paths -------------------------------------------------------------------------------------


def test_as_samples_takes_one_str_as_one_path(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    samples = as_samples(str(tmp_path / "a.png"))
    assert [s.path for s in samples] == [tmp_path / "a.png"]
    assert samples[0].group == tmp_path.name and samples[0].label == -1
    assert len(as_samples([tmp_path / "a.png", Sample(tmp_path / "a.png", 0, "g")])) == 2
    assert as_samples(Sample(tmp_path / "a.png", 0, "g"))[0].group == "g"


def test_as_samples_refuses_folders_missing_files_and_junk(tmp_path):
    (tmp_path / "data_orig").mkdir()
    with pytest.raises(DataError, match=r"data_orig is a folder.*load_dataset"):
        as_samples(str(tmp_path / "data_orig"))
    with pytest.raises(DataError, match=r"data_orig is a folder"):
        as_samples([tmp_path / "data_orig"])
    with pytest.raises(DataError, match=r"image .*nope\.png does not exist"):
        as_samples([tmp_path / "nope.png"])
    with pytest.raises(DataError, match="item 0 of the image list is an object of type int"):
        as_samples([3])
    with pytest.raises(DataError, match="object of type int"):
        as_samples(3)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"mask .*m\.png does not exist"):
        as_samples([Sample(tmp_path / "a.png", 1, "g", tmp_path / "m.png")])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def attempt() -> None:
        for call in (lambda: as_samples(fifo), lambda: load_image(fifo),
                     lambda: load_mask(fifo, (1, 1)), lambda: to_pil_image(str(fifo))):
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - collected and checked below
                errors.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the test run can finish, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("opening a FIFO blocked")
    assert len(errors) == 4
    for exc in errors:
        assert isinstance(exc, DataError) and "pipe.png is not a regular file" in str(exc)
    assert list_images(tmp_path) == []


# -- batches -----------------------------------------------------------------------------------


def test_worker_error_is_the_one_line_data_error(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "broken.png"
    Image.new("RGB", (32, 32)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pre = Preprocessor(32, 32)
    samples = [Sample(good, 0, "g"), Sample(bad, 0, "g")]
    with pytest.raises(DataError) as info:
        list(batches(samples, pre, batch_size=1, num_workers=1))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"image {bad} ")
    assert [len(b.paths) for b in batches(samples[:1] * 3, pre, 2, num_workers=1)] == [2, 1]


@pytest.mark.parametrize("kwargs", [dict(num_workers=-1), dict(num_workers=1.5),
                                    dict(batch_size=0)])
def test_bad_loader_settings_are_config_errors(kwargs):
    settings_ = dict(batch_size=1, num_workers=0) | kwargs
    with pytest.raises(ConfigError, match="num_workers|batch_size"):
        batches([], Preprocessor(32, 32), **settings_)


# -- layouts -----------------------------------------------------------------------------------


def _category(root: Path, name: str = "bottle") -> Path:
    cat = root / name
    for sub in ("train/good", "test/good", "test/crack"):
        (cat / sub).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(cat / sub / "000.png")
    return cat


def test_dot_inside_a_category_is_named_after_the_folder(tmp_path, monkeypatch):
    cat = _category(tmp_path)
    monkeypatch.chdir(cat)
    assert load_dataset(".").name == "bottle"
    assert [load_dataset(f).name for f in category_folders(".", None)] == ["bottle"]
    monkeypatch.chdir(cat / "train")
    assert load_dataset("..").name == "bottle"
    with pytest.raises(DataError, match="not a category name"):
        category_folders(tmp_path, ["."])


def test_hidden_folders_are_never_categories_or_groups(tmp_path):
    cat = _category(tmp_path)
    (cat / "train" / "good" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16)).save(cat / "train" / "good" / ".ipynb_checkpoints" / "x.png")
    (cat / "test" / ".cache").mkdir()
    Image.new("RGB", (16, 16)).save(cat / "test" / ".cache" / "y.png")
    _category(tmp_path, ".trash")
    split = load_dataset(cat)
    assert [s.path.name for s in split.train] == ["000.png"]
    assert {s.group for s in split.test} == {"good", "crack"}
    assert load_dataset(cat, layout="folder").train == split.train
    assert category_folders(tmp_path, None) == [cat]


def test_empty_folders_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no train/ folder"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="neither a train/ folder nor category folders"):
        category_folders(tmp_path / "empty", None)
    (tmp_path / "empty" / "train" / "good" / ".hidden").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "empty" / "train" / "good" / ".hidden" / "a.png")
    with pytest.raises(DataError, match="has no images"):
        load_dataset(tmp_path / "empty", layout="folder")


def test_mask_lookup_with_glob_characters_in_the_name(tmp_path):
    cat = _category(tmp_path)
    Image.new("RGB", (16, 16)).save(cat / "test" / "crack" / "a[1].png")
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    Image.new("L", (16, 16)).save(cat / "ground_truth" / "crack" / "a[1]_mask.bmp")
    masks = {s.path.name: s.mask for s in load_dataset(cat).test}
    assert masks["a[1].png"] == cat / "ground_truth" / "crack" / "a[1]_mask.bmp"


def test_max_image_pixels_is_pillows_default():
    assert MAX_IMAGE_PIXELS == 89_478_485
