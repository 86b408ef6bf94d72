"""bench/peers.py without a GPU: its arguments, the max-context search driven by a fake probe, the records it
writes and their stamp, how it runs an arm's process and reads what it left, and that it stops with status 2
where there is no CUDA GPU or its input is unusable."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from loraforge.bench.device import stamp
from loraforge.data.templates import alpaca_prompt
from loraforge.errors import ConfigError, DataError

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def peers():
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    sys.path[:] = saved  # bench/ was put first only for the script's own import of peers_common
    return module


@pytest.fixture(scope="module")
def common(peers):
    return sys.modules["peers_common"]


def test_arguments(peers) -> None:
    a = peers.parse_args([])
    assert a.cases == ["step"] and a.arms is None and a.shapes == ["llama2-7b", "llama3-8b"]
    a = peers.parse_args(["--cases", "context,e2e", "--arms", "unsloth,bench", "--budget-s", "500"])
    assert a.cases == ["context", "e2e"] and a.arms == ["unsloth", "bench"] and a.budget_s == 500
    a = peers.parse_args(["--context-start", "unsloth=327680,loraforge=458752"])
    assert [peers.context_start(a, x) for x in ("unsloth", "loraforge", "stock")] == [327680, 458752, 65536]
    assert peers.context_start(peers.parse_args(["--context-start", "131072"]), "unsloth") == 131072
    for bad in (["--cases", "speed"], ["--arms", "trl"], ["--budget-s", "0"], ["--shapes", "llama9"],
                ["--context-start", "0"], ["--context-start", "trl=5"], ["--context-start", "unsloth=x"]):
        with pytest.raises(SystemExit) as e:
            peers.parse_args(bad)
        assert e.value.code == 2, bad


def _probe(limit: int, calls: list[int]):
    """A fake probe process: lengths up to `limit` train; a step takes 10 s at 64K, growing as length^1.8."""
    def probe(n: int) -> dict:
        calls.append(n)
        s = 10.0 * (n / 65536) ** 1.8
        return {"len": n, "ok": n <= limit, "s": round(s, 2), "wall_s": round(s + 30, 2)}
    return probe


def test_search_closes_on_the_limit(peers) -> None:
    state, calls, saves = peers.ContextState(peers.Search(65536, 1 << 20, 4096)), [], []
    why = peers.search_longest(state, _probe(309000, calls), lambda: 1e9, lambda: saves.append(1))
    s = state.search
    assert why == "done" and state.closed() and state.stopped is None
    assert calls[:4] == [65536, 131072, 262144, 524288]
    assert s.good <= 309000 < s.bad <= s.good + 4096
    assert len(saves) == len(calls) == len(s.trials)  # saved after every probe


def test_search_stops_within_budget_and_resumes(peers) -> None:
    left = [400.0]

    def probe(n: int) -> dict:
        r = _probe(309000, calls)(n)
        left[0] -= r["wall_s"]
        return r

    calls: list[int] = []
    state = peers.ContextState(peers.Search(65536, 1 << 20, 4096), calls=1)
    why = peers.search_longest(state, probe, lambda: left[0], lambda: None)
    # 524,288 would take ~450 s by the estimate from 262,144's probe: not started
    assert why == "budget" and calls == [65536, 131072, 262144]
    assert state.stopped["why"] == "budget" and state.stopped["next_len"] == 524288
    meta = stamp("NVIDIA H200") | {"invocation": "bench/peers.py --cases context"}
    rec = json.loads(json.dumps(peers.context_record("c", "unsloth", state, meta, {"cap": 80}, probed=False)))
    assert rec["max_tokens"] is None and not rec["complete"] and rec["longest_ok_so_far"] == 262144
    assert rec["first_failing"] is None and rec["calls"] == 1 and rec["device"] == "NVIDIA H200"

    again = peers.ContextState.resume(rec, 1, 2, 3)  # the saved search wins over the flags
    again.calls += 1
    assert peers.search_longest(again, _probe(309000, calls), lambda: 1e9, lambda: None) == "done"
    whole = peers.ContextState(peers.Search(65536, 1 << 20, 4096))
    peers.search_longest(whole, _probe(309000, []), lambda: 1e9, lambda: None)
    assert [t["len"] for t in again.search.trials] == [t["len"] for t in whole.search.trials]
    rec = peers.context_record("c", "unsloth", again, meta, {}, probed=False)
    assert rec["max_tokens"] == whole.search.good and rec["complete"] and rec["calls"] == 2
    assert rec["first_failing"] == whole.search.bad and rec["peak_gib_at_max"] is None


def test_a_failed_probe_is_not_a_trial(peers) -> None:
    state = peers.ContextState(peers.Search(65536, 1 << 20, 4096))
    why = peers.search_longest(state, lambda n: {"len": n, "error": "ImportError: no unsloth"}, lambda: 1e9,
                               lambda: None)
    assert why == "error" and state.search.trials == [] and "ImportError" in state.stopped["error"]
    why = peers.search_longest(state, lambda n: {"len": n, "timeout": True}, lambda: 1e9, lambda: None)
    assert why == "timeout" and state.search.trials == []


def test_verification_steps_down(peers) -> None:
    state = peers.ContextState(peers.Search(65536, 1 << 20, 4096))
    peers.search_longest(state, _probe(309000, []), lambda: 1e9, lambda: None)
    full = []

    def full_step(n: int) -> dict:
        full.append(n)
        return {"len": n, "ok": n <= 300000, "s": 200.0, "wall_s": 230.0}

    good = state.search.good
    assert peers.verify_longest(state, full_step, lambda: 1e9, lambda: None, 4096) == "done"
    assert full == [good, good - 4096, good - 8192] and state.verified() == good - 8192
    rec = peers.context_record("c", "loraforge", state, {"versions": {}}, {}, probed=True)
    assert rec["max_tokens"] == good - 8192 and rec["probe_max_tokens"] == good and rec["complete"]
    assert rec["first_failing"] == good - 4096 and rec["step_s_at_max"] == 200.0

    state.verify = []
    assert peers.verify_longest(state, lambda n: {"len": n, "ok": False}, lambda: 1e9, lambda: None, 4096) == "done"
    rec = peers.context_record("c", "loraforge", state, {"versions": {}}, {}, probed=True)
    assert rec["max_tokens"] is None and rec["complete"] and len(rec["verify"]) == 3

    none = peers.ContextState(peers.Search(65536, 1 << 20, 4096))  # not even the shortest probe trains
    peers.search_longest(none, _probe(0, []), lambda: 1e9, lambda: None)
    assert peers.verify_longest(none, full_step, lambda: 1e9, lambda: None, 4096) == "done" and none.verify == []
    rec = peers.context_record("c", "loraforge", none, {"versions": {}}, {}, probed=True)
    assert rec["max_tokens"] == 0 and rec["complete"] and rec["first_failing"] <= 4096


def test_estimate(peers) -> None:
    trials = [{"len": 65536, "ok": True, "s": 10.0, "wall_s": 40.0}, {"len": 131072, "ok": False}]
    assert peers.estimate_s([], 65536) == 0.0
    assert peers.estimate_s(trials, 131072) == pytest.approx(30 + 10 * 2**1.8)
    assert peers.estimate_s(trials, 32768) == pytest.approx(35.0)
    assert peers.estimate_s(trials, 65536, scale=1 / 0.35) == pytest.approx(30 + 10 / 0.35)


def test_arm_processes(peers, tmp_path: Path) -> None:
    def run(code: str, timeout: float = 60) -> object:
        return peers.run_child([sys.executable, "-S", "-c", code], tmp_path / "arm.log", timeout)

    c = run("print('loading'); print('PEERS_RESULT {\"len\": 8, \"ok\": true, \"s\": 1.5}')")
    assert c.ok and c.returncode == 0 and c.result == {"len": 8, "ok": True, "s": 1.5} and "loading" in c.tail
    assert peers.trial_from_child(c, 8) | {"wall_s": 0} == {"len": 8, "ok": True, "s": 1.5, "wall_s": 0,
                                                         "log": "arm.log"}
    c = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")  # as the host's OOM killer does
    t = peers.trial_from_child(c, 8)
    assert not c.ok and t["ok"] is False and "signal 9" in t["why"]
    c = run("import time; time.sleep(60)", timeout=1)
    assert c.timed_out and c.wall_s < 30 and peers.trial_from_child(c, 8)["timeout"]
    c = run("import sys; print('PEERS_RESULT {\"error\": \"ValueError: bad\"}'); sys.exit(1)")
    t = peers.trial_from_child(c, 8)
    assert "ok" not in t and "ValueError: bad" in t["error"]


def test_records_and_stamp(peers, tmp_path: Path) -> None:
    meta = peers.stamp("NVIDIA H200", ("unsloth", "trl")) | {"invocation": "bench/peers.py --cases step"}
    assert meta["device"] == "NVIDIA H200" and meta["date"] == dt.date.today().isoformat()
    assert meta["versions"]["torch"] == torch.__version__ and isinstance(meta["versions"]["unsloth"], str)
    c = peers.Child(["python", "bench/peers_unsloth.py", "step"], tmp_path / "003-step.log", returncode=0, wall_s=61.2,
                    result={"tokens_per_s": 6500, "peak_gib": 4.6, "versions": {"unsloth": "2026.10.9"}})
    result, error = peers.outcome(c)
    rec = peers.arm_record("llama2-7b-r16-all-4x512", "unsloth", meta, child=c, result=result, error=error,
                           settings={"batch": 4})
    assert rec["case"] == "llama2-7b-r16-all-4x512" and rec["arm"] == "unsloth" and "error" not in rec
    assert rec["tokens_per_s"] == 6500 and rec["peak_gib"] == 4.6 and rec["settings"] == {"batch": 4}
    assert rec["versions"]["unsloth"] == "2026.10.9" and rec["versions"]["torch"] == torch.__version__
    assert rec["command"] == "python bench/peers_unsloth.py step" and rec["log"] == "peers-logs/003-step.log"
    assert rec["device"] == "NVIDIA H200" and rec["date"] == meta["date"] and rec["process_wall_s"] == 61.2
    c = peers.Child(["python", "x.py"], tmp_path / "x.log", returncode=1, tail="Traceback ...",
                    result={"error": "RuntimeError: boom", "traceback": "in step()"})
    rec = peers.arm_record("c", "stock", meta, child=c, error=peers.outcome(c)[1])
    assert "RuntimeError: boom" in rec["error"] and "in step()" in rec["error"] and "tokens_per_s" not in rec
    json.dumps(rec)


def test_common_helpers(common) -> None:
    marks = {0: (100.0, 0.0), 10: (105.0, 20000.0), 40: (115.0, 80000.0)}
    assert common.window_rate(marks, 10, 40) == 6000 and common.window_rate(marks, 0, 10) == 4000
    assert common.window_rate(marks, 10, 39) is None
    assert common.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert common.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not common.is_oom(RuntimeError("shape mismatch")) and not common.is_oom(ValueError("out of memory"))
    assert common.parse_result("log\nPEERS_RESULT {\"a\": 1}\nmore log\n") == {"a": 1}
    assert common.parse_result("PEERS_RESULT {cut off") is None and common.parse_result("") is None


def test_inputs(peers, tmp_path: Path) -> None:
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "input": "", "output": "Hello"}) + "\n\n"
                    + json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n")
    assert peers.alpaca_texts(str(data)) == [alpaca_prompt("Hi") + "Hello", alpaca_prompt("Add", "2+2") + "4"]
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"alpaca.jsonl, line 2: invalid JSON"):
        peers.alpaca_texts(str(data))
    data.write_text(json.dumps({"instruction": "Hi", "output": 3}) + "\n")
    with pytest.raises(DataError, match=r"alpaca.jsonl, line 1: field 'output' must be a string"):
        peers.alpaca_texts(str(data))
    prev = tmp_path / "prev.json"
    broken = '[{"case": "c", "arm": "unsloth", "search": {"start": 1, "nope": 2}}]'
    for text, match in (("{", "cannot read it as JSON"), ("{}", "expected a list of records"),
                        (broken, "record 0 .c/unsloth.")):
        prev.write_text(text)
        with pytest.raises(ConfigError, match=match):
            peers.load_resume(str(prev))
    prev.write_text(json.dumps([{"case": "c", "arm": "unsloth", "search": peers.Search(1, 2).to_dict()},
                                {"case": "c", "arm": "stock", "tokens_per_s": 1}]))
    assert list(peers.load_resume(str(prev))) == [("c", "unsloth")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a CUDA GPU")
def test_without_cuda_it_exits_2(peers, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert peers.main(["--cases", "step", "--out", str(out), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench/peers.py needs a CUDA GPU") and not out.exists()
    assert peers.main(["--cases", "e2e", "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
