"""Loading: name resolution, hub errors, trust_remote_code, quantization options (the tokenizer: test_tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import transformers
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from loraforge.config import ModelConfig
from loraforge.errors import ModelLoadError
from loraforge.model import load
from loraforge.model.embedded import embedded_gguf_path


def _http(status: int) -> httpx.Response:
    url = "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/config.json"
    return httpx.Response(status, request=httpx.Request("GET", url))


# ---------------------------------------------------------------------------------------------- resolution

def test_gguf_file_path_resolves_like_the_embedded_name(embedded_model_dir: Path) -> None:
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    assert Path(load.resolve_model_path(ModelConfig(model_name=str(gguf)))) == embedded_model_dir


@pytest.mark.long
def test_gguf_file_materializes_into_a_fresh_cache_and_loads(tmp_path: Path) -> None:
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    cfg = ModelConfig(model_name=str(gguf), cache_dir=str(tmp_path), use_4bit=False)
    path = Path(load.resolve_model_path(cfg))
    assert path.parent.parent == tmp_path and (path / "model.safetensors").is_file()
    assert load.resolve_model_path(cfg) == str(path)  # cached: the second call does no work
    model, tok = load.load_base(cfg, for_training=False)
    assert model.config.model_type == "llama" and tok.pad_token_id != tok.eos_token_id


def test_bad_paths_get_our_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load.resolve_model_path(ModelConfig(model_name=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load.resolve_model_path(ModelConfig(model_name=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="neither an existing path nor a hub id"):
        load.resolve_model_path(ModelConfig(model_name="./not/here/model"))
    assert load.resolve_model_path(ModelConfig(model_name="meta-llama/Llama-2-7b-hf")) == "meta-llama/Llama-2-7b-hf"


def test_hub_id_offline_is_our_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load.load_base(ModelConfig(model_name="meta-llama/Llama-2-7b-hf", use_4bit=False))
    msg = str(e.value)
    assert "hub cannot be reached" in msg and "HF_HUB_OFFLINE" in msg and "model.model_name" in msg
    assert "Traceback" not in msg


@pytest.mark.parametrize("err, status", [
    (GatedRepoError("Access to model meta-llama/Llama-2-7b-hf is restricted.", response=_http(401)), "401"),
    (HfHubHTTPError("403 Forbidden: you have not been granted access", response=_http(403)), "403"),
    # transformers wraps hub errors in an OSError; the status is found through the cause chain
    (OSError("You are trying to access a gated repo."), "401/403"),
])
def test_gated_model_says_what_to_do(err: Exception, status: str, tiny_model_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise err

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError) as e:
        load.load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False))
    msg = str(e.value)
    assert f"HTTP {status}" in msg and "HF_TOKEN" in msg and "licence" in msg and "no token was found" in msg
    # and through the tokenizer, which loads first from the hub
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError, match="refused access"):
        load.load_tokenizer("meta-llama/Llama-2-7b-hf", ModelConfig(model_name="meta-llama/Llama-2-7b-hf"))


@pytest.mark.parametrize("trust", [False, True])
def test_token_and_trust_remote_code_reach_from_pretrained(trust: bool, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, dict] = {}

    def capture(kind):
        def fake(path, **kwargs):
            seen[kind] = kwargs
            raise ValueError("stop here")
        return fake

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture("model"))
    cfg = ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, trust_remote_code=trust)
    with pytest.raises(ModelLoadError):
        load.load_tokenizer(str(tiny_model_dir), cfg)
    with pytest.raises(ModelLoadError):
        load.load_model(cfg, str(tiny_model_dir), load.pick_placement(cfg))
    for kind in ("tokenizer", "model"):
        assert seen[kind]["trust_remote_code"] is trust
        assert seen[kind]["token"] == "hf_secret"
    assert ModelConfig().trust_remote_code is False


# ---------------------------------------------------------------------------------------------- quantization

def _linear(model, name: str = "q_proj"):
    return getattr(model.model.layers[0].self_attn, name)


def _auto_dtype() -> torch.dtype:
    """What dtype "auto" means with model.device=auto on this machine: fp32 on the CPU (bf16 matmuls are
    emulated on most CPUs), bf16 on a GPU that has it, else fp16."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@pytest.mark.parametrize("quant_type, nested, compute, device, dtype", [
    ("nf4", True, "auto", "cpu", torch.float32),   # the default; auto = fp32 on CPU, on any machine
    ("nf4", True, "auto", "auto", None),           # device=auto: the GPU's dtype where there is one (_auto_dtype)
    ("fp4", False, "bfloat16", "auto", torch.bfloat16),
    ("nf4", False, "float16", "auto", torch.float16),
    ("nf4", True, "float32", "auto", torch.float32),
])
def test_4bit_options_reach_bitsandbytes(quant_type: str, nested: bool, compute: str, device: str,
                                         dtype: torch.dtype | None, tiny_model_dir: Path) -> None:
    dtype = dtype or _auto_dtype()
    cfg = ModelConfig(model_name=str(tiny_model_dir), bnb_4bit_quant_type=quant_type, use_nested_quant=nested,
                      bnb_4bit_compute_dtype=compute, device=device)
    assert load.pick_placement(cfg).dtype == dtype
    model, _ = load.load_base(cfg)
    layer = _linear(model)
    assert type(layer).__name__ == "Linear4bit"
    state = layer.weight.quant_state
    assert state.quant_type == quant_type and state.nested is nested
    assert layer.compute_dtype == dtype
    # unquantized parts (embeddings, norms, lm_head) in the compute dtype: nothing upcast to fp32
    assert model.model.norm.weight.dtype == dtype and model.lm_head.weight.dtype == dtype
    assert model.is_loaded_in_4bit


