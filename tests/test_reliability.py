"""Issue #14: crash-safe append-only files, one writer per folder, safetensors-only loading, range checks,
prompt truncation."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.jsonl import append_jsonl, read_jsonl, scan_jsonl

RECORDS = [{"key": "a", "prompt": "a red star", "seed": 0}, {"key": "b", "nested": {"x": [1, 2]}, "seed": 1},
           {"key": "c", "prompt": "caf\u00e9 \"quoted\" {braces}\n", "seed": 2}]


# -- JSON lines ---------------------------------------------------------------------------------------------------
def test_jsonl_torn_at_every_byte(tmp_path):
    """Cut a 3-record file at every byte: reading keeps exactly the complete records, appending repairs the
    tail first, and the new record is never joined to a torn one."""
    path = tmp_path / "x.jsonl"
    append_jsonl(path, RECORDS)
    data = path.read_bytes()
    ends = [i for i, b in enumerate(data) if b == ord("\n")]  # record i's JSON ends at ends[i]
    assert len(ends) == 3
    new = {"key": "new", "seed": 9}
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        complete = [r for r, e in zip(RECORDS, ends) if cut >= e]  # JSON complete (newline optional)
        assert read_jsonl(path) == complete, cut
        append_jsonl(path, [new])
        text = path.read_bytes()
        assert text.endswith(b"\n")
        scan = scan_jsonl(path)
        assert scan.clean, (cut, scan.bad_lines)
        assert scan.records == complete + [new], cut


def test_jsonl_reports_bad_lines_and_recovers_a_joined_record(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    full = json.dumps(RECORDS[1], sort_keys=True)
    # An older writer appended a record onto a torn one: '{"key": "a", "pro{...full record...}'
    path.write_text(json.dumps(RECORDS[0])[:15] + full + "\nnot json\n[1, 2]\n" + json.dumps(RECORDS[2]) + "\n{\"torn")
    scan = scan_jsonl(path)
    assert scan.records == [RECORDS[1], RECORDS[2]]
    assert scan.recovered == 1 and scan.torn_tail
    assert [n for n, _ in scan.bad_lines] == [1, 2, 3, 5]
    with caplog.at_level(logging.WARNING, logger="erasekit"):
        assert read_jsonl(path) == [RECORDS[1], RECORDS[2]]
    assert "torn last line" in caplog.text and "line 2" in caplog.text
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_jsonl_complete_tail_without_newline_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(RECORDS[0]))
    append_jsonl(path, [RECORDS[1]])
    assert read_jsonl(path) == RECORDS[:2]
    assert path.read_text().count("\n") == 2


# -- the image store after a crash ------------------------------------------------------------------------------------
def _save(out, start, n=2, save=None):
    from erasekit.image_store import save_images

    images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(start, start + n)])
    return (save or save_images)(images, out, [{"prompt": "p", "seed": i} for i in range(start, start + n)],
                                 grid=False)


def test_torn_index_line_is_dropped_and_never_joined(tmp_path):
    """The issue's scenario: the last index line is cut mid-record, then the next run appends."""
    from erasekit.folder_lock import hold_folder
    from erasekit.image_store import INDEX_FILE, orphan_images, read_index, save_images

    _save(tmp_path, 0)
    index = tmp_path / INDEX_FILE
    data = index.read_bytes()
    index.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 20])  # the 2nd row torn after 19 bytes
    done = read_index(tmp_path)
    assert [r["seed"] for r in done.values()] == [0]
    [orphan] = orphan_images(tmp_path)
    assert orphan.name.startswith("p_seed1_")
    assert orphan.exists()  # not deleted without the folder's lock: another process may be writing it
    _save(tmp_path, 1)  # regenerates seed 1 (same file name) and adds seed 2
    lines = index.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    done = read_index(tmp_path)
    assert sorted(r["seed"] for r in done.values()) == [0, 1, 2]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(r["path"] for r in done.values())  # one file per image, no orphans
    # An unlisted PNG (an image no run asks for again, or the user's) is never deleted (#18); a dead process's
    # temp file is, when a run takes the folder's lock.
    stale = tmp_path / "old_seed7_0123abcd.png"
    stale.write_bytes(orphan.read_bytes() if orphan.exists() else b"x")
    other = tmp_path / "mine.png"  # not named like the store's images: never touched
    other.write_bytes(b"x")
    (tmp_path / ".p_seed9_00000000.png.999999999.tmp").write_bytes(b"x")  # a dead process's temp file
    read_index(tmp_path)
    assert stale.exists()
    with hold_folder(tmp_path):
        assert len(read_index(tmp_path)) == 3
    assert stale.exists() and other.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_images_writes_pngs_before_rows(tmp_path, monkeypatch):
    """A crash between the PNGs and the rows leaves orphans, never a row without its PNG."""
    from erasekit import image_store

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_store, "append_jsonl", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 0, 3, image_store.save_images)
    assert len(list(tmp_path.glob("*.png"))) == 3 and image_store.read_index(tmp_path) == {}
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_leaves_old_file_or_new(tmp_path):
    from erasekit.atomic import atomic_write, atomic_write_text

    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def half(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


# -- one writer per folder ----------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from erasekit.folder_lock import hold_folder
with hold_folder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(folder, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_folder_lock_second_writer_fails_then_waits(tmp_path):
    from erasekit.folder_lock import LOCK_FILE, hold_folder, is_held, lock_holder

    proc = _start_holder(tmp_path, 1.5)
    try:
        assert lock_holder(tmp_path) == proc.pid
        t = time.monotonic()
        with pytest.raises(ErasekitError, match=f"another erasekit process is writing to .* \\(pid {proc.pid}\\); "
                                                "wait for it or choose another --out"):
            with hold_folder(tmp_path):
                pass
        assert time.monotonic() - t < 1.0  # wait_s=0: fails at once
        with hold_folder(tmp_path, wait_s=30):  # waits for the holder to let go (after its 1.5 s)
            assert time.monotonic() - t > 1.0
            assert is_held(tmp_path) and lock_holder(tmp_path) == os.getpid()
            with hold_folder(tmp_path):  # re-entrant in one process
                assert is_held(tmp_path)
            assert is_held(tmp_path)
        assert not is_held(tmp_path)
        assert (tmp_path / LOCK_FILE).exists()  # the file stays; only the flock is released
    finally:
        proc.kill()
        proc.wait()


def test_folder_lock_freed_when_the_holder_is_killed(tmp_path):
    from erasekit.folder_lock import hold_folder

    proc = _start_holder(tmp_path / "out", 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with hold_folder(tmp_path / "out"):  # no stale lock
        pass
    with pytest.raises(ErasekitError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        with hold_folder(tmp_path / "file"):
            pass


# -- safetensors only -----------------------------------------------------------------------------------------------
def test_load_safetensors_errors_are_one_line(tmp_path):
    from safetensors.torch import save_file

    from erasekit.safe_load import load_safetensors

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2)}, str(path))
    assert torch.equal(load_safetensors(path, "x")["a"], torch.arange(12.0).reshape(3, 4))
    data = path.read_bytes()
    for cut in range(0, len(data), 7):  # truncated anywhere
        path.write_bytes(data[:cut])
        with pytest.raises(ErasekitError, match=f"corrupt edit tensors {path}") as info:
            load_safetensors(path, "edit tensors")
        assert "\n" not in str(info.value)
    torch.save({"a": torch.ones(2)}, path)  # a pickle under a safetensors name
    with pytest.raises(ErasekitError, match="torch.save pickle"):
        load_safetensors(path, "x")
    torch.save({"a": torch.ones(2)}, tmp_path / "t.bin")
    with pytest.raises(ErasekitError, match="is a pickle file"):
        load_safetensors(tmp_path / "t.bin", "x")
    with pytest.raises(ErasekitError, match="missing x"):
        load_safetensors(tmp_path / "absent.safetensors", "x")
    with pytest.raises(ErasekitError, match="not a file"):
        load_safetensors(tmp_path, "x")


def test_edit_and_embedding_loaders_refuse_bad_files(tmp_path):
    from erasekit.attacks.textual_inversion import LearnedEmbedding
    from erasekit.erasers.base import EDIT_JSON, EDIT_TENSORS, load_edit

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / EDIT_JSON).write_text(json.dumps({"format": 1, "kind": "weight_edit", "method": "uce",
                                                        "base_fingerprint": "f", "tensors": {"unet.x": [2]}}))
    torch.save({"unet.x": torch.ones(2)}, tmp_path / "e" / EDIT_TENSORS)
    with pytest.raises(ErasekitError, match="corrupt edit tensors"):
        load_edit(tmp_path / "e")
    (tmp_path / "e" / EDIT_JSON).write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ErasekitError, match="corrupt"):
        load_edit(tmp_path / "e")
    (tmp_path / "e" / EDIT_JSON).write_text(json.dumps({"format": 1, "kind": "weight_edit", "method": "uce",
                                                        "base_fingerprint": "f", "tensors": ["unet.x"]}))
    from safetensors.torch import save_file

    save_file({"unet.x": torch.ones(2)}, str(tmp_path / "e" / EDIT_TENSORS))
    with pytest.raises(ErasekitError, match="does not hold the tensors"):
        load_edit(tmp_path / "e")

    learned = LearnedEmbedding("<star-ti>", torch.randn(2, 8), budget={"steps": 3})
    folder = tmp_path / "ti"
    path = learned.save(folder)
    assert torch.equal(LearnedEmbedding.load(folder).vectors, learned.vectors)
    assert not list(folder.glob(".*.tmp"))
    (folder / "textual_inversion.json").write_text("{torn")
    with pytest.raises(ErasekitError, match="corrupt .*textual_inversion.json"):
        LearnedEmbedding.load(folder)
    (folder / "textual_inversion.json").unlink()
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ErasekitError, match="corrupt learned-embedding file .*truncated"):
        LearnedEmbedding.load(folder)
    from safetensors.torch import save_file

    save_file({"<t>": torch.tensor([1.0, float("nan")])}, str(path))
    with pytest.raises(ErasekitError, match="NaN or infinite"):
        LearnedEmbedding.load(path)


