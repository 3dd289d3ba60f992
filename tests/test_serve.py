"""The HTTP service: every endpoint and error status, the key rule, micro-batching,
back-pressure, reload after an atomic replacement, review exports, and a bounded load test
against a real server on 127.0.0.1."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from conftest import TINY  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from patchcore import PatchCore, load_dataset  # noqa: E402
from patchcore.data.synthetic import make_synthetic_dataset  # noqa: E402
from patchcore.errors import ConfigError  # noqa: E402
from patchcore.serve import (  # noqa: E402
    BackgroundServer,
    ServeOptions,
    Service,
    check_exposure,
    create_app,
    default_db,
)
from patchcore.serve.app import default_scorer  # noqa: E402
from patchcore.serve.batching import MicroBatcher, QueueFull  # noqa: E402
from patchcore.serve.store import ReviewStore, safe_stem  # noqa: E402

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_data")
    make_synthetic_dataset(root, categories=("carpet",), n_train=6, n_test_good=2,
                           n_test_defect=3, size=48, seed=3)
    return root / "carpet"


@pytest.fixture(scope="module")
def tiny(data) -> PatchCore:
    return PatchCore(**TINY).fit(data)


@pytest.fixture(scope="module")
def images(data) -> list[Path]:
    return sorted((data / "test").rglob("*.png"))


@pytest.fixture
def results(tiny, tmp_path) -> Path:
    """A results folder with two models: models/carpet and models/copy."""
    tiny.save(tmp_path / "results" / "models" / "carpet")
    tiny.save(tmp_path / "results" / "models" / "copy")
    return tmp_path / "results"


@pytest.fixture
def client(results, tmp_path):
    service = Service(results, ServeOptions(db=tmp_path / "reviews.sqlite", check_interval=0,
                                            max_request_bytes=2_000_000, max_images=4))
    with TestClient(create_app(service)) as c:
        yield c


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/png")}


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height pixels (valid CRCs), with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# -- predict ---------------------------------------------------------------------------------


def test_predict_multipart_answers_scores_label_map_and_overlay(client, tiny, images):
    expected = tiny.predict([images[-1]])
    r = client.post("/v1/models/carpet/predict?maps=png&overlay=true", files=upload(images[-1]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "carpet" and body["batch_images"] == 1
    p = body["predictions"][0]
    assert p["filename"] == images[-1].name
    assert p["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5)
    assert p["calibrated_score"] == pytest.approx(float(expected.calibrated[0]), abs=1e-6)
    assert p["label"] == expected.label_names[0]
    assert p["image_threshold"] == pytest.approx(tiny.calibration_.image_threshold)
    assert p["pixel_threshold"] == pytest.approx(tiny.calibration_.pixel_threshold)
    size = Image.open(images[-1]).size
    assert (p["width"], p["height"]) == size
    map_png = Image.open(io.BytesIO(base64.b64decode(p["map"]["data"])))
    assert map_png.size == size and map_png.mode == "L"
    want = np.clip(expected.calibrated_map(0, tiny.calibration_), 0, 1) * 255
    np.testing.assert_allclose(np.asarray(map_png, float), want, atol=1.0)
    overlay = Image.open(io.BytesIO(base64.b64decode(p["overlay"]["data"])))
    assert overlay.size == size and overlay.mode == "RGB"


def test_predict_json_base64_several_images_in_order_with_array_maps(client, tiny, images):
    chosen = [images[0], images[-1], images[1]]
    payload = {"images": [{"data": base64.b64encode(p.read_bytes()).decode(),
                           "filename": p.name} for p in chosen]}
    r = client.post("/v1/models/copy/predict?maps=array", json=payload)
    assert r.status_code == 200, r.text
    expected = tiny.predict(chosen)
    answers = r.json()["predictions"]
    assert [a["filename"] for a in answers] == [p.name for p in chosen]
    np.testing.assert_allclose([a["score"] for a in answers], expected.scores, rtol=1e-5)
    for i, a in enumerate(answers):
        m = a["map"]
        raw = np.frombuffer(base64.b64decode(m["data"]), dtype="<f2").reshape(m["shape"])
        np.testing.assert_allclose(raw, expected.original_map(i), rtol=2e-3, atol=2e-3)
        assert "overlay" not in a


def test_models_lists_every_model_with_backbone_training_and_thresholds(client, tiny):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["carpet", "copy"]
    m = models[0]
    assert m["backbone"] == "resnet18" and m["calibrated"] is True
    assert m["image_threshold"] == pytest.approx(tiny.calibration_.image_threshold)
    assert m["training"]["train_images"] == tiny.fit_info_["train_images"]
    assert m["training"]["bank_rows"] == [len(tiny.members_[0].bank)]
    assert str(Path.cwd()) not in json.dumps(models)  # no server paths


def test_health_ready_and_prometheus_metrics(client, images):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["carpet", "copy"]
    client.post("/v1/models/carpet/predict", files=upload(images[0]))
    client.post("/v1/models/nope/predict", files=upload(images[0]))
    text = client.get("/metrics").text
    assert ('patchcore_requests_total{method="POST",route="/v1/models/{name}/predict",'
            'status="200"} 1') in text
    assert 'route="/v1/models/{name}/predict",status="404"} 1' in text
    assert 'patchcore_request_seconds_bucket{route="/v1/models/{name}/predict",le="+Inf"} 2' \
        in text
    assert "patchcore_queue_depth 0" in text
    assert 'patchcore_images_scored_total{model="carpet"} 1' in text
    assert "patchcore_batch_images_count 1" in text


def test_readyz_is_503_when_the_workers_are_stopped(results):
    service = Service(results, ServeOptions(check_interval=0))
    with TestClient(create_app(service)) as c:
        service.batcher.close()
        r = c.get("/readyz")
        assert r.status_code == 503 and "workers" in r.json()["detail"]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    "garbage", "bomb", "aspect", "empty", "base64", "json", "maps", "nothing", "review_id",
])
def test_bad_requests_are_400_with_a_json_message(client, case):
    url = "/v1/models/carpet/predict"
    if case == "garbage":
        r = client.post(url, files={"image": ("x.png", b"not an image at all")})
        match = "not a readable image"
    elif case == "bomb":
        r = client.post(url, files={"image": ("bomb.png", png_declaring(100_000, 100_000))})
        match = "more than the limit"
    elif case == "aspect":
        r = client.post(url, files={"image": ("thin.png", png_of(np.zeros((2, 200, 3),
                                                                          np.uint8)))})
        match = "MAX_ASPECT_RATIO"
    elif case == "empty":
        r = client.post(url, files={"image": ("e.png", b"")})
        match = "empty"
    elif case == "base64":
        r = client.post(url, json={"images": [{"data": "***"}]})
        match = "not valid base64"
    elif case == "json":
        r = client.post(url, content=b"{nope", headers={"content-type": "application/json"})
        match = "not valid JSON"
    elif case == "maps":
        r = client.post(url + "?maps=jpeg", files={"image": ("e.png", b"")})
        match = "maps must be one of"
    elif case == "nothing":
        r = client.post(url, files={"field": (None, "value")})  # multipart, no file
        match = "holds no image"
    else:
        r = client.post("/v1/reviews/abc", json={"verdict": "correct"})
        match = "invalid request"
    assert r.status_code == 400, r.text
    assert r.json()["status"] == 400 and match in r.json()["error"]


def test_unknown_model_and_route_are_404(client, images):
    r = client.post("/v1/models/../../etc/predict", files=upload(images[0]))
    assert r.status_code == 404 and r.json()["status"] == 404
    r = client.post("/v1/models/bottle/predict", files=upload(images[0]))
    assert r.status_code == 404 and "no model named 'bottle'" in r.json()["error"]
    assert "carpet, copy" in r.json()["error"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "no such route" in r.json()["error"]
    assert client.get("/v1/reviews/999/image").status_code == 404


def test_too_large_requests_are_413(client, images):
    big = b"\x00" * 2_100_000
    r = client.post("/v1/models/carpet/predict", files={"image": ("big.png", big)})
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]

    def chunks():  # no Content-Length: counted while it is read
        for _ in range(30):
            yield b"\x00" * 100_000
    r = client.post("/v1/models/carpet/predict", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    five = [("image", (f"{i}.png", images[0].read_bytes(), "image/png")) for i in range(5)]
    r = client.post("/v1/models/carpet/predict", files=five)
    assert r.status_code == 413 and "more than 4 images" in r.json()["error"]


def test_other_content_types_are_415(client):
    r = client.post("/v1/models/carpet/predict", content=b"abc",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


# -- API key ---------------------------------------------------------------------------------


def test_api_key_is_required_on_every_data_route(results, images):
    service = Service(results, ServeOptions(api_key=KEY, check_interval=0))
    with TestClient(create_app(service)) as c:
        for method, url in [("get", "/v1/models"), ("get", "/metrics"),
                            ("post", "/v1/models/carpet/predict"), ("get", "/v1/reviews")]:
            r = getattr(c, method)(url)
            assert r.status_code == 401, url
            assert "needs an API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.get("/v1/models", headers={"X-API-Key": KEY + "x"})
        assert r.status_code == 401 and r.json()["error"] == "the API key is wrong"
        assert c.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        r = c.post("/v1/models/carpet/predict", files=upload(images[0]),
                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        # probes and the page itself stay open (the page asks for the key)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert "patchcore review" in c.get("/").text


def test_a_key_is_required_beyond_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ConfigError, match="set an API key"):
            check_exposure(host, None)
        check_exposure(host, KEY)
    with pytest.raises(ConfigError, match="at least 8 characters"):
        ServeOptions(api_key="short")


# -- batching and back-pressure ----------------------------------------------------------------


class Recorder:
    """A scorer that records batch sizes and can be held until released."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, model, images):
        self.entered.set()
        assert self.gate.wait(20)
        if any(im == "bad" for im in images):
            raise ValueError("bad image")
        self.sizes.append(len(images))
        return list(images)


