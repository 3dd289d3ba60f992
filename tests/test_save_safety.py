"""Saving never loses anything: refusals, kill -9 / Ctrl-C / full disk at every step, modes.

Each test fails on the former save (which replaced any folder, left no model at the path
between two renames, wrote 0700/0600 folders and files and had no crash recovery).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from patchcore import ModelFileError, PatchCore, storage
from patchcore.config import PatchCoreConfig
from patchcore.engine.bank import MemoryBank
from patchcore.engine.calibration import Calibration
from patchcore.storage import (
    BANK_FILE,
    CONFIG_FILE,
    ModelState,
    is_model_folder,
    list_model_folders,
    load_state,
    save_state,
)

ROWS, DIM = 12, 16


def make_state(version: int) -> ModelState:
    """A tiny valid model whose bank values and image threshold are `version`."""
    config = PatchCoreConfig(backbone="resnet18", pretrained=False, imagesize=32, resize=32,
                             target_embed_dimension=DIM, pretrain_embed_dimension=DIM)
    rng = np.random.default_rng(version)
    bank = MemoryBank("resnet18", ("layer2", "layer3"),
                      np.full((ROWS, DIM), float(version), dtype=np.float32),
                      rng.integers(0, 2, ROWS).astype(np.int32),
                      rng.integers(0, 4, (ROWS, 2)).astype(np.int16))
    calibration = Calibration(image_threshold=float(version), image_min=0.0,
                              image_max=float(version) + 1, image_threshold_rule="test",
                              source_images=2)
    return ModelState(config, [bank], (4, 4), calibration, ["a.png", "b.png"], "/data",
                      {"train_images": 2})


def version_at(path: Path) -> int:
    """The version of the model at `path`; its config and bank must agree."""
    state = load_state(path)
    value = float(state.banks[0].features[0, 0])
    assert state.calibration.image_threshold == value, "config and bank of different saves"
    assert np.all(state.banks[0].features == value)
    return int(value)


def hidden(parent: Path) -> list[str]:
    """Hidden entries (temporary folders of saves) in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.fixture(params=["exchange", "two-renames"])
def scheme(request, monkeypatch) -> str:
    """Run a test with the atomic exchange and with the fallback for systems without it."""
    if request.param == "exchange":
        if storage._renameat2() is None:
            pytest.skip("renameat2 is not available here")
    else:
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    return request.param


# --- what may be replaced ---------------------------------------------------------------


def test_folder_with_user_files_is_refused_and_kept(tmp_path):
    userdir = tmp_path / "userdir"
    (userdir / "notes").mkdir(parents=True)
    (userdir / "notes" / "thesis.txt").write_text("four years of work")
    save_state(make_state(1), userdir / "other_model")
    before = tree(userdir)
    model = PatchCore.from_state(make_state(2))
    with pytest.raises(ModelFileError, match="refusing to replace") as info:
        model.save(userdir)
    message = str(info.value)
    assert "\n" not in message and str(userdir) in message and "notes" in message
    assert tree(userdir) == before
    assert version_at(userdir / "other_model") == 1
    assert hidden(tmp_path) == []


def test_model_folder_with_extra_files_or_foreign_content_is_refused(tmp_path):
    model = save_state(make_state(1), tmp_path / "model")
    (model / "README.txt").write_text("how this model was trained")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / CONFIG_FILE).write_text(json.dumps({"model": "someone else's"}))
    bank_only = tmp_path / "bank_only"
    bank_only.mkdir()
    (bank_only / BANK_FILE).write_bytes(b"data")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / CONFIG_FILE).write_text("{not json")
    snapshot = tree(tmp_path)
    for folder, message in ((model, "also holds other files \\(README.txt\\)"),
                            (foreign, "not a patchcore model folder"),
                            (bank_only, "not a patchcore model folder"),
                            (damaged, "not a patchcore model folder")):
        with pytest.raises(ModelFileError, match=message):
            save_state(make_state(2), folder)
    assert tree(tmp_path) == snapshot
    assert version_at(model) == 1


def test_files_links_and_unnamed_destinations_are_refused(tmp_path, monkeypatch):
    file = tmp_path / "results.csv"
    file.write_text("a,b\n1,2\n")
    with pytest.raises(ModelFileError, match="it is a file"):
        save_state(make_state(1), file)
    assert file.read_text() == "a,b\n1,2\n"
    model = save_state(make_state(1), tmp_path / "model")
    link = tmp_path / "current"
    link.symlink_to(model)
    with pytest.raises(ModelFileError, match="symbolic link"):
        save_state(make_state(2), link)
    assert link.is_symlink() and version_at(model) == 1
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    for name in ("", ".", "..", "/", "model/..", ".model.tmp-123-0123abcd"):
        with pytest.raises(ModelFileError, match="cannot save a model to"):
            save_state(make_state(2), Path(name))
    with pytest.raises(ModelFileError, match="longer than"):
        save_state(make_state(2), Path("m" * 240))
    assert tree(tmp_path) == before and hidden(tmp_path) == []


