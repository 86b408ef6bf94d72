"""What loraforge deserializes and what code it lets run.

Weights and training state are read only from safetensors or with `torch.load(weights_only=True)`; no
pickle, no `yaml.load` without a safe loader, no eval/exec of config text. `trust_remote_code` reaches
`from_pretrained` as False unless the config asks for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "loraforge"


def calls(name: str) -> list[tuple[Path, int, str]]:
    """Every call `name(...)` in the package source, with its full argument text (may span lines)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(re.escape(name) + r"\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            found.append((path, text.count("\n", 0, m.start()) + 1, text[m.start():i]))
    return found


def test_torch_load_always_uses_weights_only():
    loads = calls("torch.load")
    assert loads, "expected the checkpoint loader to call torch.load"
    unsafe = [(str(p), n) for p, n, call in loads if not re.search(r"weights_only\s*=\s*True", call)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_pickle_no_unsafe_yaml_no_eval():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport (c?pickle|dill|marshal)\b|\bfrom (c?pickle|dill) import|\bpickle\.", code):
                bad.append((str(path), n, "pickle"))
            if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code) and "SafeLoader" not in code:
                bad.append((str(path), n, "yaml.load"))
            if re.search(r"(?<![\w.])(eval|exec)\(", code):
                bad.append((str(path), n, "eval/exec"))
            if re.search(r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True", code):
                bad.append((str(path), n, line.strip()))
    assert not bad, bad


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_from_pretrained_only_when_asked(tiny_model_dir: Path, monkeypatch, trust: bool):
    import transformers

    from loraforge.config import ModelConfig
    from loraforge.model.load import load_base

    seen: list[tuple[str, object]] = []
    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _orig=original, _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", False)))
            return _orig(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu", trust_remote_code=trust),
              for_training=False)
    assert {name for name, _ in seen} >= {"AutoModelForCausalLM", "AutoTokenizer"}, seen
    assert all(value is trust for _, value in seen), seen
