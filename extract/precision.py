"""Where a network runs and whether bf16 is native there: one answer for C3D and the captioner.

``resolve_device`` is the default device of every command (CUDA when there is one).
``cpu_has_fast_bf16`` is what C3D extraction asks before running bf16 on a CPU (it warns when
bf16 would be emulated) and what training's precision ``auto`` resolves by
(``astar.train.loop.resolve_precision``: bf16 on a CUDA device that has it or a CPU with native
bf16, AVX-512 BF16 or AMX, else fp32).
"""

from __future__ import annotations

import os

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 instructions.
_BF16_ISAS = {
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
    "DEFAULT",
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX) and oneDNN may use it.

    oneDNN also runs bf16 on plain AVX-512 (BW/VL/DQ) by converting to fp32, which is slower
    than fp32 itself; without AVX-512 PyTorch falls back to reference kernels, about 150x
    slower. ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below AVX512_CORE_BF16 counts as
    no native bf16, so that the fp32 path can be forced and tested on any machine.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap is None or cap.strip().upper() in _BF16_ISAS


__all__ = ["PRECISIONS", "cpu_has_fast_bf16", "resolve_device"]
