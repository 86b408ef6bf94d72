"""Reading GGUF files in tests, fast: the metadata and the tensor table, straight from the header."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

# GGUF value type -> struct format (gguf.GGUFValueType: 8 is a string, 9 an array).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class Tensor:
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows last-but-one), as the weights had in the HF folder
    offset: int  # of its data, from the start of the file


def read_gguf(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """A GGUF file's metadata and tensor table. gguf.GGUFReader takes 5-60 s on this machine for a file with
    the embedded model's 100k token and merge strings (it maps each one as a numpy view); this takes 0.3 s."""
    with path.open("rb") as f:
        data = f.read(64 << 20)  # metadata and tensor table come before the tensors: a few MB
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n: pos].decode("utf-8")

    def value(vtype: int):
        if vtype == 8:
            return string()
        if vtype == 9:
            item, n = take("I"), take("Q")
            return [value(item) for _ in range(n)]
        return take(SCALARS[vtype])

    assert data[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    table = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        table.append((name, gguf.GGMLQuantizationType(take("I")), tuple(reversed(dims)), take("Q")))
    align = meta.get("general.alignment", 32)
    start = -(-pos // align) * align
    return meta, {name: Tensor(t, shape, start + offset) for name, t, shape, offset in table}
