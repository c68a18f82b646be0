"""Offline long-context evaluation (`graftlm eval-long`): InfiniteBench's passkey, number_string
and kv_retrieval and RULER's single needle in a haystack, generated from a seed, fitted to a length
in the model's own tokens, and run under dense and block-sparse attention settings."""

from graftlm.longctx.eval import Setting, SettingReport, evaluate, format_table, parse_setting
from graftlm.longctx.score import score
from graftlm.longctx.tasks import TASKS, PromptFormat, Sample, build_sample, build_samples, get_task

__all__ = [
    "TASKS",
    "PromptFormat",
    "Sample",
    "Setting",
    "SettingReport",
    "build_sample",
    "build_samples",
    "evaluate",
    "format_table",
    "get_task",
    "parse_setting",
    "score",
]
