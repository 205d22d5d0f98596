"""LoRAX's REST API (`POST /generate`, `/generate_stream`, and `POST /` as LoRAX's router serves
it) over the same engine: a LoRAX request becomes a completions request, and the answer is
re-shaped into LoRAX's (TGI's) bodies and stream events.

Meaning, where it differs from LoRAX:
* `adapter_id` names an adapter already in the store; `adapter_source` and `api_token` are
  accepted and unused (nothing is downloaded).
* `merged_adapters` with `merge_strategy` `linear` (or none) runs the exact weighted mixture
  Σ w_k·B_k·A_k per layer (PEFT's `add_weighted_adapter(..., "cat")`), which is what a weighted
  merge of LoRA updates means. LoRAX's linear merge averages the A and the B factors separately,
  which adds cross terms B_i·A_j; the weights are used as given (not renormalised), as LoRAX does.
  `ties`, `dare_linear` and `dare_ties` are refused (400).
* Greedy unless `do_sample`, or a temperature ≠ 1, `top_k` or `top_p` asks for sampling (TGI's rule).
* `typical_p` and `watermark` are refused (400); `decoder_input_details` returns an empty `prefill`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from server.api.schemas import CompletionRequest, LoraxRequest, ResponseFormat, RoutingOptions
from server.engine.errors import InvalidRequest
from server.serving import completion_service as completions
from server.serving.completion_shapes import best, candidates
from server.state import Services

DEFAULT_MAX_NEW_TOKENS = 20  # LoRAX's default


def to_completion(req: LoraxRequest, stream: bool) -> CompletionRequest:
    p = req.parameters
    if p.adapter_id and p.merged_adapters:
        raise InvalidRequest("specify at most one of `adapter_id` and `merged_adapters`", param="parameters.adapter_id")
    if p.typical_p is not None and p.typical_p != 1.0:
        raise InvalidRequest("`typical_p` is not supported by this server", param="parameters.typical_p",
                             code="unsupported_parameter")
    if p.watermark:
        raise InvalidRequest("`watermark` is not supported by this server", param="parameters.watermark",
                             code="unsupported_parameter")
    routing = None
    if p.merged_adapters is not None:
        m = p.merged_adapters
        if m.merge_strategy not in (None, "linear"):
            raise InvalidRequest(f"merge_strategy {m.merge_strategy!r} is not supported: this server runs the exact "
                                 "linear mixture", param="parameters.merged_adapters.merge_strategy",
                                 code="unsupported_parameter")
        if len(m.ids) != len(m.weights) or len(set(m.ids)) != len(m.ids):
            raise InvalidRequest("`ids` and `weights` must have the same length, and ids must differ",
                                 param="parameters.merged_adapters")
        model, routing = "auto", RoutingOptions(weights=dict(zip(m.ids, m.weights, strict=True)))
    else:
        model = p.adapter_id or "base"
    sampled = p.do_sample or (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p not in (None, 1.0))
    temperature = (1.0 if p.temperature is None else p.temperature) if sampled else 0.0
    best_of = p.best_of if p.best_of and p.best_of > 1 else None
    if best_of and stream:
        raise InvalidRequest("`best_of` > 1 cannot be used with streaming", param="parameters.best_of")
    rf = p.response_format
    return CompletionRequest.model_construct(
        model=model, prompt=req.inputs, max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=temperature, top_p=p.top_p or 1.0, top_k=p.top_k or 0, n=1, stop=p.stop or None,
        stream=stream, stream_options=None, seed=p.seed,
        logprobs=p.return_k_alternatives or 0,  # the tokens' ids and log-probs feed `details`
        logit_bias=None, echo=False, user=None, routing=routing, repetition_penalty=p.repetition_penalty,
        ignore_eos=p.ignore_eos_token, truncate_prompt_tokens=p.truncate, best_of=best_of,
        guided_json=rf.schema_ if rf is not None and rf.schema_ is not None else None,
        response_format=ResponseFormat(type="json_object") if rf is not None and rf.schema_ is None else None)


def _finish(c: completions.Choice) -> str:
    if c.finish_reason == "stop":
        seq = c.seq
        return "eos_token" if seq.generated and seq.generated[-1] == seq.eos_token_id else "stop_sequence"
    return "length"


def _token(entry: Any, tok: Any, k: int) -> dict:
    token_id, logprob, top = entry
    out = {"id": token_id, "text": str(tok.decode([token_id])), "logprob": logprob if logprob is not None else 0.0,
           "special": token_id in tok.all_special_ids}
    if k and top:
        out["alternative_tokens"] = [{"id": i, "text": str(tok.decode([i])), "logprob": lp} for i, lp in top[:k]]
    return out


async def generate(req: LoraxRequest, creq: CompletionRequest, choices: list[completions.Choice], state: Services,
                   request: Request) -> dict:
    await completions.complete(creq, choices, state, request)
    (c,) = best(choices, 1, candidates(creq))
    p = req.parameters
    body: dict[str, Any] = {"generated_text": (req.inputs if p.return_full_text else "") + c.text}
    if p.details:
        tok = state.resident.tokenizer
        body["details"] = {
            "finish_reason": _finish(c), "prompt_tokens": len(c.seq.prompt_ids), "generated_tokens": c.tokens,
            "seed": c.seq.sampling.seed, "prefill": [],
            "tokens": [_token(e, tok, p.return_k_alternatives or 0) for e in (c.lp.entries if c.lp else [])]}
    return body


async def stream(req: LoraxRequest, creq: CompletionRequest, choices: list[completions.Choice], state: Services,
                 request: Request) -> AsyncIterator[str]:
    """TGI's server-sent events: one per token (`token`), the last with `generated_text` and
    `details`; an error as `{"error", "error_type"}`. No `[DONE]` (LoRAX sends none)."""
    tok, p = state.resident.tokenizer, req.parameters
    (c,) = choices
    sent = 0
    frames = completions.stream(creq, choices, state, request)
    try:
        async for frame in frames:
            payload = frame.removeprefix("data: ").strip()
            if payload == "[DONE]":
                continue
            body = json.loads(payload)
            if "error" in body:
                yield f"data: {json.dumps({'error': body['error'].get('message', ''), 'error_type': 'generation'})}\n\n"
                continue
            entries = c.lp.entries if c.lp else []
            if not body["choices"] or sent >= len(entries):
                continue
            event: dict[str, Any] = {"token": _token(entries[sent], tok, p.return_k_alternatives or 0),
                                     "generated_text": None, "details": None}
            sent += 1
            if body["choices"][0]["finish_reason"] is not None:
                event["generated_text"] = (req.inputs if p.return_full_text else "") + c.text
                event["details"] = {"finish_reason": _finish(c), "prompt_tokens": len(c.seq.prompt_ids),
                                    "generated_tokens": c.tokens, "seed": c.seq.sampling.seed}
            yield f"data: {json.dumps(event)}\n\n"
    finally:
        await frames.aclose()
