"""`loraforge` — the command line. Each command parses its arguments and calls one library function.

Errors caused by input (a bad config, a malformed record, a missing file) are printed as one clear
message without a traceback, with exit code 2. A run stopped by SIGTERM/SIGINT saves a checkpoint and
exits with 143/130, the conventional codes, so a scheduler can requeue it and `--resume` continues.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from loraforge.errors import LoraforgeError

app = typer.Typer(
    name="loraforge",
    help="Fine-tune Llama-family models with LoRA and QLoRA.\n\n"
         "Start with `loraforge demo` (CPU, ~6 minutes), then `loraforge train CONFIG` with a file from configs/.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")
data_app = typer.Typer(help="Look at data the way training will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
runs_app = typer.Typer(help="Look at finished runs side by side.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

OVERRIDES_HELP = ("Settings that override the config file, as section.key=value, e.g. "
                  "training.learning_rate=1e-4 lora.r=16 data.max_length=1024. "
                  "Run `loraforge config` to list every setting.")


TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code",
    help="Let transformers run the model's own Python code from the hub. A run folder's "
         "model.trust_remote_code is ignored without this flag: only use it for folders and models you trust.")]


def _quiet_libraries() -> None:
    # transformers/peft deprecation chatter is for library authors, not for someone running a fine-tune.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes' warning that the optional `kernels` package is missing is held by model/quant.py and said
    # only when a packed 4-bit CPU layer would have used that kernel.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@app.command()
def train(
    config: Annotated[Path | None,
        typer.Argument(metavar="CONFIG", help="YAML config (see configs/). Omit to use the defaults.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(metavar="[OVERRIDES]...", help=OVERRIDES_HELP,
                                                             show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint.")] = False,
    resume_from: Annotated[Path | None, typer.Option(help="Continue from this checkpoint folder.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (same as training.output_dir=...).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start afresh in a run folder that holds an earlier run, moving that run aside to "
                            "FOLDER.old-TIME (same as training.overwrite_output_dir=true).")] = False,
) -> None:
    """Fine-tune a model with LoRA/QLoRA.

    Writes the run folder: config.yaml, metrics.jsonl, checkpoints/, adapter/ (PEFT format), loss_curve.png.
    A folder that holds an earlier run is refused unless you --resume it or --overwrite it; one run at a
    time trains into a folder.

    Examples:

        loraforge train configs/qlora-llama2-7b.yaml

        loraforge train configs/demo.yaml training.max_steps=50 lora.r=16

        loraforge train configs/demo.yaml --resume
    """
    from loraforge.config import load_config
    from loraforge.train.trainer import LLAMATrainer

    extra = list(overrides or [])
    if config is not None and "=" in str(config):  # `loraforge train key=value` with no config file
        extra.insert(0, str(config))
        config = None
    if output_dir:
        extra.append(f"training.output_dir={output_dir}")
    if resume or resume_from:
        extra.append(f"training.resume_from_checkpoint={resume_from or 'latest'}")
    if overwrite:
        extra.append("training.overwrite_output_dir=true")
    cfg = load_config(config, extra)
    result = LLAMATrainer.from_config(cfg).train()
    typer.echo(f"done: {result.steps} steps in {result.train_seconds:.0f}s; adapter in {result.adapter_dir}")


@app.command("config")
def show_config() -> None:
    """List every setting with its default and what it does."""
    from loraforge.config import describe_fields

    typer.echo(describe_fields())


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder (from `loraforge train`) or adapter folder.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/eval).")] = None,
    data: Annotated[str | None,
        typer.Option(help="Evaluate on this data instead of the run's validation split.")] = None,
    samples: Annotated[int | None, typer.Option(help="Held-out prompts to generate and score.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate per answer.")] = None,
    decoding: Annotated[str | None, typer.Option(help="beam, greedy or sample.")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Run these lm-evaluation-harness tasks instead "
                                                    "(base and fine-tuned), e.g. --tasks arc_easy,hellaswag.")] = None,
    include: Annotated[Path | None, typer.Option(help="With --tasks: a folder of your own lm-eval task YAMLs.")] = None,
    limit: Annotated[float | None, typer.Option(help="With --tasks: examples per task (a fraction if < 1).")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Compare the base model and the fine-tuned one on the same held-out data.

    Writes report.html (self-contained), report.md and eval_results.json with perplexity, BLEU,
    ROUGE-1/2/L for both models, the loss curve, and sample answers side by side. With --tasks, runs
    lm-evaluation-harness (pip install 'loraforge[eval]') on both and writes lm_eval_results.json.
    """
    if tasks:
        from loraforge.eval.harness import run_harness, table

        names = [t for item in tasks for t in item.split(",") if t.strip()]  # --tasks a,b or --tasks a --tasks b
        found = run_harness(run, names, include_path=include, limit=int(limit) if limit and limit >= 1 else limit,
                            out_dir=out, log=typer.echo, trust_remote_code=trust_remote_code)
        for task, metric, base, tuned in table(found):
            typer.echo(f"{task:24s} {metric:16s} base {base if base is None else f'{base:.4f}'}  "
                       f"fine-tuned {tuned:.4f}")
        typer.echo(f"results: {found['path']}")
        return
    from loraforge.eval.compare import compare_run

    overrides = {k: v for k, v in {"num_generation_samples": samples, "max_new_tokens": max_new_tokens,
                                   "decoding": decoding}.items() if v is not None}
    results = compare_run(run, out_dir=out, data=data, eval_overrides=overrides, trust_remote_code=trust_remote_code)
    typer.echo(f"report: {results['report']['html']}")


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="Run folder, adapter folder, or model.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    file: Annotated[Path | None, typer.Option(help="A file of prompts: .txt (one per line) or .jsonl.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write JSONL results here (default: print).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per answer.")] = 256,
    decoding: Annotated[str, typer.Option(help="greedy, beam (the run's eval.num_beams wide) or sample.")] = "greedy",
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate answers with the fine-tuned model, using the template it was trained with."""
    from loraforge.infer.generate import generate_cli

    generate_cli(run, prompts=prompt or [], file=file, out=out, max_new_tokens=max_new_tokens, decoding=decoding,
                 temperature=temperature, top_p=top_p, batch_size=batch_size, trust_remote_code=trust_remote_code)


@app.command()
def chat(
    run: Annotated[Path, typer.Argument(help="Run folder, adapter folder, or model.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Chat in the terminal with streaming replies. /reset clears the history, /exit quits."""
    from loraforge.infer.chat import chat_loop

    chat_loop(run, max_new_tokens=max_new_tokens, temperature=temperature, system=system,
              trust_remote_code=trust_remote_code)


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="Run folder or adapter folder.")],
    out: Annotated[Path, typer.Argument(help="Folder for the merged model.")],
    dtype: Annotated[str,
        typer.Option(help="bfloat16 or float16 (merging into 4-bit weights is never done).")] = "bfloat16",
    gguf: Annotated[bool, typer.Option(help="Also write a GGUF file for llama.cpp.")] = False,
    quant: Annotated[str | None, typer.Option(
        help="GGUF quantization: q8_0, or q4_k_m (needs llama.cpp's llama-quantize on PATH). Implies --gguf.")] = None,
    check: Annotated[bool, typer.Option(help="Compare the merged model with base + adapter (greedy tokens, "
                                             "logits) before writing it.")] = True,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Merge the adapter into a 16-bit copy of the base and write a standard Hugging Face folder."""
    from loraforge.infer.merge import merge_adapter

    result = merge_adapter(run, out, dtype=dtype, gguf=gguf, quant=quant, check=check,
                           trust_remote_code=trust_remote_code)
    typer.echo(result.parity.line() if result.parity else "parity check skipped (--no-check)")
    typer.echo(f"merged model written to {result.path}" + (f" (GGUF: {result.gguf_file})" if result.gguf_file else ""))


@app.command()
def serve(
    run: Annotated[list[Path], typer.Argument(help="Run or adapter folders (several adapters share one base).")],
    host: Annotated[str, typer.Option(help="Interface to listen on (beyond loopback: needs --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LORAFORGE_API_KEY", help="Require this bearer key.")] = None,
    insecure_no_key: Annotated[bool, typer.Option(
        "--insecure-no-key", help="Allow a non-loopback --host without an API key (refused otherwise).")] = False,
    max_concurrency: Annotated[int, typer.Option(help="Requests generated at once; more wait in a queue.")] = 8,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 4096,
    timeout: Annotated[float, typer.Option(help="Seconds before a generation is abandoned.")] = 120.0,
    fast_decode: Annotated[bool | None, typer.Option(
        "--fast-decode/--no-fast-decode",
        help="Static KV cache + CUDA-graph decode with stock's kernels (default: on a GPU).")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /."""
    from loraforge.serve.app import run_server

    run_server([str(r) for r in run], host=host, port=port, api_key=api_key, insecure_no_key=insecure_no_key,
               max_concurrency=max_concurrency, max_tokens_limit=max_tokens_limit,
               max_prompt_tokens=max_prompt_tokens, timeout=timeout, fast_decode=fast_decode,
               trust_remote_code=trust_remote_code)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="Override the number of training steps.")] = None,
    dpo: Annotated[bool, typer.Option("--dpo", help="Preference training instead: DPO on pairs built from chitchat "
                                      "(the human's reply chosen, the base model's own reply rejected).")] = False,
) -> None:
    """Fine-tune the embedded SmolLM2-135M on the embedded chitchat conversations, on the CPU, and show
    base vs fine-tuned perplexity and answers side by side. No network, about 6 minutes on 2 cores."""
    if dpo:
        from loraforge.demo import run_dpo_demo

        run_dpo_demo(out if out != Path("runs/demo") else Path("runs/demo-dpo"), steps=steps)
        return
    from loraforge.demo import run_demo

    run_demo(out, steps=steps)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Base YAML config.")],
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)] = None,
    trials: Annotated[int, typer.Option(help="Number of trials.")] = 10,
    space: Annotated[Path | None, typer.Option(help="YAML search space (default: lr, r, alpha, dropout).")] = None,
    out: Annotated[Path, typer.Option(help="Sweep folder.")] = Path("runs/sweep"),
) -> None:
    """Hyperparameter search with Optuna: short trials judged on validation loss, bad ones pruned."""
    from loraforge.train.sweep import run_sweep

    run_sweep(config, list(overrides or []), trials=trials, space=space, out=out)


