"""Chapter 05: both pipeline schedules are valid programs, equal single core for any M, and keep their bounds."""
import json

import pytest

from common.chapters import import_chapter
from common.config import GPTConfig
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

VERIFY = "05_pipeline/verify.py"
TRAIN = "05_pipeline/train.py"
TINY = ["--n-layer", 4, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 5]
pipe = import_chapter("05_pipeline.pipeline")


@pytest.mark.parametrize("kind", ["afab", "1f1b"])
@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 4, 7, 12])
def test_schedules_run_every_micro_batch_once_without_deadlock_within_their_activation_bound(kind, P, M):
    for s in range(P):
        ops = pipe.schedule(kind, M, s, P)
        assert sorted(m for op, m in ops if op == "forward") == list(range(M))
        assert sorted(m for op, m in ops if op == "backward") == list(range(M))
        for m in range(M):
            assert ops.index(("forward", m)) < ops.index(("backward", m))
    want = [M] * P if kind == "afab" else [min(P - s, M) for s in range(P)]
    traces = pipe.simulate(kind, M, P)                                 # raises on a deadlock
    assert [pipe.peak_alive(trace) for trace in traces] == want
    span = max(trace[-1][3] for trace in traces)
    busy = [sum(end - start for op, _, start, end in trace if op in ("forward", "backward")) for trace in traces]
    assert [1 - b / span for b in busy] == pytest.approx([pipe.bubble_formula(M, P)] * P)


def test_the_simulator_finds_a_deadlock(monkeypatch):
    schedule = pipe.schedule          # stage 0 waits for a gradient stage 1 sends only after a forward it waits for
    first = {0: [("recv_bwd", 0)], 1: [("recv_fwd", 1)]}
    monkeypatch.setattr(pipe, "schedule", lambda kind, M, s, P: first[s] + schedule(kind, M, s, P))
    with pytest.raises(RuntimeError, match="deadlocks"):
        pipe.simulate("1f1b", 2, 2)


def test_layers_are_split_as_evenly_as_possible_and_the_ends_hold_the_embedding_and_head():
    assert [list(r) for r in pipe.split_layers(5, 3)] == [[0, 1], [2, 3], [4]]
    cfg = GPTConfig(n_layer=5, n_head=2, n_embd=8, block_size=4, vocab_size=7)
    names = [set(pipe.stage_layout(cfg, s, 3).shapes) for s in range(3)]
    assert {"wte", "wpe"} <= names[0] and {"wte", "ln_f.w", "ln_f.b"} <= names[2]
    assert not names[1] & {"wte", "wpe", "ln_f.w", "ln_f.b"}
    assert sum(pipe.stage_sizes(cfg, 3)) == pipe.stage_layout(cfg, 0, 1).size + 7 * 8   # wte held twice


def test_bubble_formula():
    assert pipe.bubble_formula(1, 4) == 0.75 and pipe.bubble_formula(8, 1) == 0.0
    assert pipe.bubble_formula(8, 4) == pytest.approx(3 / 11)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_verify_passes_for_both_schedules_and_every_micro_batch_count_on_n_stages(n):
    result = run_mpi(n, [VERIFY], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"P={n}: PASS:")


@pytest.mark.parametrize("patch, failing, worst", [              # dloss 1 instead of 1/M: the bug gallery's
    ("pipe.sync_tied_embedding = lambda *args: None                  # wte's halves never summed",
     "both copies of wte", "wte"),
])
def test_verify_fails_when_the_gradients_are_wrong(tmp_path, patch, failing, worst):
    patch = "pipe = import_chapter('05_pipeline.pipeline')\n" + patch
    result = run_mpi(2, [sabotaged(tmp_path, patch, "05_pipeline.verify")], timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL:" in verdict(result)
    assert any(failing in line and line.endswith("FAIL") for line in result.stdout.splitlines()), result.stdout
    if worst:                                                       # the verdict names the broken tensor first
        assert verdict(result).split("exceed 1e-10: ")[1].split(", ")[0].split()[-1] == worst, verdict(result)


@pytest.mark.parametrize("n, flags, words", [
    (3, ["--n-layer", 2], ["--n-layer 2", "--pp 3", "at most 2"]),
    (2, ["--pp", 4], ["--pp 4", "2 ranks"]),
    (2, ["--microbatches", 3], ["--batch-size 8", "--microbatches 3"]),
    (1, ["--schedule", "zigzag"], ["--schedule", "zigzag"]),
])
def test_bad_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


def test_a_2_stage_checkpoint_resumed_on_4_stages_continues_exactly_as_single_core(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, *TINY]
    straight, piped = tmp_path / "straight", tmp_path / "piped"
    assert run(["01_single_core/train.py", *common, "--max-iters", 10, "--out-dir", straight]).returncode == 0
    first = run_mpi(2, [TRAIN, *common, "--max-iters", 5, "--out-dir", piped])
    assert first.returncode == 0, first.stderr
    result = run_mpi(4, [TRAIN, *common, "--schedule", "afab", "--microbatches", 2, "--max-iters", 10,
                         "--out-dir", piped, "--resume"])
    assert result.returncode == 0, result.stderr
    assert_same_run(piped, straight, 10)
    sample = run(["01_single_core/sample.py", "--out-dir", piped, "--max-new-tokens", 20, "--start", "ANNA"])
    assert sample.returncode == 0 and sample.stdout.startswith("ANNA"), sample.stderr


@pytest.mark.parametrize("kind", ["afab", "1f1b"])
def test_the_timeline_records_every_instruction_of_every_stage(tiny_data, tmp_path, kind):
    result = run_mpi(4, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--max-iters", 2,
                         "--schedule", kind, "--microbatches", 4])
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "timeline.json").read_text())
    assert (record["pp"], record["microbatches"], len(record["ranks"])) == (4, 4, 4)
    for s, r in enumerate(record["ranks"]):
        assert [tuple(op[:2]) for op in r["trace"]] == [tuple(op) for op in pipe.schedule(kind, 4, s, 4)]
        assert all(0 <= start <= end for _, _, start, end in r["trace"])
        assert r["peak"] == (4 if kind == "afab" else 4 - s)
        assert r["p2p"] == r["p2p_formula"] and 0 <= r["bubble"] < 1
    assert "bubble per stage" in result.stdout
