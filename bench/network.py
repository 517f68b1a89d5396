"""What bucketing, overlap, ZeRO and placement cost on a simulated network, measured beside the alpha-beta model.

    python bench/network.py                    # all three tables, 1 round; --rounds 3 for medians
    python bench/network.py --only 03          # chapter 03's modes only

Each run trains the default model briefly under mpiexec (no evaluation on the way) and is timed from its own
metrics.jsonl: the median ms/step after the first --skip steps. "modelled" is the communication time the model
charges one step (chapter 03: from the all-reduce formula over its tensors or buckets; 04 and 06: from the
first step's ledger.json). Without a network the step time is compute plus shared-memory transfers; with one,
the model's time replaces the transfer's, so compute + modelled is what a step without any overlap takes.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter                      # noqa: E402
from common.config import GPTConfig                              # noqa: E402
from common.model import gpt_layout                              # noqa: E402
from common.network import PRESETS, collective_time              # noqa: E402
from common.notebook import mpiexec                              # noqa: E402

dp_lib = import_chapter("03_data_parallel.data_parallel")
QUICK = ["--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1000", "--check-replicas", "0"]


def run(ranks, script, args, steps, skip, rounds):
    """Median ms/step over `rounds` runs, and the first run's ledger.json (or None)."""
    times, ledger = [], None
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as out:
            cmd = [mpiexec(), "-n", str(ranks), sys.executable, script, *map(str, args), *QUICK,
                   "--max-iters", str(steps), "--out-dir", out]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr}")
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            times.append(statistics.median(r["ms"] for r in records if "ms" in r and r["step"] >= skip))
            if ledger is None and (Path(out) / "ledger.json").exists():
                ledger = json.loads((Path(out) / "ledger.json").read_text())
    return statistics.median(times), ledger


def dp_modelled_ms(mode, network, ranks=2, bucket_mb=1.0):
    """Chapter 03's all-reduce time per step on `network`: per tensor (naive) or per bucket, plus the loss."""
    layout = gpt_layout(GPTConfig(vocab_size=65))
    pieces = (list(layout.offsets.values()) if mode == "naive" else dp_lib.buckets(layout, bucket_mb * 2 ** 20, 4))
    link = PRESETS[network]
    return 1e3 * (sum(collective_time("allreduce", 4 * (b - a), ranks, link) for a, b in pieces)
                  + collective_time("allreduce", 8, ranks, link))


def chapter_03(args):
    print("\n03: one step of 2 ranks, batch 2 (one row per rank), default model\n")
    print("| network | --dp-mode | ms/step | modelled all-reduce ms | no network + modelled |")
    print("|---|---|---|---|---|")
    rows, base = {}, {}
    for network in ("off", "ethernet-10g", "ethernet-1g"):
        for mode in ("naive", "bucketed", "overlapped"):
            ms, _ = run(2, "03_data_parallel/train.py", ["--dp-mode", mode, "--batch-size", 2, "--network", network],
                        args.steps, args.skip, args.rounds)
            if network == "off":
                base[mode] = ms
                rows[f"{network} {mode}"] = {"ms": ms}
                print(f"| off | {mode} | {ms:.1f} | | |")
            else:
                modelled = dp_modelled_ms(mode, network)
                rows[f"{network} {mode}"] = {"ms": ms, "modelled": modelled, "predicted": base[mode] + modelled}
                print(f"| {network} | {mode} | {ms:.1f} | {modelled:.1f} | {base[mode] + modelled:.1f} |")
    return rows


def chapter_04(args):
    print("\n04: one step of 2 ranks, batch 4, default model; modelled: the first step's ledger\n")
    print("| run | ms/step, no network | ms/step, ethernet-10g | modelled ms | ms/step, ethernet-1g | modelled ms |")
    print("|---|---|---|---|---|---|")
    rows = {}
    cases = [("DP (03, overlapped)", "03_data_parallel/train.py", []),
             *[(f"ZeRO-{s}", "04_zero/train.py", ["--zero-stage", s]) for s in (1, 2, 3)]]
    for label, script, flags in cases:
        row = {"off": run(2, script, [*flags, "--batch-size", 4], args.steps, args.skip, args.rounds)[0]}
        for network in ("ethernet-10g", "ethernet-1g"):
            ms, ledger = run(2, script, [*flags, "--batch-size", 4, "--network", network], args.steps, args.skip,
                             args.rounds)
            modelled = (1e3 * sum(ledger["comm_seconds"].values()) if ledger else dp_modelled_ms("overlapped",
                                                                                                network))
            row[network], row[f"{network} modelled"] = ms, modelled
        rows[label] = row
        print(f"| {label} | {row['off']:.1f} | {row['ethernet-10g']:.1f} | {row['ethernet-10g modelled']:.1f} | "
              f"{row['ethernet-1g']:.1f} | {row['ethernet-1g modelled']:.1f} |")
    return rows


def chapter_06(args):
    print("\n06: 2 ranks must talk across two hosts: which axis should? ethernet-10g between simulated hosts, "
          "NVLink inside, batch 8\n")
    print("| layout | hosts | ms/step | modelled tp ms | modelled dp ms |")
    print("|---|---|---|---|---|")
    rows = {}
    cases = [("tp 2", "no network", ["--tp", 2]),
             ("tp 2", "one host (NVLink)", ["--tp", 2, "--network", "ethernet-10g", "--ranks-per-host", 2]),
             ("tp 2", "two hosts: tp across", ["--tp", 2, "--network", "ethernet-10g"]),
             ("dp 2", "no network", ["--dp", 2]),
             ("dp 2", "two hosts: dp across", ["--dp", 2, "--network", "ethernet-10g"])]
    for layout, hosts, flags in cases:
        ms, ledger = run(2, "06_3d/train.py", [*flags, "--batch-size", 8], args.steps, args.skip, args.rounds)
        seconds = ledger["ranks"][0].get("comm_seconds", {})
        tp, dp = (1e3 * sum(seconds.get(axis, {}).values()) for axis in ("tp", "dp"))
        rows[f"{layout}, {hosts}"] = {"ms": ms, "tp_modelled": tp, "dp_modelled": dp}
        modelled = f"{tp:.1f} | {dp:.1f}" if "--network" in flags else " | "
        print(f"| {layout} | {hosts} | {ms:.1f} | {modelled} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("03", "04", "06"), help="one chapter's table (default: all three)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, median taken (default: 1)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: 30)")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the median (default: 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not (ROOT / "data" / "shakespeare_char" / "meta.json").exists():
        raise SystemExit("error: data/shakespeare_char has no prepared data; run python data/prepare.py first")
    chapters = {"03": chapter_03, "04": chapter_04, "06": chapter_06}
    figures = {name: table(args) for name, table in chapters.items() if args.only in (None, name)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
