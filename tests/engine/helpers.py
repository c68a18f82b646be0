"""Tiny models and tokenizers for engine and CLI tests, all built locally from code."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a little model that liked to generate text.",
    "hello world, hello there, the quick brown fox jumps over the lazy dog",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
BOS, EOS = 1, 2


def byte_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): characters outside the corpus split into single-byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level with SentencePiece's Metaspace: decoding drops the first token's leading space."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 256) -> LlamaForCausalLM:
    """A random 2-layer Llama, hidden 64, float32, in eval mode."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class CountingCache:
    """A stand-in for an injected operator's cache: it only counts the tokens it has seen."""

    def __init__(self) -> None:
        self.length = 0


class ScriptedLM(torch.nn.Module):
    """Behaves like an HF causal LM whose next token after the prompt is always script[k].

    It provides `make_cache()`, checks that position ids continue the cache, and records
    how many tokens each call carried in `calls`.
    """

    def __init__(
        self, script: list[int], prompt_len: int, vocab_size: int, max_positions: int = 1024
    ) -> None:
        super().__init__()
        self.script = script
        self.prompt_len = prompt_len
        self.config = SimpleNamespace(
            vocab_size=vocab_size, max_position_embeddings=max_positions, eos_token_id=EOS
        )
        self.calls: list[int] = []

    def make_cache(self) -> CountingCache:
        return CountingCache()

    def forward(self, input_ids, position_ids, past_key_values, use_cache=True):  # noqa: ANN001, ANN201
        batch, length = input_ids.shape
        expected = torch.arange(past_key_values.length, past_key_values.length + length).expand(batch, length)
        assert torch.equal(position_ids.cpu(), expected), (position_ids, past_key_values.length)
        past_key_values.length += length
        self.calls.append(length)
        logits = torch.zeros(batch, length, self.config.vocab_size)
        for t, pos in enumerate(position_ids[0].tolist()):
            k = pos + 1 - self.prompt_len
            if 0 <= k < len(self.script):
                logits[:, t, self.script[k]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)
