"""llama.cpp runs the exported GGUF like loraforge runs the merged folder: same prompt tokens, same greedy tokens.

The comparison itself is scripts/llamacpp_compare.py (which writes the record in bench/results); this test runs
it and reads its record. llama-cpp-python is not a loraforge dependency (it builds llama.cpp from source, ~1 h
on 2 cores), so it runs in whichever Python has it: $LORAFORGE_LLAMACPP_PYTHON, else
/work/venvs/llamacpp/bin/python, else this one; the test is skipped where none does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "llamacpp_compare.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("llamacpp_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The embedded 135M model merged in float32 and written as a 540 MB GGUF, then 3 x 32 tokens on both sides.
@pytest.mark.long
def test_llama_cpp_decodes_like_loraforge(script, embedded_model_dir: Path, tmp_path: Path) -> None:
    python = script.llamacpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed in $LORAFORGE_LLAMACPP_PYTHON, /work/venvs/llamacpp or here")
    record = script.compare(tmp_path, python)
    assert record["eos_equal"], record  # tokenizer.ggml.eos_token_id is the tokenizer's EOS
    for row in record["prompts"]:
        # Chat markers kept whole (CONTROL tokens), the smollm pre-tokenizer, no BOS added: the metadata is right.
        assert row["ids_equal"], (row["prompt"], row["loraforge"]["ids"], row["llama_cpp"]["ids"])
        # float32 on both sides: only a near tie may go either way.
        assert row["equal"] or row["first_difference"]["near_tie"], row
