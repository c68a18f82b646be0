"""The transformers-release shims: the KV-cache argument is `cache` from 5.24, `past_key_values` before."""

from __future__ import annotations

from types import SimpleNamespace

from transformers.models.llama import modeling_llama

from graftlm.models import compat


def test_cache_arg_follows_each_signature():
    def new(hidden_states, cache=None, **kwargs): ...
    def old(hidden_states, past_key_values=None, **kwargs): ...
    def neither(hidden_states, **kwargs): ...

    assert compat.cache_arg(new) == "cache"
    assert compat.cache_arg(old) == "past_key_values"
    library = compat.cache_arg(modeling_llama.LlamaAttention.forward)
    assert library in compat.NAMES and compat.cache_arg(neither) == library
    assert compat.cache_arg(modeling_llama.LlamaForCausalLM.forward) == library


def test_given_and_output_cache():
    a, b = object(), object()
    assert compat.given_cache(a, None) is a and compat.given_cache(None, b) is b
    assert compat.given_cache(a, b) is a and compat.given_cache(None, None) is None
    assert compat.output_cache(SimpleNamespace(cache=a, past_key_values=None)) is a
    assert compat.output_cache(SimpleNamespace(past_key_values=b)) is b
    assert compat.output_cache(SimpleNamespace(logits=1)) is None
