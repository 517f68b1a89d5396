"""common/notebook.py: the diff and file map print what they should, launch runs scripts and fails loudly."""
import subprocess

import pytest

from common import notebook
from conftest import THREAD_VARS, run


def test_show_diff_prints_the_unified_diff_of_two_files_or_says_they_are_identical(tmp_path, capsys):
    old, new = tmp_path / "old.py", tmp_path / "new.py"
    old.write_text("x = 1\ny = 2\nz = 3\n")
    new.write_text("x = 1\ny = 20\nz = 3\n")
    notebook.show_diff(old, new, context=1)
    assert capsys.readouterr().out == f"--- {old}\n+++ {new}\n@@ -1,3 +1,3 @@\n x = 1\n-y = 2\n+y = 20\n z = 3\n\n"
    notebook.show_diff(old, old)
    assert capsys.readouterr().out == f"{old} and {old} are identical\n"


def test_show_diff_of_two_functions_names_each_by_its_file_and_name(capsys):
    notebook.show_diff(notebook.first_line, notebook.data_dir, context=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["--- common/notebook.py: first_line", "+++ common/notebook.py: data_dir"]
    assert "-def first_line(doc):" in lines and "+def data_dir():" in lines


def test_show_files_prints_each_file_with_its_docstrings_first_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "ch").mkdir()
    (tmp_path / "ch" / "train.py").write_text('"""Train the model.\n\nMore words."""\nraise SystemExit(1)\n')
    (tmp_path / "ch" / "a_long_name.py").write_text("x = 1\n")
    monkeypatch.setattr(notebook, "ROOT", tmp_path)
    notebook.show_files("ch")
    assert capsys.readouterr().out == "ch/a_long_name.py \nch/train.py       Train the model.\n"


def test_data_dir_returns_the_prepared_dataset_and_names_the_fix_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="python data/prepare.py"):
        notebook.data_dir()
    data = tmp_path / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (data / "meta.json").write_text("{}")
    assert notebook.data_dir() == data


def test_launch_prints_and_returns_the_output_or_stays_quiet(capsys):
    assert notebook.launch("-c", "print('hello')") == "hello\n"
    assert capsys.readouterr().out == "hello\n"
    assert notebook.launch("-c", "print('hello')", quiet=True) == "hello\n"
    assert capsys.readouterr().out == ""


def test_launch_raises_with_the_status_and_both_outputs_when_the_script_fails():
    with pytest.raises(RuntimeError, match=r"exited with status 3:\nbefore\n\nboom"):
        notebook.launch("-c", "import sys; print('before'); sys.stderr.write('boom'); sys.exit(3)", quiet=True)


def test_launch_gives_up_after_the_timeout():
    with pytest.raises(subprocess.TimeoutExpired):
        notebook.launch("-c", "import time; time.sleep(30)", timeout=1)


def test_launch_runs_ranks_under_mpiexec_and_adds_no_thread_variables(monkeypatch):
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    out = notebook.launch("-c", "import os, sys; sys.stdout.write(os.environ['PMI_RANK'] + ' ' + "
                                f"str([v for v in {THREAD_VARS!r} if v in os.environ]) + '\\n')", ranks=2)
    assert sorted(out.splitlines()) == ["0 []", "1 []"]


def test_common_notebook_imports_no_mpi():
    result = run(["-c", "import sys, common.notebook; print('mpi4py' in sys.modules)"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"