def test_micro_batches_gather_waiting_jobs_up_to_max_batch():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, batch_wait_ms=50, queue_size=32)
    try:
        first = b.submit(b.reserve(1), "m", ["a"])
        assert rec.entered.wait(5)  # the worker holds job 1; the others queue up meanwhile
        futures = [b.submit(b.reserve(1), "m", [f"x{i}"]) for i in range(9)]
        other = b.submit(b.reserve(1), "other-model", ["o"])
        assert b.depth == 10
        rec.gate.set()
        results = [f.result(10) for f in [first, *futures, other]]
    finally:
        b.close()
    assert rec.sizes[0] == 1 and max(rec.sizes) == 4 and sum(rec.sizes) == 11
    assert all(r.prediction[r.rows[0]] == want for r, want in
               zip(results, ["a", *[f"x{i}" for i in range(9)], "o"], strict=True))
    assert results[-1].batch_images == 1  # never mixed with the other model's jobs


def test_a_failing_job_does_not_fail_its_batch_mates():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, batch_wait_ms=50, queue_size=8)
    try:
        hold = b.submit(b.reserve(1), "m", ["h"])
        assert rec.entered.wait(5)
        good = b.submit(b.reserve(1), "m", ["g"])
        bad = b.submit(b.reserve(1), "m", ["bad"])
        rec.gate.set()
        assert hold.result(10).prediction == ["h"]
        assert good.result(10).prediction == ["g"]
        with pytest.raises(ValueError, match="bad image"):
            bad.result(10)
    finally:
        b.close()


