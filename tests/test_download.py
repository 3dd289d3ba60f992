"""`patchcore download`: resumable, verified, safe downloads from a local HTTP server."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchcore import load_dataset
from patchcore.cli import app
from patchcore.datasets import (
    DATASETS,
    Archive,
    DatasetInfo,
    DownloadError,
    LicenceError,
    download_dataset,
)

FAST = dict(progress=False, retry_wait=0.0, timeout=5.0)


class Server:
    """A 127.0.0.1 HTTP server for `files`, honouring Range; `drop_after[name] = n` cuts the
    next transfer of `name` after n bytes (announcing the full length)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start, status = 0, 200
                if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                cut = outer.drop_after.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes]) -> Server:
        servers.append(Server(files))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _png(value: int, size: int = 8) -> bytes:
    """A small noisy image (noise keeps the archives a few kB big, compressed)."""
    noise = np.random.default_rng(value).integers(0, 32, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray((value + noise).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _mask_png(size: int = 8, value: int = 255) -> bytes:
    array = np.zeros((size, size), np.uint8)
    array[2:5, 2:5] = value
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w:xz", links: dict[str, str] | None = None
         ) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _mvtec_members(categories=("bottle", "cable")) -> dict[str, bytes]:
    members = {"license.txt": b"CC BY-NC-SA 4.0\n"}
    for c in categories:
        members |= {f"{c}/train/good/{i:03d}.png": _png(100 + i) for i in range(3)}
        members |= {f"{c}/test/good/000.png": _png(90), f"{c}/test/broken/000.png": _png(20),
                    f"{c}/ground_truth/broken/000_mask.png": _mask_png()}
    return members


def _info(server: Server, archive: bytes, name: str = "toy.tar.xz", layout: str = "mvtec",
          categories=("bottle", "cable"), sha256: str | None = "auto") -> DatasetInfo:
    digest = hashlib.sha256(archive).hexdigest() if sha256 == "auto" else sha256
    return DatasetInfo(name="toy", title="Toy AD", homepage="http://example.invalid",
                       licence="Toy licence text.", categories=tuple(categories),
                       archive=Archive(f"{server.url}/{name}", name, digest, len(archive)),
                       layout=layout)


def test_download_verifies_unpacks_and_skips_finished_categories(serve, tmp_path):
    archive = _tar(_mvtec_members())
    server = serve({"toy.tar.xz": archive})
    info = _info(server, archive)
    folders = download_dataset(info, tmp_path / "d", accept_licence=True, **FAST)
    assert folders == [tmp_path / "d" / "bottle", tmp_path / "d" / "cable"]
    split = load_dataset(folders[0])
    assert split.layout == "mvtec" and len(split.train) == 3 and split.has_masks
    assert [s.group for s in split.test] == ["broken", "good"]
    manifest = json.loads((tmp_path / "d" / ".patchcore-datasets.json").read_text())
    assert manifest["toy"]["categories"]["cable"]["verified"] is True
    assert not list((tmp_path / "d").glob(".patchcore-unpack-*"))  # staging removed
    hits = len(server.requests)
    download_dataset(info, tmp_path / "d", **FAST)  # licence remembered, nothing to do
    assert len(server.requests) == hits


def test_interrupted_transfer_resumes_with_a_range_request(serve, tmp_path):
    archive = _tar(_mvtec_members())
    server = serve({"toy.tar.xz": archive})
    info = _info(server, archive)
    server.drop_after["toy.tar.xz"] = 1000
    with pytest.raises(DownloadError, match=r"1000 bytes received so far are kept in .*"
                                            r"toy\.tar\.xz\.part.*resumes"):
        download_dataset(info, tmp_path, accept_licence=True, retries=0, **FAST)
    assert (tmp_path / "toy.tar.xz.part").stat().st_size == 1000
    assert not (tmp_path / "bottle").exists()
    download_dataset(info, tmp_path, **FAST)
    assert server.requests[-1] == ("toy.tar.xz", "bytes=1000-")
    assert (tmp_path / "toy.tar.xz").read_bytes() == archive
    assert len(load_dataset(tmp_path / "cable").train) == 3


def test_dropped_connection_is_retried_within_one_call(serve, tmp_path):
    archive = _tar(_mvtec_members(("bottle",)))
    server = serve({"toy.tar.xz": archive})
    server.drop_after["toy.tar.xz"] = 500
    download_dataset(_info(server, archive, categories=("bottle",)), tmp_path,
                     accept_licence=True, retries=1, **FAST)
    assert [r[1] for r in server.requests] == [None, "bytes=500-"]
    assert (tmp_path / "bottle" / "train" / "good").is_dir()


def test_corrupted_download_is_rejected_against_the_published_checksum(serve, tmp_path):
    # The real MVTec AD entry, served by a mirror with a file of the right name but wrong bytes.
    server = serve({"mvtec_anomaly_detection.tar.xz": _tar(_mvtec_members())})
    with pytest.raises(DownloadError, match="arrived corrupted: SHA-256 .* expected "
                                            "cf4313b13603"):
        download_dataset("mvtec", tmp_path, accept_licence=True, mirror=server.url, **FAST)
    assert not list(tmp_path.glob("mvtec_anomaly*"))  # neither the file nor a .part is kept
    assert not (tmp_path / "bottle").exists()


def test_flipped_byte_is_rejected(serve, tmp_path):
    archive = _tar(_mvtec_members(("bottle",)))
    damaged = bytearray(archive)
    damaged[len(damaged) // 2] ^= 0xFF
    server = serve({"toy.tar.xz": bytes(damaged)})
    with pytest.raises(DownloadError, match="corrupted"):
        download_dataset(_info(server, archive, categories=("bottle",)), tmp_path,
                         accept_licence=True, **FAST)
    assert not (tmp_path / "bottle").exists()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_offline_error_names_the_url_and_where_to_put_the_file(tmp_path):
    with pytest.raises(DownloadError) as err:
        download_dataset("visa", tmp_path, accept_licence=True, mirror=_closed_port_url(),
                         retries=0, **FAST)
    text = str(err.value)
    assert "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar" in text
    assert f"save it as {tmp_path / 'VisA_20220922.tar'}" in text and "\n" not in text


def test_archive_saved_by_hand_is_used_without_network(tmp_path):
    archive = _tar(_mvtec_members(("bottle",)))
    info = DatasetInfo(name="toy", title="Toy", homepage="", licence="L.",
                       categories=("bottle",), archive=Archive(
                           _closed_port_url() + "/toy.tar.xz", "toy.tar.xz",
                           hashlib.sha256(archive).hexdigest()))
    (tmp_path / "toy.tar.xz").write_bytes(archive[:-10] + b"x" * 10)
    with pytest.raises(DownloadError, match="has SHA-256 .* damaged or another file"):
        download_dataset(info, tmp_path, accept_licence=True, **FAST)
    assert (tmp_path / "toy.tar.xz").exists()  # a file the user placed is not deleted
    (tmp_path / "toy.tar.xz").write_bytes(archive)
    download_dataset(info, tmp_path, accept_licence=True, keep_archive=False, **FAST)
    assert (tmp_path / "bottle" / "test" / "broken").is_dir()
    assert not (tmp_path / "toy.tar.xz").exists()


def test_licence_must_be_accepted_before_anything_is_fetched(serve, tmp_path):
    archive = _tar(_mvtec_members(("bottle",)))
    server = serve({"toy.tar.xz": archive})
    with pytest.raises(LicenceError, match="Toy licence text"):
        download_dataset(_info(server, archive, categories=("bottle",)), tmp_path, **FAST)
    assert server.requests == []


@pytest.mark.parametrize("members, links, message", [
    ({"bottle/train/good/a.png": b"x", "../evil.txt": b"x"}, None, "unsafe member name"),
    ({"/abs/evil.txt": b"x"}, None, "unsafe member name"),
    ({"bottle/train/good/a.png": b"x"}, {"bottle/train/good/b.png": "/etc/passwd"},
     "link or special file"),
])
def test_unsafe_archives_are_refused(serve, tmp_path, members, links, message):
    archive = _tar(members, links=links)
    server = serve({"toy.tar.xz": archive})
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=message):
        download_dataset(_info(server, archive, categories=("bottle",)), root,
                         accept_licence=True, **FAST)
    assert not (tmp_path / "evil.txt").exists() and not (root / "bottle").exists()
    assert not list(root.glob(".patchcore-unpack-*"))


def test_existing_user_folder_is_never_replaced(serve, tmp_path):
    archive = _tar(_mvtec_members(("bottle",)))
    server = serve({"toy.tar.xz": archive})
    (tmp_path / "bottle").mkdir()
    with pytest.raises(DownloadError, match="not written by `patchcore download`"):
        download_dataset(_info(server, archive, categories=("bottle",)), tmp_path,
                         accept_licence=True, **FAST)
    assert server.requests == []


def _visa_archive() -> bytes:
    rows = [["object", "split", "label", "image", "mask"]]
    members = {"LICENSE-DATASET": b"CC BY 4.0"}
    for i in range(3):
        name = f"candle/Data/Images/Normal/{i:04d}.JPG"
        members[name] = _png(100 + i)
        rows.append(["candle", "train" if i < 2 else "test", "normal", name, ""])
    members["candle/Data/Images/Anomaly/000.JPG"] = _png(10)
    members["candle/Data/Masks/Anomaly/000.png"] = _mask_png(value=3)  # VisA: class index
    rows.append(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG",
                 "candle/Data/Masks/Anomaly/000.png"])
    members["pcb1/Data/Images/Normal/0000.JPG"] = _png(50)
    rows.append(["pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    members["split_csv/1cls.csv"] = buf.getvalue().encode()
    return _tar(members, mode="w")


def test_visa_is_rearranged_by_its_split_file(serve, tmp_path):
    archive = _visa_archive()
    server = serve({"VisA_20220922.tar": archive})
    info = _info(server, archive, name="VisA_20220922.tar", layout="visa",
                 categories=("candle", "pcb1"))
    download_dataset(info, tmp_path, ["candle"], accept_licence=True, **FAST)
    split = load_dataset(tmp_path / "candle")
    assert split.layout == "mvtec" and [p.path.name for p in split.train] == ["0000.JPG",
                                                                              "0001.JPG"]
    assert sorted((s.group, s.path.name, s.label) for s in split.test) == [
        ("bad", "000.JPG", 1), ("good", "0002.JPG", 0)]
    assert split.has_masks
    assert not (tmp_path / "pcb1").exists()  # not asked for


def test_real_registry_entries_carry_published_checksums():
    assert DATASETS["mvtec"].archive.sha256.startswith("cf4313b13603")
    assert DATASETS["visa"].archive.sha256.startswith("2eb8690c803a")
    assert set(DATASETS["mvtec"].category_archives) == set(DATASETS["mvtec"].categories)
    # MVTec publishes no per-category checksums: none may be made up.
    assert all(a.sha256 is None for a in DATASETS["mvtec"].category_archives.values())


def test_cli_downloads_one_mvtec_category_from_a_mirror(serve, tmp_path):
    server = serve({"bottle.tar.xz": _tar(_mvtec_members(("bottle",)))})
    root = tmp_path / "mvtec"
    runner = CliRunner()
    r = runner.invoke(app, ["-q", "download", "mvtec", "bottle", "--root", str(root),
                            "--mirror", server.url])
    assert r.exit_code == 2 and "CC BY-NC-SA 4.0" in r.output and "--accept-license" in r.output
    assert server.requests == []
    r = runner.invoke(app, ["-q", "download", "mvtec", "bottle", "--root", str(root),
                            "--mirror", server.url, "--accept-license"])
    assert r.exit_code == 0, r.output
    assert len(load_dataset(root / "bottle").train) == 3
    r = runner.invoke(app, ["download", "mvtec", "nosuch", "--root", str(root)])
    assert r.exit_code == 2 and "no category 'nosuch'" in r.output


def test_benchmark_goes_from_nothing_to_a_results_table_in_one_call(serve, tmp_path):
    from patchcore import benchmark

    members = _mvtec_members(("bottle",))
    members |= {f"bottle/train/good/{i:03d}.png": _png(100 + i, 32) for i in range(4)}
    members |= {"bottle/test/good/000.png": _png(100, 32), "bottle/test/good/001.png":
                _png(104, 32), "bottle/test/broken/000.png": _png(20, 32)}
    members["bottle/ground_truth/broken/000_mask.png"] = _mask_png(32)
    server = serve({"bottle.tar.xz": _tar(members)})
    root = tmp_path / "mvtec"
    kw = dict(categories=["bottle"], output=tmp_path / "bench", download="mvtec",
              mirror=server.url, imagesize=64, progress=False, reports=False)
    with pytest.raises(LicenceError):
        benchmark(root, **kw)
    assert server.requests == []
    table = benchmark(root, accept_licence=True, **kw)
    assert list(table["category"][:1]) == ["bottle"]
    assert 0.0 <= float(table["image_auroc"].iloc[0]) <= 1.0
    assert (tmp_path / "bench" / "results.csv").is_file()
    hits = len(server.requests)
    benchmark(root, **kw)  # downloaded and finished: nothing fetched or recomputed
    assert len(server.requests) == hits
    with pytest.raises(DownloadError, match="by hand"):  # offline: fetch it by hand, put it here
        benchmark(tmp_path / "other", accept_licence=True, **{**kw, "mirror": _closed_port_url()})