@app.command()
def launch(
    config: Annotated[Path | None, typer.Argument(help="YAML config, as for `loraforge train`.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)] = None,
    processes: Annotated[int, typer.Option(help="Processes (GPUs) per node; default: all visible GPUs.")] = 0,
    nodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank (0 on the node at --main-address).")] = 0,
    main_address: Annotated[str | None, typer.Option(help="Rendezvous address: node 0's IP (several nodes).")] = None,
    main_port: Annotated[int, typer.Option(help="Rendezvous port on node 0.")] = 29500,
    strategy: Annotated[str, typer.Option(help="ddp, fsdp, deepspeed_zero2 or deepspeed_zero3.")] = "ddp",
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU processes with gloo (testing).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Run `loraforge train` on several GPUs or nodes through `accelerate launch` (see docs/distributed.md)."""
    import subprocess

    from loraforge.train.launch import launch_command, show

    if processes == 0:
        import torch

        processes = max(1, torch.cuda.device_count()) if not cpu else 2
    cmd = launch_command(config, list(overrides or []), processes=processes, nodes=nodes, node_rank=node_rank,
                         main_address=main_address, main_port=main_port, strategy=strategy, cpu=cpu)
    typer.echo(show(cmd), err=True)
    if not dry_run:
        raise typer.Exit(subprocess.call(cmd))


@app.command()
def bench(
    cases: Annotated[list[str] | None, typer.Option("--case", help="Benchmark case(s); default: all.")] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("bench/results"),
    max_context: Annotated[bool, typer.Option("--max-context", help="Search the longest trainable sequence.")] = False,
    shape: Annotated[str, typer.Option(help="Model shape for --max-context (llama3-8b, llama2-7b).")] = "llama3-8b",
    convergence: Annotated[bool, typer.Option("--convergence", help="Held-out perplexity after the same training "
                                              "under each path (stock, fast, graphs, NF4, ...).")] = False,
    device: Annotated[str, typer.Option(help="With --convergence: cuda or cpu (each has its own arms).")] = "cuda",
    arms: Annotated[list[str] | None, typer.Option("--arm", help="With --convergence: arm(s); default all.")] = None,
    steps: Annotated[int | None, typer.Option(help="With --convergence: steps per arm.")] = None,
) -> None:
    """GPU speed benchmark: the stock transformers+peft+bitsandbytes stack vs loraforge, same run.

    With --max-context: the longest batch-1 sequence each stack can train (QLoRA r=16 all-linear), found
    by search; the search state is saved, so a run stopped by its time budget continues where it stopped.
    """
    if convergence:
        import tempfile

        from loraforge.bench.convergence import DEFAULT_STEPS, run_convergence
        from loraforge.errors import ConfigError

        if device not in DEFAULT_STEPS:
            raise ConfigError(f"--device {device!r}: choose cuda or cpu.")
        run_convergence(device, arms or ["all"], steps or DEFAULT_STEPS[device], out,  # type: ignore[arg-type]
                        Path(tempfile.mkdtemp(prefix="loraforge-convergence-")), log=typer.echo)
        return
    if max_context:
        from loraforge.bench.max_context import run_max_context_bench
        from loraforge.bench.models import SHAPES
        from loraforge.errors import ConfigError

        if shape not in SHAPES or shape == "tiny":
            raise ConfigError(f"--shape {shape!r} is not a benchmark shape; choose one of "
                              f"{sorted(k for k in SHAPES if k != 'tiny')}")
        run_max_context_bench(out_dir=out, shape=shape)
        return
    from loraforge.bench.speed import run_speed_bench

    run_speed_bench(cases, out)


@runs_app.command("compare")
def runs_compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders.")],
    html: Annotated[Path | None, typer.Option(help="Where to write the loss curves page.")] = Path("runs-compare.html"),
) -> None:
    """The settings that differ between runs and their final metrics; an HTML page with the loss curves."""
    from loraforge.train.compare import compare_runs

    compare_runs(runs, html)
    if html is not None:
        typer.echo(f"loss curves: {html}", err=True)


@data_app.command("preview")
def data_preview(
    source: Annotated[str | None, typer.Argument(
        help="A file, a dataset id/folder, or 'chitchat'. Default: the config's data.dataset, or each of its "
             "data.sources in turn.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c",
        help="A run's YAML config: its data settings (template, column_mapping, max_length, ...) and tokenizer.")]
        = None,
    format: Annotated[str | None, typer.Option("--format", "-f",
        help="auto, alpaca, dialogue, chat, oasst, text.")] = None,
    n: Annotated[int, typer.Option("-n", help="Examples to show.")] = 3,
    max_length: Annotated[int | None, typer.Option(help="Truncation length (default: the config's, else 512).")]
        = None,
    model: Annotated[str | None, typer.Option(
        help="Model whose tokenizer and chat template to use (default: the config's, else the embedded model).")]
        = None,
    whole: Annotated[bool, typer.Option("--all", help="Measure every record (tokenizes the whole source and "
                                        "caches it), not the first 200.")] = False,
) -> None:
    """Show examples as the model will see them, trained-on tokens highlighted, with length statistics."""
    import dataclasses

    from loraforge.config import load_config
    from loraforge.data.mixing import source_config
    from loraforge.data.preview import preview

    overrides = [f"data.dataset={source}"] if source else []
    overrides += [f"data.format={format}"] if format else []
    overrides += [f"data.max_length={max_length}"] if max_length else []
    overrides += [f"model.model_name={model}"] if model else []
    run = load_config(config, overrides)
    # Combined mode: each source with its own format and column mapping, as training reads it.
    parts = [source_config(run.data, i) for i, s in enumerate(run.data.sources) if not source or s.path == source]
    for part in parts or [run.data]:
        preview(dataclasses.replace(part, format=format) if format else part, run.model, n=n, whole=whole)


def main() -> None:
    _quiet_libraries()
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    try:
        app(prog_name="loraforge")
    except LoraforgeError as e:
        err.print(f"[bold red]error:[/] {_escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as e:
        from loraforge.train.trainer import Preempted

        if isinstance(e, Preempted):
            err.print(f"[yellow]{_escape(str(e))}[/]")
            sys.exit(128 + e.signum)
        raise


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    main()
