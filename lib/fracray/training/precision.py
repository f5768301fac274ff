"""Which precision a training step runs at, decided once from the device and the request.

    cuda: float16 autocast with a gradient scaler ("auto", as before) or float32.
    cpu:  bfloat16 autocast where the CPU computes bf16 natively (avx512_bf16 or AMX; read
          from /proc/cpuinfo at start), float32 elsewhere. bf16 keeps float32's exponent, so
          no gradient scaler is needed; master weights and the optimizer stay float32.

Measured on a 2-core AMD EPYC with avx512_bf16, EfficientNet-Lite0 at 384 px, batch 16
(``fracray bench training``): see docs/benchmarks.md, "Training throughput".
"""

from __future__ import annotations

import functools
import os

__all__ = ["PRECISIONS", "cpu_has_native_bf16", "resolve_training_precision"]

PRECISIONS = ("auto", "bf16", "float16", "float32")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU advertises native bf16 arithmetic (x86: avx512_bf16 or AMX-BF16;
    ``FRACRAY_CPU_BF16=0/1`` overrides, for CPUs whose flags are not in /proc/cpuinfo)."""
    forced = os.environ.get("FRACRAY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_training_precision(requested: str, device_type: str) -> str:
    """"auto" | "bf16" | "float16" | "float32" -> what the step runs ("bf16", "float16" or
    "float32"). "auto": float16 on CUDA, bf16 on a CPU with native bf16, else float32.
    Asking for bf16 on a CPU without it is allowed (emulated, slow: a deliberate choice);
    float16 on a CPU is refused (no CPU kernel set makes it pay off)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Got {requested!r}")
    if requested == "auto":
        if device_type == "cuda":
            return "float16"
        return "bf16" if cpu_has_native_bf16() else "float32"
    if requested == "float16" and device_type != "cuda":
        raise ValueError("precision float16 needs a CUDA device; on a CPU use bf16 (native on avx512_bf16/AMX) "
                         "or float32")
    return requested
