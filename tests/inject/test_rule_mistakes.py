"""Rules that put an operator where it cannot go, or on a device this process lacks, fail before
anything loads, with an error that names the rule file, the rule, the module and what is wrong."""

from __future__ import annotations

import logging

import pytest
import torch

import graftlm
from graftlm.errors import RuleError
from graftlm.weights.convert import convert
from tests.models.tiny import make_model


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_model("llama", root / "hf")
    return convert(root / "hf", root / "f32.gguf", "f32")


def _rule_file(tmp_path, name: str, cls: str, kwargs: str = "") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"- match: {{name: '{name}'}}\n  replace: {{class: {cls}{', kwargs: ' + kwargs if kwargs else ''}}}\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("name", "cls", "says"),
    [
        (
            r"^model\.norm$",
            "linear.cpu",
            "linear.cpu at 'model.norm' replaces a linear layer (nn.Linear), not LlamaRMSNorm",
        ),
        (r"^model\.embed_tokens$", "linear.torch", "not Embedding"),
        (r"^model\.layers\.0$", "linear.torch", "not LlamaDecoderLayer"),
        (
            r"q_proj$",
            "experts.cpu",
            "experts.cpu at 'model.layers.0.self_attn.q_proj' replaces routed experts",
        ),
        (r"q_proj$", "experts.torch", "replaces routed experts"),
        (r"self_attn$", "attention.mla", "LlamaConfig has no kv_lora_rank"),
    ],
)
def test_operator_on_the_wrong_module(llama_gguf, tmp_path, name, cls, says):
    with pytest.raises(RuleError) as err:
        graftlm.load(llama_gguf, rules=_rule_file(tmp_path, name, cls), progress=False)
    assert "r.yaml: rule 0 (line 1): " in str(err.value) and says in str(err.value)


def test_an_operator_error_names_the_operator_once(llama_gguf, tmp_path):
    with pytest.raises(RuleError) as err:
        graftlm.load(
            llama_gguf,
            rules=_rule_file(tmp_path, "^lm_head$", "linear.cpu", "{layout: bogus}"),
            progress=False,
        )
    assert str(err.value).count("linear.cpu at 'lm_head'") == 1 and "layout must be one of" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ("{generate_device: 'cuda:7'}", "generate_device: device 'cuda:7' is not available"),
        ("{generate_device: meta}", "generate_device: device 'meta' holds no data"),
        ("{out_device: cuda}", "out_device: device 'cuda' is not available"),
    ],
)
def test_a_device_this_process_lacks(llama_gguf, tmp_path, kwargs, says):
    cls = "linear.torch" if "out_device" in kwargs else "default"
    with pytest.raises(RuleError) as err:
        graftlm.load(llama_gguf, rules=_rule_file(tmp_path, "^lm_head$", cls, kwargs), progress=False)
    assert "r.yaml: rule 0 (line 1): " + says in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_plain_load_on_a_missing_device(llama_gguf):
    with pytest.raises(RuleError, match="the requested device: device 'cuda' is not available"):
        graftlm.load(llama_gguf, device="cuda", progress=False)


def test_rules_none_as_on_the_command_line(llama_gguf):
    llm = graftlm.load(llama_gguf, rules="none", progress=False)
    assert isinstance(llm.model.lm_head, torch.nn.Linear)


def test_rule_file_that_is_not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(RuleError, match=r"binary.yaml: cannot read rule file: not UTF-8 text"):
        graftlm.inject.load_rules(str(path))


def test_empty_rule_file_warns(tmp_path, caplog):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with caplog.at_level(logging.WARNING):
        assert len(graftlm.inject.load_rules(str(path))) == 0
    assert "empty.yaml: the rule file holds no rules" in caplog.text


def test_sparse_attention_does_not_warn_about_the_attention_rule_it_displaces(llama_gguf, caplog):
    with caplog.at_level(logging.WARNING):
        graftlm.load(llama_gguf, rules="auto", sparse=True, progress=False)
    assert "matches no module" not in caplog.text
