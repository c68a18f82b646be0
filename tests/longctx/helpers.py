"""Shared pieces of the long-context tests: tokenizers, prompt formats, the needle's place."""

from __future__ import annotations

import pytest

from graftlm.engine.generate import Engine
from graftlm.longctx.tasks import PromptFormat, Sample
from tests.engine.helpers import ScriptedLM

# Where each task's haystack starts and ends in its text (the instructions and question around it).
HAYSTACK_BOUNDS = {
    "passkey": ("the important information there.\n\n", "\n\nWhat is the pass key?"),
    "number_string": ("the important information there.\n\n", "\n\nWhat is the sequence of digits?"),
    "kv_retrieval": ("JSON data:\n", "\n\nKey: "),
    "niah": ("about the numbers afterwards.\n", "\nWhat is the special magic number"),
}
NEEDLES = {  # the needle's text, from the answer (niah: from the answer and the question's word)
    "passkey": "The pass key is {a}. Remember it. {a} is the pass key.",
    "number_string": "The sequence of digits is {a}. Remember it. {a} is the sequence of digits.",
    "niah": "One of the special magic numbers for {w} is: {a}.",
}


def sparse_module():
    """graftlm.ops.attention.sparse, or a skip while the operator is not built."""
    module = pytest.importorskip("graftlm.ops.attention.sparse")
    if not hasattr(module, "configure_sparse"):
        pytest.skip("block-sparse attention has no configure_sparse yet")
    return module


def chat_format(tok, answer_prefix: bool = True) -> PromptFormat:
    """The tokenizer's chat template through the engine's own encode_chat."""
    engine = Engine(ScriptedLM([], 0, vocab_size=len(tok)), tok)
    return PromptFormat(tok, engine.encode_chat, answer_prefix)


def needle_position(sample: Sample) -> float:
    """Where the needle starts, as a fraction of the haystack's characters around it, found in the
    sample's text itself (kv_retrieval: where the queried key's pair starts in the JSON)."""
    head, tail = HAYSTACK_BOUNDS[sample.task]
    start = sample.text.index(head) + len(head)
    haystack = sample.text[start : sample.text.rindex(tail)]
    if sample.task == "kv_retrieval":
        key = sample.text.rsplit("Key: ", 1)[1].split('"')[1]
        return haystack.index(f'"{key}"') / len(haystack)
    word = sample.text.rsplit("magic number for ", 1)[-1].split()[0]
    needle = NEEDLES[sample.task].format(a=sample.answers[0], w=word)
    assert haystack.count(needle) == 1
    return haystack.index(needle) / (len(haystack) - len(needle))
