"""Prepare the tiny Shakespeare character dataset: verify the corpus, then write
train.bin/val.bin (uint16 char ids) and meta.json into the output directory."""

import argparse
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
EXPECTED_BYTES = 1_115_394
EXPECTED_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT = 30  # seconds; a stalled connection should fail, not hang
TRAIN_FRACTION = 0.9


class PrepareError(Exception):
    """A failure reported to the user as one `error:` line and exit code 2."""


def download(url):
    """Return the bytes at url, or raise PrepareError telling the user how to proceed offline."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as e:
        # URLError hides the useful part in .reason; HTTPError's str already has code and reason.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise PrepareError(
            f"could not download tiny Shakespeare from {url} ({reason}); download it yourself and run "
            "make demo CORPUS=path/to/input.txt (or: python data/prepare.py --source path/to/input.txt)"
        ) from None


def read_file(path):
    """Return the bytes of a local corpus file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PrepareError(f"source file {path} does not exist") from None
    except OSError as e:
        raise PrepareError(f"could not read {path} ({e.strerror})") from None


def mismatch(raw):
    """Describe how raw differs from the expected corpus, or return None if it is the corpus."""
    size, digest = len(raw), hashlib.sha256(raw).hexdigest()
    if size == EXPECTED_BYTES and digest == EXPECTED_SHA256:
        return None
    return (f"expected {EXPECTED_BYTES:,} bytes with sha256 {EXPECTED_SHA256}, "
            f"found {size:,} bytes with sha256 {digest}")


def write_atomic(path, write):
    """Call write(file) on a temp file beside path, then rename it over path."""
    # Same directory so os.replace is a rename, never a cross-device copy.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(source, out_dir, verify):
    """Load and check the corpus, write all outputs, and return the meta dict."""
    cached = out_dir / "input.txt"
    raw = None
    if source is not None:
        raw, origin = read_file(source), str(source)
    elif cached.is_file():
        raw, origin = read_file(cached), str(cached)
        if verify and mismatch(raw):
            print(f"{cached} is not the expected corpus; downloading a fresh copy")
            raw = None
        else:
            print(f"reusing {cached}")
    if raw is None:
        print(f"downloading {URL}")
        raw, origin = download(URL), URL
    if verify and (problem := mismatch(raw)):
        raise PrepareError(f"{origin} is not the tiny Shakespeare corpus: {problem}; "
                           "pass --no-verify to use a custom corpus")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{origin} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    n = len(text)
    split = int(n * TRAIN_FRACTION)  # same split as nanoGPT, so token counts match it
    if not 0 < split < n:
        raise PrepareError(f"corpus {origin} is empty or too short ({n} characters) "
                           "to split into train and val")

    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise PrepareError(f"corpus {origin} has {len(chars):,} distinct characters, "
                           "more than uint16 tokens can hold")
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    train, val = ids[:split], ids[split:]
    meta = {"vocab_size": len(chars), "chars": chars, "train_tokens": len(train),
            "val_tokens": len(val), "sha256": hashlib.sha256(raw).hexdigest()}

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # input.txt first so a later failure still leaves a re-run needing no network;
        # meta.json last so its presence means the token files are complete.
        write_atomic(cached, lambda f: f.write(raw))
        write_atomic(out_dir / "train.bin", train.tofile)
        write_atomic(out_dir / "val.bin", val.tofile)
        write_atomic(out_dir / "meta.json",
                     lambda f: f.write(json.dumps(meta).encode() + b"\n"))
    except OSError as e:
        raise PrepareError(f"could not write to {out_dir} ({e.strerror or e})") from None
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=None, metavar="PATH",
                        help="read the corpus from this local file instead of downloading it")
    parser.add_argument("--out-dir", type=Path, metavar="DIR",
                        default=Path(__file__).resolve().parent / "shakespeare_char",
                        help="where to write input.txt, train.bin, val.bin and meta.json")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the size and sha256 check (for custom corpora only)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.source, args.out_dir, verify=not args.no_verify)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"vocab size: {meta['vocab_size']}")
    print(f"train tokens: {meta['train_tokens']:,}, val tokens: {meta['val_tokens']:,}")
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
