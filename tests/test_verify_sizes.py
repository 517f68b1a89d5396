"""Each verify.py checks every world size it accepts, and refuses the others before any work, in one line."""
import pytest

from conftest import assert_one_error, run_mpi, verdict


def assert_refused(result, words):
    assert_one_error(result, words)
    assert result.stdout == "", result.stdout          # not one row compared: refused before any compute


@pytest.mark.parametrize("n, flags, words", [
    (3, [], ["3 ranks", "n_head=4", "[1, 2, 4]", "--n-head a multiple of 3"]),
    (3, ["--n-head", 6, "--sequence-parallel"], ["3 ranks", "block_size=8", "[1, 2]"]),
])
def test_tensor_parallel_verify_refuses_ranks_that_do_not_split_the_heads_or_sequence(n, flags, words):
    assert_refused(run_mpi(n, ["02_tensor_parallel/verify.py", *flags], timeout=60), words)


def test_pipeline_verify_refuses_more_stages_than_layers():
    assert_refused(run_mpi(9, ["05_pipeline/verify.py"], timeout=60), ["9 stages > 8 layers", "-n 1 to 8"])


@pytest.mark.parametrize("n, flags, words", [
    (4, ["--tp", 3], ["--tp 3", "n_head=4", "[1, 2, 4]"]),
    (4, ["--pp", 5], ["--pp 5", "at most 4"]),
    (4, ["--tp", 2, "--pp", 2, "--dp", 2], ["--tp 2 --pp 2 --dp 2", "4 ranks", "run mpirun -n 8"]),
    (3, ["--tp", 2], ["--tp 2", "3 ranks", "a multiple of 2"]),
    (4, ["--dp", 3], ["--dp 3", "4 ranks", "[3, 6, 9, 12"]),
])
def test_3d_verify_refuses_flags_that_fit_no_layout_of_the_ranks_and_names_the_n_that_would(n, flags, words):
    assert_refused(run_mpi(n, ["06_3d/verify.py", *flags], timeout=60), words)


@pytest.mark.parametrize("n", [3, 6])
def test_data_parallel_verify_passes_on_rank_counts_that_used_to_split_its_batch_unevenly(n):
    result = run_mpi(n, ["03_data_parallel/verify.py"], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdict(result).startswith(f"dp={n}: PASS:"), verdict(result)
