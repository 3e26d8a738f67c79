"""The output processor: sampled tokens in, request state and :class:`RequestOutput` out.

It appends a request's new token, detokenizes incrementally, applies stop tokens, stop strings and
the length limit, and builds what the caller sees: the text it may show so far (holding back a
partial UTF-8 character and any tail that may still grow into a stop string). A structured
output's grammar matcher advances with each token here: the request stops once its JSON is complete
(``stop``), and fails (``error``) if its matcher did.
"""

from __future__ import annotations

from inference.request import FinishReason, Request, RequestOutput, TokenLogprob
from inference.tokenizer import Tokenizer


class OutputProcessor:
    """Per-request post-processing (engine thread only)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def append_token(
        self,
        request: Request,
        token_id: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
        now: float,
    ) -> FinishReason | None:
        """Record a sampled token; return why the request finishes with it, or None."""
        params = request.params
        request.output_token_ids.append(token_id)
        request.output_logprobs.append(logprob)
        request.output_top_logprobs.append(top)
        if request.first_token_time is None:
            request.first_token_time = now
        finish: FinishReason | None = None
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        grammar = request.grammar
        if grammar is not None and not grammar.accept(token_id):  # also a matcher that failed on its mask
            request.error = grammar.error
            finish = FinishReason.ERROR
        elif is_stop_token:
            finish = FinishReason.STOP
        elif grammar is not None and grammar.complete:
            finish = FinishReason.STOP  # nothing but EOS may follow: spare the step that would sample it
        elif len(request.output_token_ids) >= params.max_tokens:
            finish = FinishReason.LENGTH
        self._detokenize(request, upto=len(request.output_token_ids) - (1 if is_stop_token else 0), final=finish is not None)
        if params.stop:
            search_from = max(0, request.emitted_text_len - max(len(s) for s in params.stop))
            hits = [i for s in params.stop if (i := request.text.find(s, search_from)) >= 0]
            if hits:
                request.text = request.text[: min(hits)]
                finish = FinishReason.STOP
        return finish

    def _detokenize(self, request: Request, upto: int, final: bool) -> None:
        """Append the text of ``output_token_ids[read_offset:upto]`` to ``request.text``."""
        ids = request.output_token_ids
        window = ids[request.prefix_offset : upto]
        read = request.read_offset - request.prefix_offset
        if len(window) <= read:
            return
        delta = self.tokenizer.decode_window(window, read, request.params.skip_special_tokens, final)
        if delta:
            request.text += delta
            request.prefix_offset, request.read_offset = request.read_offset, upto

    def output(self, request: Request, new_ids: list[int], new_logprobs: list) -> RequestOutput:
        """The request's output now; advances what has been shown (``emitted_text_len``)."""
        text = request.text
        if not request.finished:
            # hold back a partial UTF-8 character and any tail that may still grow into a stop string
            visible = len(text)
            if text.endswith("\ufffd"):
                visible = len(text.rstrip("\ufffd"))
            if request.params.stop:
                visible = min(visible, len(text) - (max(len(s) for s in request.params.stop) - 1))
            visible = max(visible, request.emitted_text_len)
            text = text[:visible]
        delta = text[request.emitted_text_len :]
        request.emitted_text_len = len(text)
        logprobs = None
        if request.params.logprobs is not None:
            logprobs = [
                TokenLogprob(t, lp if lp is not None else float("nan"), tuple(top or ()))
                for t, lp, top in zip(request.output_token_ids, request.output_logprobs, request.output_top_logprobs)
            ]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=text,
            token_ids=list(request.output_token_ids),
            delta_text=delta,
            new_token_ids=new_ids,
            finished=request.finished,
            finish_reason=request.finish_reason,
            logprobs=logprobs,
            error=request.error,
            adapter_id=request.adapter_id,
            num_preemptions=request.num_preemptions,
            retry_after_s=request.retry_after_s,
        )
