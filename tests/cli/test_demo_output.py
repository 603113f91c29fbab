"""``edgeopt demo -o`` meets a bad output path or option as the other commands do: one line, before any work."""

from __future__ import annotations

from tests.conftest import assert_one_line_error


def test_demo_refuses_a_file_as_its_output_folder(cli, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = cli("demo", "-o", tmp_path / "taken")
    assert_one_line_error(result, "is a file: -o takes a folder here")
    assert result.code == 4 and (tmp_path / "taken").read_text() == "mine"


def test_demo_refuses_a_folder_it_cannot_create(cli, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = cli("demo", "-o", tmp_path / "taken" / "below")
    assert_one_line_error(result, "cannot create the output folder")
    assert result.code == 4


def test_demo_checks_runs_before_writing_anything(cli, tmp_path):
    result = cli("demo", "-o", tmp_path / "out", "--runs", "0")
    assert_one_line_error(result, "runs (--runs) must be at least 1")
    assert not (tmp_path / "out").exists()
