"""`python faultcli.py train ...` = `loraforge train ...`, with optional slow checkpoint writes.

With LORAFORGE_TEST_SAVE_DELAY=S > 0, every `torch.save` into a `.tmp-step-*` folder writes the first half
of the file, sleeps S seconds, then writes the rest: a kill in that window leaves a genuinely torn file in
a torn checkpoint folder, the case crash safety must survive. Nothing else changes.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch

DELAY = float(os.environ.get("LORAFORGE_TEST_SAVE_DELAY") or 0)

if DELAY > 0:
    _save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or ".tmp-step-" not in str(f):
            return _save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(DELAY)
            out.write(data[len(data) // 2:])

    torch.save = slow_save

if __name__ == "__main__":
    from loraforge.cli import main

    sys.argv[0] = "loraforge"
    main()
