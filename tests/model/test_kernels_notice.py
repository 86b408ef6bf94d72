"""bitsandbytes' "`kernels` is missing" warning: held at import, said once where a packed 4-bit CPU layer needs it."""

from __future__ import annotations

import logging

import pytest
import torch

import loraforge
from loraforge.model import quant


def test_the_warning_is_held_at_import_and_said_once_when_a_layer_packs(caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loraforge.KERNELS_WARNING, "held", None)
    monkeypatch.setattr(quant, "_kernel_note_said", False)
    with caplog.at_level(logging.WARNING):
        # what bitsandbytes 0.50 logs on import on an AVX512-BF16 CPU without the `kernels` package
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else")  # not held
        assert [r.getMessage() for r in caplog.records] == ["something else"]
        assert "No module named 'kernels'" in loraforge.KERNELS_WARNING.held
        caplog.clear()
        assert quant.set_cpu_packing(torch.nn.Linear(4, 4), enabled=True) == {"packed": 0, "unpacked": 0}
        assert caplog.records == []  # nothing packed: the warning does not matter
        quant._say_kernel_note()
        quant._say_kernel_note()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "No module named 'kernels'" in notes[0] and "packed 4-bit" in notes[0]
