"""Tests for data/prepare.py on small generated corpora (never the network)."""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "prepare.py"

# data/ is not a package, so load the script by path.
_spec = importlib.util.spec_from_file_location("prepare", SCRIPT)
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT.relative_to(REPO)), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def decode(path, chars):
    ids = np.fromfile(path, dtype=np.uint16)
    return "".join(chars[i] for i in ids)


@pytest.fixture
def corpus(tmp_path):
    # Varied lines with punctuation and newlines, long enough that 90% is not a round cut.
    lines = [f"Speaker {i % 7}: to be, or not to be; {i * 37 % 101}!" for i in range(53)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\nQ", encoding="utf-8")
    return path


@pytest.fixture
def no_network(monkeypatch):
    def urlopen(*args, **kwargs):
        raise AssertionError("prepare.py tried to download")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_no_verify_writes_splits_that_decode_to_first_90_and_last_10_percent(corpus, tmp_path):
    out = tmp_path / "out"
    result = run_script("--source", corpus, "--out-dir", out, "--no-verify")
    assert result.returncode == 0, result.stderr

    text = corpus.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chars"] == sorted(set(text))
    assert meta["vocab_size"] == len(meta["chars"])
    assert (meta["train_tokens"], meta["val_tokens"]) == (split, len(text) - split)
    assert (out / "train.bin").stat().st_size == 2 * split  # two bytes per uint16 token
    assert decode(out / "train.bin", meta["chars"]) == text[:split]
    assert decode(out / "val.bin", meta["chars"]) == text[split:]
    assert (out / "input.txt").read_bytes() == corpus.read_bytes()
    assert "vocab size" in result.stdout and str(out) in result.stdout


def test_default_verification_rejects_wrong_corpus_with_one_error_line_and_no_outputs(corpus, tmp_path):
    out = tmp_path / "out"
    result = run_script("--source", corpus, "--out-dir", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "1,115,394" in result.stderr and "--no-verify" in result.stderr
    assert not out.exists()  # a rejected corpus leaves nothing behind, not even input.txt


def test_missing_source_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "nope" / "input.txt"
    result = run_script("--source", missing, "--out-dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_corpus_is_an_error_even_without_verification(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert prepare.main(["--source", str(empty), "--out-dir", str(tmp_path / "out"), "--no-verify"]) == 2
    assert "empty" in capsys.readouterr().err


def test_rerun_reuses_existing_input_txt_without_downloading(corpus, tmp_path, capsys, no_network):
    out = tmp_path / "out"
    assert prepare.main(["--source", str(corpus), "--out-dir", str(out), "--no-verify"]) == 0
    first = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    corpus.unlink()  # the second run must not need the original source

    assert prepare.main(["--out-dir", str(out), "--no-verify"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in first} == first


def test_download_failure_exits_2_and_names_both_ways_to_use_a_local_copy(tmp_path, capsys, monkeypatch):
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)

    assert prepare.main(["--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download") and err.count("\n") == 1
    assert prepare.URL in err and "no network in tests" in err
    assert "make demo CORPUS=path/to/input.txt" in err and "python data/prepare.py --source" in err
    assert not (tmp_path / "out").exists()


def test_real_corpus_verifies_matches_nanogpt_counts_and_is_reused_offline(tmp_path, capsys,
                                                                           no_network):
    corpus = os.environ.get("CORPUS")
    if not corpus:
        pytest.skip("set CORPUS=/path/to/tinyshakespeare/input.txt to check the real corpus")
    out = tmp_path / "out"
    assert prepare.main(["--source", corpus, "--out-dir", str(out)]) == 0, capsys.readouterr().err

    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert meta["sha256"] == prepare.EXPECTED_SHA256
    assert np.fromfile(out / "val.bin", dtype=np.uint16).size == 111_540

    # The default run (verification on, no --source) must accept the cached copy.
    capsys.readouterr()
    assert prepare.main(["--out-dir", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
