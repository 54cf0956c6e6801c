"""What produces the text behind the server: a *backend*.

- ``ModelBackend``: a loaded model and tokenizer. Chat messages go through the model's chat template
  (never our task prompt) or, for runs trained on the paper's plain prompts, the plain form; a
  ``/v1/completions`` prompt is continued as it is. Greedy when the request sets no temperature, seeded
  sampling when ``temperature > 0``; ``max_tokens`` and ``stop`` honoured. One generation at a time,
  behind a lock (generation already uses every core, and a fast tokenizer must not be used from two
  threads at once).
- ``ScriptedBackend``: canned replies (a list, or a function of the request) for tests that need exact,
  malformed or slow replies; it counts the requests it serves.
- ``load_backend``: a run directory or model name to a ``ModelBackend``.

Backends know nothing of HTTP; they raise ``RequestError`` for a request they cannot serve.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from memreason.serve.protocol import ChatRequest, Completion, CompletionRequest, RequestError
from memreason.tasks import Task

Request = ChatRequest | CompletionRequest


class Backend(Protocol):
    """What the server needs from whatever produces text.

    ``prepare`` checks a request against the backend's limits (raising ``RequestError``, e.g. 413 for an
    over-long prompt) before any reply header is sent; ``generate`` produces the completion, calling
    ``on_text`` with each new piece of text when streaming (the pieces concatenate to the final text).
    Both take a ``ChatRequest`` (messages) or a ``CompletionRequest`` (a plain prompt).
    """

    model_id: str
    task: Task | None

    def prepare(self, request: Request) -> Any: ...

    def generate(self, prepared: Any, on_text: Callable[[str], None] | None = None) -> Completion: ...


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(s) for s in stops if s]
    positions = [p for p in positions if p >= 0]
    return min(positions) if positions else None


def _refuse_json_format(request: Request) -> None:
    fmt = (getattr(request, "response_format", None) or {}).get("type", "text")
    if fmt != "text":
        raise RequestError(400, f"response_format {fmt!r} is not supported by this server: it cannot constrain "
                           "generation to JSON. Send no response_format (or type 'text') and validate the reply.",
                           param="response_format", code="unsupported_response_format")


class ScriptedBackend:
    """Canned replies, for tests: exact, malformed, failing or slow on purpose. ``stop`` is applied;
    ``max_tokens`` is not (a reply is served whole) and token counts are word counts.

    Args:
        replies: a list of texts served in order (the last one repeats), or a function
            ``reply(request) -> str``; the function may raise ``RequestError`` to make the server answer
            with that HTTP error (e.g. 503 to exercise a client's backoff).
        model_id (str, default "scripted").
        delay (float, default 0): seconds to wait before each reply (to test kills mid-run).
        task (Task | None): extracts ``answer`` in the structured reply.
        supports_response_format (bool, default True): accept ``response_format`` (recorded in
            ``requests``); when False, a request with a JSON response format gets a 400 like
            ``ModelBackend`` gives.

    Attributes:
        requests (list[ChatRequest | CompletionRequest]): every request served (or refused by the
            script), in order.
    """

    def __init__(self, replies: Sequence[str] | Callable[[Request], str], *, model_id: str = "scripted",
                 delay: float = 0.0, task: Task | None = None, supports_response_format: bool = True):
        self.model_id, self.delay, self.task = model_id, delay, task
        self.supports_response_format = supports_response_format
        self._replies = replies
        self._lock = threading.Lock()
        self.requests: list[Request] = []

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def prepare(self, request: Request) -> Request:
        if not self.supports_response_format:
            _refuse_json_format(request)
        return request

    def generate(self, prepared: Request, on_text: Callable[[str], None] | None = None) -> Completion:
        with self._lock:
            index = len(self.requests)
            self.requests.append(prepared)
        if self.delay:
            time.sleep(self.delay)
        if callable(self._replies):
            text = self._replies(prepared)
        else:
            text = self._replies[min(index, len(self._replies) - 1)]
        cut = _find_stop(text, prepared.stop)
        if cut is not None:
            text = text[:cut]
        if on_text:
            # a few pieces, so streaming clients see more than one chunk
            size = max(1, len(text) // 3)
            for start in range(0, len(text), size):
                on_text(text[start:start + size])
        if isinstance(prepared, CompletionRequest):
            prompt_words = len(prepared.prompt.split()) if isinstance(prepared.prompt, str) else len(prepared.prompt)
        else:
            prompt_words = sum(len(m["content"].split()) for m in prepared.messages)
        return Completion(text, prompt_words, len(text.split()), "stop")


@dataclass
class _Prepared:
    input_ids: list[int]
    max_new_tokens: int
    request: Request


class _Collector:
    """A transformers streamer: collects generated ids, cuts at a stop string, and hands ``on_text`` the
    text that can no longer change (held back: a possible stop-string prefix and an unfinished UTF-8
    character, which decodes as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, stops: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.on_text = tokenizer, tuple(s for s in stops if s), on_text
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = _find_stop(text, self.stops)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        if self.stopped:
            self._emit(len(text))
        else:
            safe = len(text) - self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            self._emit(safe)

    def end(self) -> None:
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if self.on_text and upto > self.sent:
            piece, self.sent = self.text[self.sent:upto], upto
            self.on_text(piece)


class ModelBackend:
    """Serve a loaded causal LM (base model or trained run).

    Args:
        model, tokenizer: as returned by ``memreason.model.load`` or carried by a ``Reasoner``.
        model_id (str): the name clients must send as ``model``.
        task (Task | None): extracts ``answer`` in the structured reply (a run's own task).
        prompt_style (str, default "auto"): how chat messages become a prompt. ``chat`` renders them with
            the chat template; ``plain`` (runs trained on the paper's plain prompts) joins the message
            contents with newlines, the last user turn in the run's ``Question: <q>`` form; ``auto`` = chat
            when the tokenizer has a template. ``/v1/completions`` prompts are used as sent in every style.
        max_context (int | None): most prompt + generated tokens; default the model's
            ``max_position_embeddings``.
        scheme (TokenScheme | None): the run's control-token scheme (default ``plain``), for the trace
            editor's revisions.

    Attributes:
        lock (threading.Lock): held by every use of the model and tokenizer (generation, and the trace
            editor built on this backend).
    """

    def __init__(self, model, tokenizer, model_id: str, *, task: Task | None = None, prompt_style: str = "auto",
                 max_context: int | None = None, scheme=None):
        from memreason.generate import eos_ids, pad_id
        from memreason.model.tokens import TokenScheme
        from memreason.prompts import resolve_style

        self.model, self.tokenizer, self.model_id, self.task = model, tokenizer, model_id, task
        self.scheme = scheme if scheme is not None else TokenScheme("plain")
        self.prompt_style = resolve_style(prompt_style, tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = min(limit, max_context) if max_context else limit
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = pad_id(tokenizer, self.eos_ids)
        # every use of the model and tokenizer holds this lock (the trace editor shares it)
        self.lock = threading.Lock()

    @classmethod
    def from_reasoner(cls, reasoner, model_id: str | None = None, **kwargs) -> "ModelBackend":
        """A backend for a ``memreason.load(...)`` result, keeping its task and prompt style."""
        return cls(reasoner.model, reasoner.tokenizer, model_id or reasoner.name, task=reasoner.task,
                   prompt_style=reasoner.prompt_style, scheme=reasoner.scheme, **kwargs)

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for the client's messages (chat template, or the plain form)."""
        if self.prompt_style == "chat":
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        parts = [m["content"].strip() for m in messages]
        if messages and messages[-1]["role"] == "user" and self.task is not None:
            parts[-1] = self.task.plain_prompt(parts[-1]).strip()
        return "\n".join(parts) + "\n"

    def _prompt_ids(self, request: Request) -> list[int]:
        from memreason.generate import encode_prompts

        if isinstance(request, CompletionRequest) and not isinstance(request.prompt, str):
            if not request.prompt:
                raise RequestError(400, "the prompt holds no token ids", param="prompt")
            vocab = len(self.tokenizer)
            if max(request.prompt) >= vocab:
                raise RequestError(400, f"token id {max(request.prompt)} is outside this model's vocabulary "
                                   f"(0..{vocab - 1})", param="prompt")
            return list(request.prompt)
        text = request.prompt if isinstance(request, CompletionRequest) else self.render(request.messages)
        with self.lock:
            return list(encode_prompts(self.tokenizer, [text])[0])

    def prepare(self, request: Request) -> _Prepared:
        _refuse_json_format(request)
        ids = self._prompt_ids(request)
        if len(ids) >= self.max_context:
            param = "prompt" if isinstance(request, CompletionRequest) else "messages"
            raise RequestError(413, f"the prompt has {len(ids)} tokens; this model's context holds "
                               f"{self.max_context} (prompt and reply together); shorten the {param}",
                               param=param, code="context_length_exceeded")
        # the reply is cut where the context ends (finish_reason "length"), as OpenAI-style servers do
        return _Prepared(ids, min(request.max_tokens, self.max_context - len(ids)), request)

    def generate(self, prepared: _Prepared, on_text: Callable[[str], None] | None = None) -> Completion:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        request = prepared.request
        collector = _Collector(self.tokenizer, request.stop, on_text)

        class _StopString(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), collector.stopped, dtype=torch.bool, device=input_ids.device)

        kwargs = dict(max_new_tokens=prepared.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                      streamer=collector, stopping_criteria=StoppingCriteriaList([_StopString()]))
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prepared.input_ids], device=device)  # [1, prompt_len]
        with self.lock:
            if request.temperature > 0:
                torch.manual_seed(request.seed)  # inside the lock: no other request moves the RNG meanwhile
            with torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        ended = collector.stopped or (bool(collector.ids) and collector.ids[-1] in self.eos_ids)
        return Completion(collector.text, len(prepared.input_ids), len(collector.ids), "stop" if ended else "length")


def load_backend(run_or_model: str | None = None, *, model_id: str | None = None, task: str | None = None,
                 dtype="auto", device="auto", max_context: int | None = None) -> ModelBackend:
    """Load a trained run or a base model (``memreason.load``) and wrap it for serving.

    Args:
        run_or_model: a run directory, a model dir, a ``.gguf`` file, a hub id, or None (embedded SmolLM2).
        model_id (str | None): the id clients send; default the run/model name (a path's last part).
        task (str | None): overrides the run's task for answer extraction.
        dtype, device: as in ``memreason.model.load``.
        max_context (int | None): see ``ModelBackend``.

    Raises:
        ModelLoadError: the run or model cannot be loaded.
    """
    from pathlib import Path

    import memreason

    reasoner = memreason.load(run_or_model, task=task, dtype=dtype, device=device)
    if model_id is None:
        model_id = Path(str(run_or_model)).name if run_or_model and Path(str(run_or_model)).exists() else reasoner.name
    return ModelBackend.from_reasoner(reasoner, model_id, max_context=max_context)
