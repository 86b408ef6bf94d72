"""The max-context search (bench/max_context.py): the search sequence, a CPU smoke run of
`run_max_context_bench` on the tiny shape, and the stock stack's memory breakdown."""

import json

import pytest
import torch

from loraforge.bench.max_context import Search, rebuild_report, run_max_context_bench, stock_memory_breakdown


def test_search_matches_stock_maxctx():
    """Doubling from 4096, then bisection to 1,024 (midpoints on 512): the stock tool's sequence."""
    limit = 11800
    s = Search(4096, 262144, 1024)
    lengths = []
    while (n := s.next_length()) is not None:
        lengths.append(n)
        s.record(n, n <= limit)
    assert lengths == [4096, 8192, 16384, 12288, 10240, 11264]
    assert s.good == 11264 and s.bad == 12288
    s2 = Search.from_dict(json.loads(json.dumps(s.to_dict())))
    assert s2.next_length() is None and s2.good == 11264
    s = Search(65536, 300000, 1024)
    while (n := s.next_length()) is not None:
        s.record(n, n <= 250000)
    assert s.good <= 250000 < s.good + 1024 + 1 and s.bad <= 300000 * 2


def test_search_never_probes_past_hi():
    """A search asked for one length (start == hi) probes it and stops; one capped below the limit
    bisects up to hi and then probes hi itself."""
    s = Search(344064, 344064, 4096)
    assert s.next_length() == 344064
    s.record(344064, True)
    assert s.next_length() is None and s.bad_untested and s.good == 344064
    s = Search(65536, 200000, 4096)
    lengths = []
    while (n := s.next_length()) is not None:
        lengths.append(n)
        s.record(n, True)
    assert lengths == [65536, 131072, 196608, 200000] and s.good == 200000 and s.bad_untested


# long: a whole context search on the CPU (~30 s); its phases have their own fast tests
@pytest.mark.long
def test_bench_cpu_smoke(tmp_path):
    """Both sides on the tiny shape on the CPU, lengths above 512 'out of memory' by simulation."""
    pytest.importorskip("bitsandbytes")
    row = run_max_context_bench(tmp_path / "out", "tiny", device="cpu", stock_start=32, loraforge_start=64,
                                resolution=32, simulate_limit=128, speed_steps=1, budget_s=300,
                                root=str(tmp_path / "ckpt"), log=lambda m: None)
    assert row["stock_max_context"] == 128 and row["loraforge_max_context"] == 128, row
    assert [t["len"] for t in row["stock_trials"]] == [32, 64, 128, 256]
    assert [t["len"] for t in row["loraforge_trials"]] == [64, 128, 256, 192, 160]
    assert row["loraforge_probe_max_context"] == 128 and row["complete"]
    assert row["stock_tokens_per_s"] > 0 and row["loraforge_tokens_per_s"] > 0
    assert row["tokens_per_s_at_length"] == 128
    files = list((tmp_path / "out").glob("context-*-cpu.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    for k in ("case", "device", "stock_max_context", "loraforge_max_context", "stock_tokens_per_s",
              "loraforge_tokens_per_s"):
        assert k in saved
    # a second call resumes from the state file and does no new work
    again = run_max_context_bench(tmp_path / "out", "tiny", device="cpu", root=str(tmp_path / "ckpt"),
                                  log=lambda m: None)
    assert again["loraforge_trials"] == row["loraforge_trials"]
    # the workers report their versions, and the stock side's memory at its maximum is broken down
    assert saved["versions"]["torch"] == torch.__version__
    mem = saved["stock_memory_at_max"]
    assert "measured_peak" in mem and mem["model_peak"] > 0 and mem["peak_phase"] in ("layer", "loss")
    # the report can be rebuilt from the state alone, to the same row
    files[0].unlink()
    path = rebuild_report(tmp_path / "out", "tiny", "cpu")
    rebuilt = json.loads(path.read_text())
    assert {k: v for k, v in rebuilt.items() if k != "date"} == {k: v for k, v in saved.items() if k != "date"}


def test_stock_memory_breakdown_adds_up_to_its_peak():
    a, b = stock_memory_breakdown("llama3-8b", 8192), stock_memory_breakdown("llama3-8b", 11264)
    for m in (a, b):
        parts = (m["weights"] + m["lora_grads_and_adam_states"] + m["dequant_workspace"] + m["activation_checkpoints"]
                 + (m["layer_recompute_linear"] + m["attention_tokens_squared"] if m["peak_phase"] == "layer"
                    else m["logits_and_loss"]))
        assert parts == pytest.approx(m["model_peak"], abs=0.05)
    # SDPA's math-kernel attention grows with tokens², the checkpoints linearly; the fixed part not at all
    r = 11264 / 8192
    assert b["attention_tokens_squared"] / a["attention_tokens_squared"] == pytest.approx(r * r, rel=1e-2)
    assert b["activation_checkpoints"] / a["activation_checkpoints"] == pytest.approx(r, rel=1e-2)
    assert a["weights"] == b["weights"]
    # the calibration points of the stock stack's measurements (SPEC.md: 44 GiB at 8,192, 74.5 at 11,264)
    assert a["model_peak"] == pytest.approx(44.0, rel=0.05) and b["model_peak"] == pytest.approx(74.5, rel=0.02)
