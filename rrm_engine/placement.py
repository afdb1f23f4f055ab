"""Where a model lives and in what precision: device and dtype as users spell them.

`resolve_device("cuda")` and `resolve_dtype("bf16", device)` turn what a user typed (a string, a
torch object, or None for the default) into torch objects, or raise ValueError with a sentence
that says what is wrong and what to use instead, before any weight is read. torch's own errors for
these cases ("Torch not compiled with CUDA enabled" as an AssertionError deep inside .to(), a
string where a torch.dtype was expected) come too late and say too little.
"""
from __future__ import annotations

import torch

# every spelling people use for the three floating-point weight dtypes (case-insensitive)
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(spec: torch.device | str | None) -> torch.device:
    """None: cuda when available, else cpu. Otherwise the device asked for, checked to exist."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise ValueError(f"device {str(spec)!r} was asked for, but {why} (torch {torch.__version__}); "
                             "use device cpu, or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(spec)!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(spec)!r} was asked for, but MPS is not available on this machine")
        return device
    raise ValueError(f"device {str(spec)!r} is not supported: use cpu, cuda or cuda:N")


def resolve_dtype(spec: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """None or "auto": bf16 on cuda, fp32 elsewhere. A torch.dtype or a name from DTYPE_NAMES
    ("bfloat16", "bf16", "float32", "fp32", "half", ..., optionally prefixed with "torch.")."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return default_dtype(device)
    if isinstance(spec, str):
        name = spec.strip().lower().removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {spec!r}: use one of {', '.join(DTYPE_NAMES)} (or 'auto')")
        return DTYPE_NAMES[name]
    if isinstance(spec, torch.dtype):
        if spec not in _FLOAT_DTYPES:
            raise ValueError(f"dtype {spec} is not a weight dtype the engine runs: use float32, bfloat16 or float16")
        return spec
    raise ValueError(f"dtype must be a torch.dtype or a string such as 'bfloat16', got {type(spec).__name__}")
