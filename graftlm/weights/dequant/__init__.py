"""GGUF dequantization in torch, bit-identical to gguf-py's `gguf.quants.dequantize`.

`dequantize(data, qtype, shape, dtype, name=...)` turns a tensor's stored bytes into a torch tensor;
`SUPPORTED_TYPES` and `is_supported` say which ggml types it can decode.
"""

from .core import SUPPORTED_TYPES, dequantize, is_supported

__all__ = ["SUPPORTED_TYPES", "dequantize", "is_supported"]