@pytest.fixture(scope="module")
def pickled_sd1(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickled") / "pipe"
    tiny_sd1.save_pretrained(folder, safe_serialization=False)
    return folder


def test_pickle_only_folder_is_refused(pickled_sd1):
    from erasekit.models import load_pipeline

    pickles = sorted(str(p.relative_to(pickled_sd1)) for p in pickled_sd1.glob("*/*.bin"))
    assert pickles  # diffusers wrote .bin for the UNet and the VAE
    with pytest.raises(ErasekitError) as info:
        load_pipeline(str(pickled_sd1))
    msg = str(info.value)
    assert "\n" not in msg and "pickled weights only" in msg and "--allow-pickle" in msg
    assert all(p in msg for p in pickles)
    pipe = load_pipeline(str(pickled_sd1), allow_pickle=True)  # trusted: loads
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_safetensors_requested_from_diffusers(pickled_sd1, monkeypatch, tmp_path):
    """Even past erasekit's own check, diffusers is asked for safetensors only; hub ids too."""
    from erasekit.models import loading

    seen = []

    def fake(source, **kwargs):
        seen.append(kwargs.get("use_safetensors"))
        raise OSError("Error no file named diffusion_pytorch_model.safetensors found in directory x")

    monkeypatch.setattr(loading, "_from_pretrained", fake)
    with pytest.raises(ErasekitError, match="no safetensors weights .*--allow-pickle"):
        loading.load_pipeline("someone/pickled-model")
    assert seen == [True]
    monkeypatch.setattr(loading, "check_pipeline_folder", lambda folder, allow_pickle=False: None)
    with pytest.raises(ErasekitError, match="cannot load the pipeline"):
        loading.load_pipeline(str(pickled_sd1))
    assert seen[-1] is True


# -- range checks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999", float("nan"), float("inf"), -float("inf"), 10**400,
                                 "x", None, True])
