"""bitsandbytes' "`kernels` is missing" warning: held at import, said once where a packed 4-bit CPU layer needs it."""

from __future__ import annotations

import logging

import pytest
import torch

import loraforge
from loraforge.model import quant


def test_the_warning_is_held_at_import_and_said_once_when_a_layer_packs(caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")  # imported now: its own warning (on such a CPU) comes before the test's
    bnb_log = logging.getLogger(quant.BNB_CPU_LOGGER)
    assert loraforge.KERNELS_WARNING in bnb_log.filters  # installed by `import loraforge`, before any bitsandbytes
    for f in bnb_log.filters:  # forget what this process's own import of bitsandbytes said
        monkeypatch.setattr(f, "held", None)
    monkeypatch.setattr(quant, "_kernel_note_said", False)
    with caplog.at_level(logging.WARNING):
        # what bitsandbytes 0.50 logs on import on an AVX512-BF16 CPU without the `kernels` package
        bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        bnb_log.warning("something else")  # not held
        assert [r.getMessage() for r in caplog.records] == ["something else"]
        caplog.clear()
        assert quant.set_cpu_packing(torch.nn.Linear(4, 4), enabled=True) == {"packed": 0, "unpacked": 0}
        assert caplog.records == []  # nothing packed: the warning does not matter
        quant._say_kernel_note()
        quant._say_kernel_note()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "No module named 'kernels'" in notes[0] and "packed 4-bit" in notes[0]
