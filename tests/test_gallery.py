"""The bug gallery: each chapter's real-world bug, replayed, trains as well as the correct code; verify FAILs."""
import json

import numpy as np
import pytest

from common.chapters import import_chapter
from conftest import ROOT

gallery = import_chapter("bench.gallery")


@pytest.fixture(scope="module")
def replayed(figures):
    return json.loads((figures / "figures" / "gallery.json").read_text())


@pytest.mark.parametrize("chapter", sorted(gallery.BUGS))
def test_the_bug_trains_its_loss_falls_as_the_correct_runs_does(replayed, chapter):
    bug, correct = replayed[chapter]["loss"], replayed[chapter]["correct loss"]
    assert len(bug) == len(correct) == 20
    assert bug[-1] < bug[0] - 0.3 and correct[-1] < correct[0] - 0.3, (bug, correct)
    assert abs(bug[-1] - correct[-1]) < 0.1, (bug[-1], correct[-1])        # the curve alone does not show it


@pytest.mark.parametrize("chapter", sorted(gallery.BUGS))
def test_verify_fails_on_the_bug(replayed, chapter):
    verdict = replayed[chapter]["verdict"]
    assert ": FAIL: " in verdict, verdict


@pytest.mark.parametrize("chapter", sorted(gallery.BUGS))
def test_the_bug_exceeds_the_tolerance_derived_for_bf16_too(replayed, chapter):
    """verify's bf16 rows allow what rounding to 16 bits can do (chapter 01's README), and no more."""
    rows = replayed[chapter]["failed rows"]
    assert any(row.startswith("bf16") for row in rows), rows


@pytest.mark.parametrize("chapter, names", [
    ("06_3d", [" wte"]),                                    # the untied embedding
    ("02_tensor_parallel", [".ln_1.", ".ln_2.", " ln_f.", "c_proj.b"]),  # a replicated tensor's gradient (a
    # LayerNorm's or a row-parallel bias's), left a partial sum
])
def test_verify_names_the_tensor_the_bug_breaks_first(replayed, chapter, names):
    culprit = replayed[chapter]["verdict"].split("exceed 1e-10: ")[1].split(", ")[0]
    assert any(name in culprit for name in names), culprit


@pytest.mark.parametrize("chapter", sorted(gallery.BUGS))
def test_the_chapter_readme_shows_the_bug_and_links_its_report(chapter):
    readme = (ROOT / chapter / "README.md").read_text()
    assert "figures/bug.png" in readme and gallery.BUGS[chapter].url in readme


@pytest.mark.parametrize("chapter, broken, spared", [
    ("03_data_parallel", (" x2:", " x4:"), " x1:"),          # one micro-batch: the first is the last
    ("04_zero", ("stage 2 x2:", "stage 3 x2:"), ("stage 1", " x1:")),   # stage 1 never accumulates in the shard
    ("05_pipeline", (" M=2", " M=4", " M=8"), " M=1"),       # 1/M = 1 (M=2 V=..., M=4 full: ...)
])
def test_verify_fails_exactly_where_the_bug_acts(replayed, chapter, broken, spared):
    rows = replayed[chapter]["failed rows"]
    assert rows and all(any(b in row for b in broken) for row in rows), rows
    assert not any(s in row for row in rows for s in ((spared,) if isinstance(spared, str) else spared)), rows


@pytest.mark.parametrize("chapter", sorted(gallery.BUGS))
def test_the_readme_quotes_the_verdict_verify_gives(replayed, chapter):
    """The counts and the first culprit: the names after it may come in another order on another CPU."""
    verdict = replayed[chapter]["verdict"]
    quoted = [line for line in (ROOT / chapter / "README.md").read_text().splitlines()
              if line.startswith(verdict.split(" FAIL: ")[0] + " FAIL: ")]
    assert len(quoted) == 1, verdict
    assert gallery.stable(quoted[0]) == gallery.stable(verdict), (quoted[0], verdict)


def test_the_verdict_names_equal_failures_in_the_order_of_their_names():
    """Two layouts that compute the same wrong value, up to their last bits, are named alphabetically, however the
    machine rounds: what verify names first is the same on every CPU."""
    checks = import_chapter("common.checks")
    for noise in (1e-13, -1e-13):
        report = checks.Report(1e-10)
        report.compare_tensors("(2,1) 1f1b:", {"wte": np.array([1.5 + noise])}, {"wte": np.array([1.0])})
        report.compare_tensors("(1,2) afab:", {"wte": np.array([1.5])}, {"wte": np.array([1.0])})
        report.compare_tensors("(1,2) afab:", {"wpe": np.array([1.2])}, {"wpe": np.array([1.0])})
        assert report.culprits([0, 1, 2]) == "(1,2) afab: wte, (1,2) afab: wpe, and 1 more"   # wte named once


def test_the_readme_quote_is_rewritten_from_the_run():
    readme = "text\n```text\n4 ranks: FAIL: 3 of 9 tensors exceed 1e-10: a, b\n```\n"
    new = "4 ranks: FAIL: 5 of 9 tensors exceed 1e-10: c, d"
    assert gallery.quote(readme, new) == f"text\n```text\n{new}\n```\n"
    assert gallery.stable(new) == ("5 of 9 tensors exceed 1e-10", "c")