def test_8bit_and_plain_dtypes(tiny_model_dir: Path) -> None:
    m8, _ = load.load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, use_8bit=True))
    assert type(_linear(m8)).__name__ == "Linear8bitLt" and m8.is_loaded_in_8bit
    for name, device, dtype in (("bfloat16", "auto", torch.bfloat16), ("float16", "auto", torch.float16),
                                ("float32", "auto", torch.float32), ("auto", "cpu", torch.float32),
                                ("auto", "auto", _auto_dtype())):
        m, _ = load.load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, dtype=name, device=device))
        assert type(_linear(m)) is torch.nn.Linear and _linear(m).weight.dtype == dtype, (name, device)
        on_gpu = device == "auto" and torch.cuda.is_available()
        assert _linear(m).weight.device.type == ("cuda" if on_gpu else "cpu")


def test_cuda_requested_without_gpu(tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load.pick_placement(ModelConfig(model_name=str(tiny_model_dir), device="cuda"))


def _gguf_with_file_type(path: Path, file_type: int) -> Path:
    """A GGUF file holding only metadata: enough for the file-type check, which reads no tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_a_4bit_load_of_a_model_published_at_4_bits_is_named(tmp_path: Path) -> None:
    import gguf

    from loraforge.model.load import published_low_bit

    assert published_low_bit(ModelConfig()) == "Q4_1"  # the embedded SmolLM2-135M-Instruct, 4-bit by default
    assert published_low_bit(ModelConfig(use_4bit=False)) is None
    assert published_low_bit(ModelConfig(model_name="meta-llama/Llama-2-7b-hf")) is None  # no GGUF: not read
    types = gguf.LlamaFileType
    for ftype, want in [(types.MOSTLY_Q4_K_M, "Q4_K_M"), (types.MOSTLY_IQ3_S, "IQ3_S"), (types.MOSTLY_Q8_0, None),
                        (types.MOSTLY_BF16, None), (types.MOSTLY_Q6_K, None)]:
        path = _gguf_with_file_type(tmp_path / f"{ftype.name}.gguf", int(ftype))
        assert published_low_bit(ModelConfig(model_name=str(path))) == want, ftype.name


def test_a_run_warns_before_it_rounds_a_4bit_model_again(tmp_path: Path) -> None:
    """The warning is a line of the run's own log, before the model loads (what a user reads first)."""
    from tinymodels import chat_records, write_jsonl

    from loraforge.config import DataConfig, LoRAConfig
    from loraforge.train.trainer import LLAMATrainer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    logged: list[str] = []
    trainer = LLAMATrainer(ModelConfig(device="cpu"), LoRAConfig(r=4, target_modules="qv"),
                           DataConfig(dataset=str(data), max_length=64), log=logged.append)
    trainer.setup()
    [warning] = [line for line in logged if "NF4" in line]
    assert warning.startswith("warning: smollm2-135m-instruct was published as Q4_1 GGUF")
    assert "model.use_4bit=false" in warning
    assert logged.index(warning) < next(i for i, line in enumerate(logged) if line.startswith("model "))
