"""One chat answer from a loaded model, as text deltas: the streamed and the whole answer are the same text.

``TextAssembler`` turns the generated token ids into text pieces that can no longer change (an
incomplete UTF-8 character, the start of a possible stop string and trailing spaces are held back), cut
at the first stop string. A non-streamed answer is the concatenation of those same pieces, so a greedy
streamed answer equals the non-streamed one by construction. The answer's leading and trailing
whitespace is dropped, as ``loraops generate`` does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraops.train.generate import chat_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)


class TextAssembler:
    """Generated token ids in, text deltas out: each delta is final; their concatenation is the answer."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was generated: the answer ends before it

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; returns the text that became final (often empty)."""
        if self.stopped:
            return ""
        self.ids.extend(int(token) for token in token_ids)
        text = self._text()
        return self._advance(text.rstrip() if self.stopped else _settled(text, self.stop))

    def finish(self) -> str:
        """The rest of the answer once generation ended."""
        return self._advance(self._text().rstrip())

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()
        cut = min((index for index in (text.find(s) for s in self.stop) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _advance(self, settled: str) -> str:
        if not settled.startswith(self.sent):  # decoding changed text already sent: cannot take it back
            logger.warning("the decoded answer changed after it was streamed; the rest is sent as decoded")
            return ""
        delta, self.sent = settled[len(self.sent) :], settled
        return delta


def _settled(text: str, stop: Sequence[str]) -> str:
    """``text`` without what may still change: trailing spaces, an incomplete character, a stop string's start."""
    text = text.rstrip().rstrip("\ufffd")
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold].rstrip()


class _TokenSink:
    """A ``generate`` streamer (put/end): hands each new token to the assembler and emits what became final."""

    def __init__(self, assembler: TextAssembler, emit: Callable[[str], None]):
        self.assembler, self.emit = assembler, emit
        self.prompt_seen = False
        self.generated = 0

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.generated += len(ids)
        delta = self.assembler.push(ids)
        if delta:
            self.emit(delta)

    def end(self) -> None:
        pass


def _stopping(assembler: TextAssembler, cancelled: threading.Event | None):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            done = assembler.stopped or (cancelled is not None and cancelled.is_set())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def prompt_of(tokenizer, messages: Sequence[Mapping[str, str]]) -> str | list[Mapping[str, str]]:
    """The messages under the chat template; a base without one gets their contents as one text prompt."""
    if getattr(tokenizer, "chat_template", None):
        return list(messages)
    return "\n".join(message["content"] for message in messages)


def generate_answer(
    model,
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    sampling: Sampling,
    emit: Callable[[str], None],
    cancelled: threading.Event | None = None,
) -> Outcome:
    """Generate with ``model`` as it is now (its adapter set by the caller), emitting final text deltas."""
    import torch

    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in chat_inputs(tokenizer, prompt_of(tokenizer, messages)).items()}
    assembler = TextAssembler(tokenizer, sampling.stop)
    sink = _TokenSink(assembler, emit)
    options: dict[str, Any] = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=sampling.max_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=sink,
            stopping_criteria=_stopping(assembler, cancelled),
            **options,
        )
    rest = assembler.finish()
    if rest:
        emit(rest)
    ended = assembler.stopped or _ended_turn(model, tokenizer, assembler.ids)
    return Outcome(
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        completion_tokens=sink.generated,
        finish_reason="stop" if ended or sink.generated < sampling.max_tokens else "length",
    )


def _ended_turn(model, tokenizer, ids: Sequence[int]) -> bool:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return bool(ids) and ids[-1] in eos_ids
