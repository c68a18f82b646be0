"""Which rules a CLI run loads with when --rules is or is not given."""

from graftlm.cli.common import cli_rules


def test_cpu_runs_default_to_the_fast_builtin_operators():
    assert cli_rules(None, None, {}) == "auto"
    assert cli_rules(None, "cpu", {}) == "auto"


def test_explicit_rules_win_and_none_means_plain_modules():
    assert cli_rules("builtin:qwen2", "cpu", {}) == "builtin:qwen2"
    assert cli_rules("my.yaml", "cuda:0", {}) == "my.yaml"
    assert cli_rules("none", "cpu", {}) is None


def test_accelerators_and_budgets_do_not_get_the_cpu_rules():
    assert cli_rules(None, "cuda:0", {}) is None
    assert cli_rules(None, "cpu", {"gpu_memory": "12GiB"}) is None
