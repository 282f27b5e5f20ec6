"""The ``slai-serve`` entry point answers bad input with one clear line and exit code 2."""

from slai_serve.cli import main


def test_bad_values_and_paths_are_one_line_errors(capsys):
    assert main(["sim", "--policy", "slai", "--qps", "-1", "--num-requests", "5"]) == 2
    assert main(["sim", "--policy", "slai", "--qps", "1", "--set", "nope=3"]) == 2
    assert main(["sim", "--policy", "slai", "--qps", "1", "--trace", "/nonexistent/trace.csv"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("slai-serve sim: error: ") for line in err)
    assert "qps" in err[0] and "nope" in err[1] and "/nonexistent/trace.csv" in err[2]


def test_up_passes_dtype_and_threads_to_model_executors_only():
    import argparse

    import pytest

    from executor_svc.__main__ import add_arguments as executor_arguments
    from slai_serve.launch import add_arguments, stack_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    stack = stack_from_args(parser.parse_args(["--dtype", "bfloat16", "--threads", "1",
                                               "--executor-arg=--seed", "--executor-arg=3"]))
    argv = stack.executor_argv(0)
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--threads") + 1] == "1"
    assert argv[-2:] == ["--seed", "3"]  # explicit executor flags come last, so they win
    executor = argparse.ArgumentParser()
    executor_arguments(executor)
    parsed = executor.parse_args(argv[1:])
    assert (parsed.dtype, parsed.threads, parsed.seed) == ("bfloat16", 1, 3)
    assert "--small-step-threads" not in argv  # an explicit thread count holds for every step
    default = stack_from_args(parser.parse_args([])).executor_argv(0)
    assert executor.parse_args(default[1:]).small_step_threads == "auto"  # decode steps leave a core to the stack
    fake = stack_from_args(parser.parse_args(["--fake", "--dtype", "bfloat16", "--threads", "1"]))
    assert "--dtype" not in fake.executor_argv(0) and "--threads" not in fake.executor_argv(0)
    with pytest.raises(ValueError, match="^--threads:"):
        stack_from_args(parser.parse_args(["--threads", "-1"]))
    for bad in (["--threads", "0"], ["--dtype", "int8"], ["--small-step-threads", "0"]):
        with pytest.raises(SystemExit):
            executor.parse_args(bad)