def test_the_queue_is_bounded_and_refuses_with_a_retry_hint():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=1, queue_size=3)
    try:
        r1 = b.reserve(2)
        with pytest.raises(QueueFull) as info:
            b.reserve(2)
        assert info.value.retry_after >= 1
        r1.release()
        r1.release()  # idempotent
        b.reserve(3).release()
    finally:
        rec.gate.set()
        b.close()


def test_full_queue_answers_503_with_retry_after(results, images):
    rec = Recorder()

    def scorer(model, imgs):
        rec(model, [None] * len(imgs))
        return default_scorer(model, imgs)

    service = Service(results, ServeOptions(max_batch=1, queue_size=1, max_images=1,
                                            check_interval=0), scorer=scorer)
    with TestClient(create_app(service)) as c, ThreadPoolExecutor(2) as pool:
        url = "/v1/models/carpet/predict"
        first = pool.submit(c.post, url, files=upload(images[0]))
        assert rec.entered.wait(20)  # scoring, held
        second = pool.submit(c.post, url, files=upload(images[1]))
        deadline = time.monotonic() + 20
        while service.batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post(url, files=upload(images[2]))
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["error"]
        rec.gate.set()
        assert first.result(30).status_code == 200 and second.result(30).status_code == 200
        assert "patchcore_rejected_total 1" in c.get("/metrics").text


