"""`loraforge chat`: an interactive terminal chat with history and streamed replies.

Chat runs keep the whole conversation as messages and render it with the training template; alpaca
and text runs were trained on single prompts, so each turn is answered on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from threading import Event, Thread
from typing import Any, TextIO

import torch

from loraforge.infer.generation import Decoding, encode, generate_kwargs
from loraforge.infer.load import Loaded, load
from loraforge.model.runtime import model_device


class ChatSession:
    """A conversation with one loaded model; `reply` streams tokens to `on_text` as they are generated."""

    def __init__(self, loaded: Loaded, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7) -> None:
        self.loaded = loaded
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.history: list[dict[str, str]] = []
        self.last_interrupted = False  # the last reply was cut short by Ctrl-C
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_text(self, user: str) -> str:
        if self.loaded.data_kind == "chat":
            return self.loaded.formatter([*self.history, {"role": "user", "content": user}])
        return self.loaded.formatter(user)

    def reply(self, user: str, on_text: Callable[[str], Any] | None = None) -> str:
        """The answer to `user`, streamed to `on_text` piece by piece.

        Ctrl-C (KeyboardInterrupt) while it streams stops the generation after its current token and returns
        what was said so far, marked by `last_interrupted`. The generating thread is always joined before
        this returns: a process ending while that thread is inside torch aborts ("terminate called ...").
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer  # transformers takes seconds to import

        tok, model = self.loaded.tokenizer, self.loaded.model
        ids = torch.tensor([encode(tok, self.prompt_text(user))], device=model_device(model))
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        decoding = Decoding.from_temperature(self.temperature, 0.9, self.max_new_tokens)
        stop = Event()
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                                      **generate_kwargs(model, tok, decoding))
        error: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                error.append(e)
                streamer.end()

        worker = Thread(target=run, daemon=True)
        pieces: list[str] = []
        self.last_interrupted = False
        try:
            worker.start()
            for piece in streamer:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        except KeyboardInterrupt:
            self.last_interrupted = True
        finally:
            stop.set()  # no-op when generation already ended
            _join(worker)
        if error:
            raise error[0]
        answer = "".join(pieces).strip()
        if self.loaded.data_kind == "chat":
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


class _StopWhenSet:
    """A generate() stopping criterion that ends every row once `event` is set (checked after each token)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _join(worker: Thread) -> None:
    """Wait for `worker`, through further Ctrl-Cs: it stops within a token once asked, and leaving it running
    inside torch would abort the process at exit."""
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt:
            continue


def chat_loop(run: str | Path, *, max_new_tokens: int = 256, temperature: float = 0.7, system: str | None = None,
              input_fn: Callable[[str], str] = input, out: TextIO | None = None,
              trust_remote_code: bool = False) -> ChatSession:
    """Read lines, answer them with streamed text; `/reset` clears the history, `/exit` (or EOF) quits.

    Ctrl-C during a reply stops that reply and returns to the prompt; Ctrl-C at the prompt quits.
    """
    out = out or sys.stdout
    session = ChatSession(load(run, trust_remote_code=trust_remote_code), system=system,
                          max_new_tokens=max_new_tokens, temperature=temperature)
    out.write(f"chatting with {run} — /reset clears the history, /exit quits\n")
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            out.write("(history cleared)\n")
            continue
        try:
            out.write("bot> ")
            out.flush()
            session.reply(line, on_text=lambda piece: (out.write(piece), out.flush()))
            stopped = session.last_interrupted
        except KeyboardInterrupt:  # landed just before or after the streaming: the reply stops all the same
            stopped = True
        out.write(" (stopped)\n" if stopped else "\n")
    return session
