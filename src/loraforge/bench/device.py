"""What every benchmark result records about where it ran."""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

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


def stamp(device: str, packages: Iterable[str] = ()) -> dict[str, Any]:
    """What every benchmark record carries about where and when it ran: the device's name, today's date, and
    the versions of the libraries both stacks run on plus `packages` (e.g. a peer's: "unsloth", "trl"), read
    from their installed metadata so that stamping imports none of them (Unsloth patches what it imports)."""
    v = versions()
    for name in packages:
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            v[name] = "not installed"
    return {"device": device, "date": _dt.date.today().isoformat(), "versions": v}