def test_finite_refuses(bad):
    from erasekit.checks import finite

    with pytest.raises(ErasekitError, match="^--guidance=.*: must be a (finite )?number$"):
        finite("--guidance", bad)


def test_checks_bounds():
    from erasekit.checks import finite, integer, positive, probability

    assert finite("--guidance", "7.5", low=0) == 7.5
    with pytest.raises(ErasekitError, match="^--guidance=-1: must be >= 0$"):
        finite("--guidance", -1, low=0)
    with pytest.raises(ErasekitError, match="^lr=0: must be > 0$"):
        positive("lr", 0)
    with pytest.raises(ErasekitError, match="^threshold=1.0: must be < 1$"):
        probability("threshold", 1.0, high_open=True)
    assert integer("-n", "12") == 12 and integer("-n", 3.0) == 3 and integer("-n", "1e3") == 1000
    for bad in ("2.5", 2.5, "nan", float("inf"), True, None, "x"):
        with pytest.raises(ErasekitError, match="^-n=.*: must be an integer$"):
            integer("-n", bad)
    with pytest.raises(ErasekitError, match="^-n=0: must be >= 1$"):
        integer("-n", 0, low=1)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "Infinity", " NaN ", "1e999", float("nan"), float("inf"),
                                 -float("inf"), 10**400])