def test_new_path_empty_folder_and_existing_model_are_written(tmp_path, scheme):
    new = save_state(make_state(1), tmp_path / "a" / "b" / "model")
    assert version_at(new) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    save_state(make_state(2), empty)
    assert version_at(empty) == 2
    save_state(make_state(3), new)
    assert version_at(new) == 3
    assert sorted(p.name for p in new.iterdir()) == [CONFIG_FILE, BANK_FILE]
    assert hidden(new.parent) == [] and hidden(tmp_path) == []
    relative = Path(os.path.relpath(new, Path.cwd()))
    save_state(make_state(4), relative)
    assert version_at(new) == 4


def test_exchange_swaps_two_folders(tmp_path):
    if storage._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    (b / "y").touch()
    assert storage._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


def test_bank_file_is_plain_safetensors(tmp_path):
    model = save_state(make_state(5), tmp_path / "model")
    with safe_open(str(model / BANK_FILE), framework="numpy") as fh:
        assert fh.metadata() == {"format": "patchcore-model"}
        assert fh.get_tensor("member0.bank").dtype == np.float32
        assert fh.get_tensor("member0.position").shape == (ROWS, 2)
    half = make_state(6)
    half.banks[0].features = half.banks[0].features.astype(np.float16)
    save_state(half, model)
    assert load_state(model).banks[0].features.dtype == np.float16


# --- kill -9, Ctrl-C and full disk at every step ------------------------------------------

BEFORE_SWAP = ["created", "bank_partial", "bank_written", "config_written", "synced"]
REPLACE_STEPS = {"exchange": BEFORE_SWAP + ["swapped", "removing_old"],
                 "two-renames": BEFORE_SWAP + ["moved_aside", "installed", "removing_old"]}
SCHEME_STEPS = [(scheme, step) for scheme, steps in REPLACE_STEPS.items() for step in steps]
NEW_MODEL_AFTER = {"swapped", "installed", "removing_old"}


