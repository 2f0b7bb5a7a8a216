"""What a failed model's reason names: the error at the end of its vLLM log (`telling_error`)."""

from __future__ import annotations

from router.lifecycle import telling_error

USAGE = [
    "(APIServer pid=17) INFO 12-03 16:33:01 [utils.py:253] non-default args: {'model_tag': '/m'}",
    "usage: api_server.py [-h] [--headless] [--api-server-count API_SERVER_COUNT]",
    *["                     [--max-num-seqs MAX_NUM_SEQS]"] * 60,
    "                     [model_tag]",
]


def test_argparse_refusing_the_command_line_is_the_reason() -> None:
    """QA: a model with `vllm_args: [--bogus-flag]` failed with only "exited 4 times before it was
    ready; gave up": argparse's ``prog: error:`` line, lowercase, after the usage text (more than
    the 50 lines kept), matched neither a traceback nor "Error"."""
    lines = [*USAGE, "api_server.py: error: unrecognized arguments: --bogus-flag"][-50:]
    assert telling_error(lines) == "api_server.py: error: unrecognized arguments: --bogus-flag"


def test_argparse_error_of_the_vllm_command() -> None:
    lines = ["usage: vllm serve [model_tag] [options]", "vllm serve: error: argument --max-model-len: invalid int value: 'x'"]
    assert telling_error(lines) == "vllm serve: error: argument --max-model-len: invalid int value: 'x'"


def test_the_last_error_wins_between_a_traceback_and_a_usage_error() -> None:
    earlier_usage = ["api_server.py: error: unrecognized arguments: --bogus-flag", "Traceback (most recent call last):",
                     '  File "x.py", line 1, in <module>', "ValueError: max_model_len 9999 is too large"]
    assert telling_error(earlier_usage) == "ValueError: max_model_len 9999 is too large"


def test_log_lines_that_only_mention_error_are_not_usage_errors() -> None:
    lines = ["(APIServer pid=3) INFO 12-03 [api_server.py:1] route: error: none", "INFO:     Started server process [3]"]
    assert telling_error(lines) == ""

