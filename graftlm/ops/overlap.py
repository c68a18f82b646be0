"""Run routed experts on a worker thread while the caller's device does other work.

A torch op releases the GIL, so a plain worker thread gives real overlap: the CPU computes the
routed experts while the accelerator (or, on a CPU-only machine, the calling thread) computes the
shared experts. Waiting is `Future.result()`, a condition variable, never a spin.

Moves between an accelerator and the CPU go through pinned host memory with `non_blocking=True`;
the worker waits on a blocking CUDA event before it reads the copied input, so the caller never
stalls on the device-to-host copy. PyTorch's caching host allocator keeps a pinned block alive
until the copies that use it have finished, so buffers are safe to drop right after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def expert_pool() -> ThreadPoolExecutor:
    """The one worker thread that runs routed experts (created on first use, not at import).

    Layers run one after another, so one worker suffices: each MoE block joins its experts
    before the next block submits.
    """
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graftlm-experts")
        return _pool


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU: a non-blocking copy into pinned memory from an accelerator, else `t` itself."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for an accelerator goes through pinned memory, non-blocking."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def submit(
    fn: Callable[..., torch.Tensor], *args: torch.Tensor, device: torch.device
) -> Future[torch.Tensor]:
    """Run fn(*args) on the worker with the args moved to `device` (CPU expected).

    The caller's grad and inference modes (thread-local in torch) carry over to the worker.
    """
    ready = None
    source = next((a.device for a in args if a.device.type == "cuda"), None)
    if device.type == "cpu" and source is not None:
        args = tuple(to_host(a) for a in args)
        ready = torch.cuda.Event(blocking=True)  # blocking: the worker sleeps, it does not spin
        ready.record(torch.cuda.current_stream(source))  # the stream the copies were queued on
    else:
        args = tuple(a.to(device) for a in args)
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()

    def run() -> torch.Tensor:
        if ready is not None:
            ready.synchronize()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args)

    return expert_pool().submit(run)
