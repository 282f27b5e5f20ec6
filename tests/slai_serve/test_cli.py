"""The ``slai-serve`` entry point answers bad input with one clear line and exit code 2."""

from slai_serve.cli import main


def test_bad_values_and_paths_are_one_line_errors(capsys):
    assert main(["sim", "--policy", "slai", "--qps", "-1", "--num-requests", "5"]) == 2
    assert main(["sim", "--policy", "slai", "--qps", "1", "--set", "nope=3"]) == 2
    assert main(["sim", "--policy", "slai", "--qps", "1", "--trace", "/nonexistent/trace.csv"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("slai-serve sim: error: ") for line in err)
    assert "qps" in err[0] and "nope" in err[1] and "/nonexistent/trace.csv" in err[2]