def crash_save(state: ModelState, dest: Path, step: str) -> None:
    """Save in a forked child that SIGKILLs itself when the save reaches `step`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 3
        try:
            def die(name: str) -> None:
                if name == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            storage._reached = die
            save_state(state, dest)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the save did not reach step {step}")


@pytest.mark.parametrize(("scheme", "step"), SCHEME_STEPS, indirect=["scheme"])
def test_kill_9_while_replacing_leaves_old_or_new_model(tmp_path, scheme, step):
    dest = save_state(make_state(1), tmp_path / "model")
    expected = 2 if step in NEW_MODEL_AFTER else 1
    crash_save(make_state(2), dest, step)
    if not (scheme == "two-renames" and step == "moved_aside"):
        assert version_at(dest) == expected  # complete, and the right one, without repair
    else:
        assert not dest.exists()  # the fallback's window: repaired by the next load
    assert version_at(dest) == expected  # a load tidies the leftovers of the dead process
    assert hidden(tmp_path) == []
    crash_save(make_state(2), dest, step)
    save_state(make_state(3), dest)  # the next save tidies as well
    assert version_at(dest) == 3
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("step", BEFORE_SWAP + ["installed"])
def test_kill_9_while_writing_a_new_model(tmp_path, step):
    dest = tmp_path / "model"
    crash_save(make_state(2), dest, step)
    if step == "installed":
        assert version_at(dest) == 2
    else:
        with pytest.raises(ModelFileError, match="does not exist"):
            load_state(dest)
    assert hidden(tmp_path) == []
    crash_save(make_state(2), tmp_path / "other", step)
    save_state(make_state(3), dest)  # the next save into the folder tidies all its leftovers
    assert version_at(dest) == 3 and hidden(tmp_path) == []


def test_kill_9_from_outside_between_the_two_renames(tmp_path):
    """A separate interpreter killed by another process in the fallback's one risky window."""
    dest = save_state(make_state(1), tmp_path / "model")
    source = save_state(make_state(2), tmp_path / "source")
    script = textwrap.dedent(f"""
        import sys, time
        from patchcore import storage
        storage._exchange = lambda a, b: False
        def pause(step):
            if step == "moved_aside":
                print("ready", flush=True)
                time.sleep(60)
        storage._reached = pause
        storage.save_state(storage.load_state({str(source)!r}), {str(dest)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert not dest.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert version_at(dest) == 1 and hidden(tmp_path) == []


@pytest.mark.parametrize(("scheme", "step"), SCHEME_STEPS, indirect=["scheme"])
def test_ctrl_c_at_any_step_leaves_a_model_and_no_temporary_folders(tmp_path, scheme, step,
                                                                    monkeypatch):
    dest = save_state(make_state(1), tmp_path / "model")

    def interrupt(name: str) -> None:
        if name == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_reached", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_state(make_state(2), dest)
    assert version_at(dest) == (2 if step in NEW_MODEL_AFTER else 1)
    assert hidden(tmp_path) == []


def test_ctrl_c_in_the_writer_keeps_the_previous_model(tmp_path, monkeypatch):
    dest = save_state(make_state(1), tmp_path / "model")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_write_bank", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state(make_state(2), dest)
    assert version_at(dest) == 1 and hidden(tmp_path) == []


@pytest.mark.parametrize("target", [BANK_FILE, CONFIG_FILE, "fsync"])
def test_full_disk_gives_one_line_error_and_keeps_the_old_model(tmp_path, scheme, target,
                                                                monkeypatch):
    dest = save_state(make_state(1), tmp_path / "model")
    before = tree(dest)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if target == "fsync":
        def fsync(fd: int) -> None:
            raise full

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        write_file = storage._write_file

        def write_until_full(path: Path, write: Any) -> None:
            if path.name == target:
                with open(path, "xb") as fh:
                    fh.write(b"partial")
                raise full
            write_file(path, write)

        monkeypatch.setattr(storage, "_write_file", write_until_full)
    with pytest.raises(ModelFileError, match="no space left on device while writing") as info:
        save_state(make_state(2), dest)
    message = str(info.value)
    assert "\n" not in message and str(dest) in message and "free some disk space" in message
    monkeypatch.undo()
    assert tree(dest) == before and version_at(dest) == 1
    assert hidden(tmp_path) == []


def test_failing_swap_keeps_the_old_model(tmp_path, scheme, monkeypatch):
    dest = save_state(make_state(1), tmp_path / "model")
    if scheme == "exchange":
        def broken_exchange(a: bytes, b: bytes) -> int:
            import ctypes

            ctypes.set_errno(errno.EIO)
            return -1

        monkeypatch.setattr(storage, "_renameat2", lambda: broken_exchange)
    else:
        rename = os.rename

        def second_rename_fails(src: Any, dst: Any) -> None:
            if ".tmp-" in Path(src).name and Path(dst) == dest:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            rename(src, dst)

        monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(ModelFileError, match="input/output error while moving"):
        save_state(make_state(2), dest)
    monkeypatch.undo()
    assert version_at(dest) == 1 and hidden(tmp_path) == []


def test_leftovers_of_live_processes_and_with_user_files_are_kept(tmp_path):
    save_state(make_state(1), tmp_path / "model")
    live = tmp_path / ".model.tmp-1-0123abcd"  # pid 1 is always alive
    save_state(make_state(2), live.with_name("x"))
    os.rename(live.with_name("x"), live)
    odd = tmp_path / f".model.old-{dead_pid()}-89abcdef"
    odd.mkdir()
    (odd / "mine.txt").write_text("keep me")
    stale = tmp_path / f".other.tmp-{dead_pid()}-00000000"
    stale.mkdir()
    (stale / BANK_FILE).write_bytes(b"half a bank")
    save_state(make_state(3), tmp_path / "model")
    assert hidden(tmp_path) == sorted([live.name, odd.name])
    assert (odd / "mine.txt").read_text() == "keep me" and version_at(live) == 2


def test_list_model_folders_skips_hidden_and_temporary_folders(tmp_path):
    for name in ("b", "a", ".hidden"):
        save_state(make_state(1), tmp_path / name)
    crash_save(make_state(2), tmp_path / "a", "swapped")  # leaves .a.tmp-PID-TOKEN (a model)
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert any(".a.tmp-" in n for n in hidden(tmp_path))
    assert list_model_folders(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert list_model_folders(tmp_path / "missing") == []
    assert is_model_folder(tmp_path / "a") and not is_model_folder(tmp_path / "data")
    assert not is_model_folder(tmp_path / "notes.txt")


def test_a_load_racing_a_save_never_mixes_two_models(tmp_path, monkeypatch):
    """config.json read from one save and the bank from the next would look valid."""
    dest = save_state(make_state(1), tmp_path / "model")
    import safetensors.numpy

    load_file = safetensors.numpy.load_file
    calls = []

    def save_in_between(filename: str) -> Any:
        if not calls:
            save_state(make_state(2), dest)
        calls.append(filename)
        return load_file(filename)

    monkeypatch.setattr(safetensors.numpy, "load_file", save_in_between)
    assert version_at(dest) == 2 and len(calls) == 2


# --- permissions follow the umask -------------------------------------------------------


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o755, 0o644),
                                                        (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_modes_follow_the_umask(tmp_path, scheme, umask, folder, file):
    previous = os.umask(umask)
    try:
        dest = save_state(make_state(1), tmp_path / "model")
        modes = [stat.S_IMODE(os.stat(p).st_mode) for p in (dest, dest / CONFIG_FILE,
                                                             dest / BANK_FILE)]
        assert modes == [folder, file, file]
        save_state(make_state(2), dest)  # a replacement too
        modes = [stat.S_IMODE(os.stat(p).st_mode) for p in (dest, dest / CONFIG_FILE,
                                                             dest / BANK_FILE)]
        assert modes == [folder, file, file]
    finally:
        os.umask(previous)


# --- hostile config.json: ModelFileError, never another exception -------------------------

HUGE = "__huge_number__"
DELETE = object()


@pytest.fixture(scope="module")
def valid_model(tmp_path_factory) -> Path:
    return save_state(make_state(1), tmp_path_factory.mktemp("hostile") / "model")


def _paths(value: Any, prefix: tuple = (), depth: int = 0) -> Iterator[tuple]:
    yield prefix
    if depth < 3 and isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key), depth + 1)
    elif depth < 3 and isinstance(value, list):
        for i, child in enumerate(value[:3]):
            yield from _paths(child, (*prefix, i), depth + 1)


def _edit(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return None if value is DELETE else value
    node = document
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return document  # an earlier edit removed this branch
    try:
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return document


def _load_outcome(folder: Path, text: str) -> str:
    (folder / CONFIG_FILE).write_text(text)
    try:
        load_state(folder)
    except ModelFileError as exc:
        assert "\n" not in str(exc)
        return "refused"
    return "loaded"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from([HUGE, 10**40, -(10**40), 2**63, 1e308, -0.0, "", "float32", "../x"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_config_document_loads_or_raises_model_file_error(valid_model, tmp_path, data):
    base = json.loads((valid_model / CONFIG_FILE).read_text())
    paths = list(_paths(base))
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths),
                                         st.just(DELETE) | json_values), min_size=1, max_size=3))
    document = copy.deepcopy(base)
    for path, value in edits:
        document = _edit(document, path, value)
    text = json.dumps(document).replace(json.dumps(HUGE), "9" * 5000)
    folder = tmp_path / "hostile"
    if not folder.exists():
        folder.mkdir()
        (folder / BANK_FILE).write_bytes((valid_model / BANK_FILE).read_bytes())
    _load_outcome(folder, text)


def test_unchanged_document_loads(valid_model, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / BANK_FILE).write_bytes((valid_model / BANK_FILE).read_bytes())
    assert _load_outcome(folder, (valid_model / CONFIG_FILE).read_text()) == "loaded"


def test_deep_nesting_and_huge_config_are_refused_quickly(valid_model, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / BANK_FILE).write_bytes((valid_model / BANK_FILE).read_bytes())
    base = json.loads((valid_model / CONFIG_FILE).read_text())
    nested = json.dumps({**base, "feature_grid": "@"}).replace(
        '"@"', "[" * 900 + "]" * 900)  # parses, but too deep to be ours
    cases = ["[" * 200_000 + "]" * 200_000, '{"a":' * 200_000 + "1" + "}" * 200_000, nested]
    for text in cases:
        start = time.perf_counter()
        with pytest.raises(ModelFileError, match="nested implausibly deep"):
            (folder / CONFIG_FILE).write_text(text)
            load_state(folder)
        assert time.perf_counter() - start < 2
    with open(folder / CONFIG_FILE, "wb") as fh:
        fh.truncate(70 * 2**20)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="implausibly large"):
        load_state(folder)
    assert time.perf_counter() - start < 2
    (folder / CONFIG_FILE).write_text(json.dumps({**base, "feature_grid": "@"}).replace(
        '"@"', "[" + "7" * 5000 + ", 4]"))
    with pytest.raises(ModelFileError, match="out of range"):
        load_state(folder)
