"""Context parallelism measured: each cp rank's attention work under the zig-zag and the contiguous split, a long
context's activations per rank against cp, and ring attention's traffic and memory beside Ulysses's, each beside
its formula.

    python bench/context.py                          # the CPU config at context 1024 (about 1 minute on 2 cores)
    python bench/context.py --block-size 256         # shorter, faster

Every number comes from real runs of 06_3d/train.py (one step, then its ledger.json): the score entries each
rank's ring computed (context_parallel.Ring.work), the bytes its caches held at their peak, the bytes it passed
to the cp communicator, and its resident peak. Four ranks on two cores oversubscribe the machine, which does not
change what is counted; the step times printed for cp = 4 are this machine's, not a cluster's.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402
from common.metrics import read_metrics  # noqa: E402
from common.notebook import launch  # noqa: E402

cp_lib = import_chapter("06_3d.context_parallel")
ONE_STEP = ["--max-iters", 2, "--eval-interval", 1000, "--eval-iters", 1, "--log-interval", 1000,
            "--microbatches", 1]


def run(work, cp, split, block_size, batch_size, recompute="none", mode="ring"):
    """One short run on cp ranks (and nothing else split): its ledger's ranks, sorted by cp rank, and ms/step."""
    out = work / f"cp{cp}_{split}_{block_size}_{recompute}_{mode}"
    launch("06_3d/train.py", *ONE_STEP, "--cp", cp, "--cp-split", split, "--cp-mode", mode, "--block-size",
           block_size, "--batch-size", batch_size, "--recompute", recompute, "--out-dir", out, ranks=cp, quiet=True)
    ranks = json.loads((out / "ledger.json").read_text())["ranks"]
    ms = [r["ms"] for r in read_metrics(out / "metrics.jsonl") if "ms" in r]
    return sorted(ranks, key=lambda r: r["cp"]), ms[-1]


def balance(work, cp=4, block_size=256, batch_size=4):
    """{split: [attention work of each cp rank]} of one training step, measured, beside the formula's."""
    found = {}
    for split in ("zigzag", "contiguous"):
        ranks, _ = run(work, cp, split, block_size, batch_size)
        found[split] = [r["attention_work"] for r in ranks]
    return found


def long_context(work, block_size=1024, batch_size=4, sizes=(1, 2, 4)):
    """{(cp, recompute): (activations per rank measured, formula, resident peak, ms/step)} at a long context."""
    found = {}
    for cp in sizes:
        for recompute in ("none", "selective") if cp == 1 else ("none",):
            ranks, ms = run(work, cp, "zigzag", block_size, batch_size, recompute)
            found[cp, recompute] = (max(r["activations"] for r in ranks), max(r["activations_formula"] for r in ranks),
                                    max(r["peak_rss"] for r in ranks), ms)
    return found


def ring_or_ulysses(work, block_size=1024, batch_size=4, sizes=(2, 4)):
    """{(cp, mode, recompute): (bytes a rank passed to the cp communicator in one step, the formula's, of them what
    left the rank, activations held, the formula's, ms/step)}, the fullest rank's, for ring attention and for
    Ulysses keeping its scores or recomputing them."""
    found = {}
    for cp in sizes:
        for mode, recompute in (("ring", "none"), ("ulysses", "none"), ("ulysses", "selective")):
            ranks, ms = run(work, cp, "zigzag", block_size, batch_size, recompute, mode)
            passed = max(sum(r["comm"]["cp"].values()) for r in ranks)
            left = passed // 2 if mode == "ring" else passed * (cp - 1) // cp   # isend + irecv; all-to-all's own block
            found[cp, mode, recompute] = (passed, max(sum(r["comm_formula"]["cp"].values()) for r in ranks), left,
                                          max(r["activations"] for r in ranks),
                                          max(r["activations_formula"] for r in ranks), ms)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=1024, help="the long context (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (default: 4)")
    args = parser.parse_args(argv)
    if not (ROOT / "data" / "shakespeare_char" / "meta.json").exists():
        raise SystemExit("error: data/shakespeare_char has no prepared data; run python data/prepare.py first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        found = balance(work)
        print("\nattention work per cp rank, one step, cp = 4, context 256 (score entries per row and head):\n")
        print("| split | rank 0 | rank 1 | rank 2 | rank 3 | max / min |")
        print("|---|---|---|---|---|---|")
        for split, got in found.items():
            print(f"| {split} | " + " | ".join(f"{w:,}" for w in got) + f" | {max(got) / min(got):.2f} |")
        rows = long_context(work, args.block_size, args.batch_size)
        modes = ring_or_ulysses(work, args.block_size, args.batch_size)
    print(f"\nthe default model at context {args.block_size}, batch {args.batch_size}, float32: the fullest rank\n")
    print("| cp | --recompute | activations held (MiB) | formula (MiB) | vs cp 1 | resident peak (MiB) | ms/step |")
    print("|---|---|---|---|---|---|---|")
    base = rows[1, "selective"][0]
    for (cp, recompute), (held, formula, rss, ms) in rows.items():
        print(f"| {cp} | {recompute} | {held / 2 ** 20:.1f} | {formula / 2 ** 20:.1f} | {held / base:.2f} | "
              f"{rss / 2 ** 20:.0f} | {ms:.0f} |")
    print(f"\nring attention or Ulysses at context {args.block_size}, batch {args.batch_size}: the fullest rank, one "
          "step\n")
    print("| cp | attention | --recompute | cp MB passed (formula) | MB sent to other ranks | activations held, MiB "
          "(formula) | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for (cp, mode, recompute), (passed, formula, left, held, want, ms) in modes.items():
        print(f"| {cp} | {mode} | {recompute} | {passed / 1e6:.1f} ({formula / 1e6:.1f}) | {left / 1e6:.1f} | "
              f"{held / 2 ** 20:.1f} ({want / 2 ** 20:.1f}) | {ms:.0f} |")


if __name__ == "__main__":
    main()