def test_settings_refuse_non_finite(raw):
    from dataclasses import dataclass

    try:
        from erasekit.settings import Settings
    except ImportError:  # before the settings module moved
        from erasekit.erasers.settings import Settings

    @dataclass
    class S(Settings):
        lam: float = 0.1

    with pytest.raises(ErasekitError, match="finite"):
        S.parse({"lam": raw})
    assert S.parse({"lam": "1e-3"}) == {"lam": 1e-3}


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1.0, "x"])
def test_textual_inversion_config_checks_lr(lr):
    from erasekit.attacks.textual_inversion import TextualInversionConfig

    with pytest.raises(ErasekitError, match="lr"):
        TextualInversionConfig(lr=lr).validate()
    with pytest.raises(ErasekitError, match="steps"):
        TextualInversionConfig(steps=float("inf")).validate()
    TextualInversionConfig().validate()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.1, 1.0, "high"])
def test_toy_detector_threshold_checked(threshold):
    from erasekit.detectors.toy import ToyConceptDetector

    with pytest.raises(ErasekitError, match="threshold"):
        ToyConceptDetector("star", threshold=threshold)


# -- truncation -----------------------------------------------------------------------------------------------------
def test_truncated_prompts_and_one_warning(toy_random, tiny_sd1, caplog):
    from erasekit.models.prompts import (reset_truncation_warning, token_counts, truncated_prompts,
                                         warn_truncated)

    for pipe in (toy_random, tiny_sd1):
        limit = pipe.tokenizer.model_max_length
        words = [n - 2 for n in (3, limit, limit + 1, 5 * limit)]  # one token per word, + 2 special tokens
        prompts = [" ".join(["star"] * w) for w in words]
        counts = token_counts(pipe, prompts)
        assert counts == [w + 2 for w in words]
        assert truncated_prompts(pipe, prompts) == [False, False, True, True]
        # The pipeline itself sees exactly the window: what is cut never reaches the UNet.
        from erasekit.models.prompts import tokenize

        assert tokenize(pipe, prompts).shape[1] == limit
    reset_truncation_warning()
    with caplog.at_level(logging.WARNING, logger="erasekit"):
        assert not warn_truncated(["a", "b"], [False, False])
        assert warn_truncated(["a", "long one", "long one"], [False, True, True], 24)
        assert not warn_truncated(["long two"], [True])  # once per run
    assert caplog.text.count("longer than the text encoder's window of 24 tokens") == 1
    assert "2 of 3 prompts (1 distinct)" in caplog.text
    reset_truncation_warning()
