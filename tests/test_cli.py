"""The command line's own errors (unknown options, bad choices, missing arguments) are one featx line, exit 2."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from featx.cli import main


@pytest.mark.parametrize("args, words", [
    (["fewshot", "features", "--head", "knn"], "'knn' is not one of 'logreg', 'svm', 'mlp'"),
    (["fit", "svm"], "Missing argument 'FEATURES'"),
    (["fit", "knn", "features"], "No such command 'knn'"),
    (["extract", "data", "--no-such-option"], "No such option '--no-such-option'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors_are_one_line(args, words):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featx: error: ") and words in lines[0], r.stderr
    assert "--help" in lines[0]


def test_help_and_version_still_print_and_exit_zero():
    r = CliRunner().invoke(main, ["fit", "--help"])
    assert r.exit_code == 0 and "Usage:" in r.stdout and "svm" in r.stdout
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "version" in r.stdout


def test_no_command_prints_the_help():
    r = CliRunner().invoke(main, [])
    assert r.exit_code == 2 and "Commands:" in r.stderr and "extract" in r.stderr
