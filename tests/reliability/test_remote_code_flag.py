"""`--trust-remote-code` is an argument all the way down (no process-wide switch): every entry point that
loads a run hands its `trust_remote_code` to `infer.load`, and it is off unless the caller turns it on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.infer import chat, generate
from loraforge.infer import load as load_mod


class Stop(Exception):
    """Raised by the stand-in loader: the entry point got as far as loading, which is all this checks."""


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []

    def loader(run, **kwargs):
        calls.append(kwargs.get("trust_remote_code", False))
        raise Stop

    for module in (load_mod, chat, generate):  # chat and generate import `load` by name
        monkeypatch.setattr(module, "load", loader)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_each_entry_point_hands_its_flag_to_the_loader(seen: list[bool], tmp_path: Path, trust: bool) -> None:
    from loraforge.eval.compare import compare_run
    from loraforge.infer.merge import merge_adapter
    from loraforge.serve.engine import Engine

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/base"}))
    entry_points = [lambda: chat.chat_loop(adapter, trust_remote_code=trust, input_fn=lambda _: "/exit"),
                    lambda: generate.generate_cli(adapter, prompts=["hi"], trust_remote_code=trust),
                    lambda: merge_adapter(adapter, tmp_path / "merged", trust_remote_code=trust),
                    lambda: compare_run(adapter, trust_remote_code=trust),
                    lambda: Engine([adapter], trust_remote_code=trust)]
    for call in entry_points:
        with pytest.raises(Stop):
            call()
    assert seen == [trust] * len(entry_points)
    seen.clear()
    with pytest.raises(Stop):
        generate.generate_cli(adapter, prompts=["hi"])  # the default: off
    assert seen == [False]
