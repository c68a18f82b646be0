"""Errors that reach the user. Each names the file, tensor or rule it is about.

The CLI prints a GraftError's message without a traceback; anything else is a bug.
"""


class GraftError(Exception):
    """Base class for every error graftlm raises on purpose."""


class GGUFFormatError(GraftError):
    """The file is not a readable GGUF (bad magic, truncated, inconsistent offsets or counts)."""


class UnsupportedQuantType(GraftError):
    """A tensor is stored in a ggml type graftlm cannot dequantize."""


class UnsupportedArchitecture(GraftError):
    """The model's architecture has no config mapping or name table."""


class WeightMappingError(GraftError):
    """A tensor is missing, left unmapped, or has the wrong shape."""


class RuleError(GraftError):
    """An injection rule is invalid; the message names the file, the rule's index and its line."""