# -- models: several, reloads ------------------------------------------------------------------


def test_a_replaced_model_is_reloaded_and_a_broken_save_keeps_the_old_one(results, data,
                                                                        images, tmp_path):
    service = Service(results, ServeOptions(check_interval=0))
    url = "/v1/models/carpet/predict"
    with TestClient(create_app(service)) as c:
        before = c.post(url, files=upload(images[-1])).json()["predictions"][0]["score"]
        train = sorted((data / "train" / "good").glob("*.png"))[:3]
        other = PatchCore(**{**TINY, "seed": 7}).fit(train)
        other.save(results / "models" / "carpet")  # the atomic swap of a save
        after = c.post(url, files=upload(images[-1])).json()["predictions"][0]["score"]
        assert after == pytest.approx(float(other.predict([images[-1]]).scores[0]), rel=1e-5)
        assert after != pytest.approx(before, rel=1e-3)
        info = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert info["carpet"]["reloads"] == 1 and info["copy"]["reloads"] == 0
        assert "patchcore_model_reloads_total 1" in c.get("/metrics").text

        cfg = results / "models" / "carpet" / "config.json"
        cfg.write_text(cfg.read_text()[:-20])  # a damaged save
        r = c.post(url, files=upload(images[-1]))
        assert r.status_code == 200
        assert r.json()["predictions"][0]["score"] == pytest.approx(after, rel=1e-6)
        info = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert info["carpet"]["reload_error"] and info["carpet"]["reloads"] == 1

        other.save(tmp_path / "new_model")  # a model folder appearing later is served
        shutil.move(tmp_path / "new_model", results / "models" / "late")
        r = c.post("/v1/models/late/predict", files=upload(images[0]))
        assert r.status_code == 200
        shutil.rmtree(results / "models" / "copy")  # and a removed one is dropped
        assert c.post("/v1/models/copy/predict", files=upload(images[0])).status_code == 404


def test_one_model_folder_is_served_under_its_name(tiny, tmp_path, images):
    folder = tiny.save(tmp_path / "models" / "bottle")
    service = Service(folder, ServeOptions())
    with TestClient(create_app(service)) as c:
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["bottle"]
    assert default_db(folder) == folder.resolve().parent / "bottle.reviews.sqlite"
    assert default_db(tmp_path) == tmp_path.resolve() / "reviews.sqlite"


# -- reviews ---------------------------------------------------------------------------------


def test_review_records_verdicts_and_exports_csv_and_dataset_layout(client, images, tmp_path,
                                                                    tiny):
    ids = []
    for p in images[:3]:
        r = client.post("/v1/models/carpet/predict?review=true", files=upload(p))
        assert r.status_code == 200
        ids.append(r.json()["predictions"][0]["review_id"])
    rows = client.get("/v1/reviews?sort=score&order=desc").json()["reviews"]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {r["id"] for r in rows} == set(ids) and all(r["verdict"] is None for r in rows)
    image = client.get(f"/v1/reviews/{ids[0]}/image")
    assert image.content == images[0].read_bytes() and image.headers["content-type"] == \
        "image/png"
    assert Image.open(io.BytesIO(client.get(f"/v1/reviews/{ids[0]}/overlay").content)).size \
        == Image.open(images[0]).size

    labels = {r["id"]: r["label"] for r in rows}
    flip = {"good": "anomalous", "anomalous": "good"}
    r = client.post(f"/v1/reviews/{ids[0]}", json={"verdict": "correct", "defect": "scratch"})
    assert r.status_code == 200 and r.json()["true_label"] == labels[ids[0]]
    r = client.post(f"/v1/reviews/{ids[1]}", json={"verdict": "wrong", "defect": "spot"})
    assert r.json()["true_label"] == flip[labels[ids[1]]]
    for bad in ({"verdict": "maybe"}, {}, {"verdict": "wrong", "true_label": "good"},
                {"true_label": "anomalous", "defect": "../x"},
                {"true_label": "anomalous", "defect": "good"}):
        assert client.post(f"/v1/reviews/{ids[2]}", json=bad).status_code == 400, bad
    assert client.post("/v1/reviews/9999", json={"verdict": "correct"}).status_code == 404

    table = list(csv.DictReader(io.StringIO(client.get("/v1/reviews/export.csv").text)))
    assert [int(t["id"]) for t in table] == ids[:2]
    assert table[1]["verdict"] == "wrong" and table[1]["label"] == labels[ids[1]]
    assert table[1]["true_label"] == flip[labels[ids[1]]]

    z = zipfile.ZipFile(io.BytesIO(client.get("/v1/reviews/export.zip").content))
    expected = set()
    for row_id, truth, defect in ((ids[0], labels[ids[0]], "scratch"),
                                  (ids[1], flip[labels[ids[1]]], "spot")):
        group = "train/good" if truth == "good" else f"test/{defect}"
        expected.add(f"carpet/{group}/{row_id:06d}_{images[ids.index(row_id)].stem}.png")
    assert set(z.namelist()) == expected

    # the operator's export into a folder loads as a dataset for the next fit
    store = client.app.state.service.store
    out = tmp_path / "export"
    assert store.export_layout(out) == 2
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(expected)
    # with one more normal image (in case both reviewed ones are defects) it loads for a fit
    (out / "carpet" / "train" / "good").mkdir(parents=True, exist_ok=True)
    shutil.copy(images[0], out / "carpet" / "train" / "good" / "extra.png")
    split = load_dataset(out / "carpet", layout="folder")
    assert len(split.train) + len(split.test) == 3


