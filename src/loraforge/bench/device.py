"""What every benchmark result records about where it ran."""

from __future__ import annotations

import platform

import torch

from loraforge.errors import ResourceError


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the device part of a results file name."""
    return "cpu" if name == "cpu" else name.replace("NVIDIA ", "").split()[0].lower()


def require_cuda(what: str) -> None:
    """The GPU benchmarks measure a GPU: say so plainly where there is none."""
    if not torch.cuda.is_available():
        raise ResourceError(f"{what} needs a CUDA GPU and none is visible here (torch {torch.__version__}). "
                            "Run it on a GPU machine; the CPU smoke runs are bench/context.py --tiny --device cpu "
                            "and the tests.")


def versions() -> dict[str, str]:
    """Versions of the libraries both stacks run on."""
    import peft
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "python": platform.python_version()}
    try:  # optional: CPU-only installs may lack either
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        pass
    return v