def test_client_file_names_never_leave_their_folder(tmp_path):
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("C:\\x\\..\\evil name!.png") == "evil_name"
    assert safe_stem("") == safe_stem(None) == safe_stem("...") == "image"
    store = ReviewStore(tmp_path / "r.sqlite")
    row = store.add("m/../x", "../../a.png", 1.0, 0.9, "anomalous", 0.5, b"\x89PNG\r\n\x1a\n",
                    None)
    store.review(row, verdict="correct")
    assert [n for n, _ in store.layout_entries()] == [f"x/test/defect/{row:06d}_a.png"]
    store.export_layout(tmp_path / "out")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) == 1 and (tmp_path / "out") in files[0].parents


def test_reviews_are_off_without_a_database(results):
    with TestClient(create_app(Service(results, ServeOptions()))) as c:
        assert c.get("/v1/reviews").status_code == 404
        r = c.post("/v1/models/carpet/predict?review=true", files={"image": ("a", b"")})
        assert r.status_code == 400 and "--db" in r.json()["error"]


# -- a real server under load ------------------------------------------------------------------


def test_bounded_load_against_a_server_on_loopback(results, images):
    """96 requests from 8 clients against uvicorn on 127.0.0.1: all answered within the time
    limit, micro-batches formed, the queue never beyond its capacity."""
    options = ServeOptions(max_batch=8, batch_wait_ms=10, queue_size=32, check_interval=60)
    service = Service(results, options)
    bodies = [p.read_bytes() for p in images]
    deadline = time.monotonic() + 90
    depths: list[int] = []

    with BackgroundServer(create_app(service)) as url, httpx.Client(base_url=url,
                                                                   timeout=60) as http:
        def one(i: int) -> tuple[int, int]:
            r = http.post("/v1/models/carpet/predict",
                          files={"image": (f"{i}.png", bodies[i % len(bodies)], "image/png")})
            depths.append(service.batcher.reserved)
            return r.status_code, r.json().get("batch_images", 0)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(96)))
        assert time.monotonic() < deadline, "the load test ran past its time limit"
        metrics = http.get("/metrics").text
    assert [s for s, _ in answers] == [200] * 96
    assert max(b for _, b in answers) > 1, "no micro-batch formed under concurrency 8"
    assert max(depths) <= options.queue_size
    assert "patchcore_batch_images_count" in metrics


def test_serve_command_refuses_an_open_host_without_a_key_and_a_folder_without_models(
        results, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from patchcore.cli import app

    monkeypatch.delenv("PATCHCORE_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["serve", str(results), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "set an API key" in r.output
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "empty"), "--port", "1"])
    assert r.exit_code == 2 and "holds no saved model" in r.output


def test_requests_larger_than_the_queue_are_refused_at_start():
    with pytest.raises(ConfigError, match="never be admitted"):
        ServeOptions(queue_size=4, max_images=8)
