"""A guaranteed upper bound of one LLM chat request's input and output tokens, from the request alone.

No tokenizer is run (none is shipped and none can be downloaded). The bound rests on one fact and a few
published figures, and where neither reaches it refuses rather than guesses.

**Text** counts one token per UTF-8 byte. Byte-level BPE tokenizers (OpenAI's, Anthropic's, Llama 3's,
Mistral's Tekken) and SentencePiece with byte fallback (Llama 2, Gemma and Gemini) never emit more tokens
than the text has bytes: every token covers at least one byte, or one character, of what it encodes. The
bytes are taken in whichever Unicode normalization (none, NFC, NFD, NFKC, NFKD) makes the text longest,
since some tokenizers normalize first (NFKC turns the 3-byte "㍿" into the 12-byte "株式会社"). Every text
of the prompt counts: message contents, system prompts and instructions, roles, names, tool-call ids,
arguments and results, and thinking or reasoning carried over from earlier turns.

**The chat format** adds ``MESSAGE_OVERHEAD_TOKENS`` (16) per message or input item, for role markers,
separators and end-of-turn tokens; ``PART_OVERHEAD_TOKENS`` (4) per content part or block; and
``REQUEST_OVERHEAD_TOKENS`` (32) per request, for the start of text and the priming of the reply. The
published templates use at most half of each (OpenAI's cookbook counts 3 per message and 3 for the reply).

**Structured data** (tool definitions, response schemas, tool calls given as objects, and any request
field this module does not know to be outside the prompt) counts by the bytes of its compact JSON, in
the larger of its ASCII-escaped and UTF-8 forms. Providers render definitions in formats of their own, which
restate the same names, descriptions and types; the JSON bytes bound those. For the instructions a provider
wraps around them, fixed allowances are added: ``*_TOOL_PROMPT_TOKENS`` (1,024) once when tools are used,
``TOOL_DEFINITION_OVERHEAD_TOKENS`` (16) per tool, ``SCHEMA_PROMPT_TOKENS`` (256) per response schema, and
``ANTHROPIC_CLIENT_TOOL_TOKENS`` (2,048) per Anthropic-defined client tool (bash, text editor, computer,
memory), whose definitions the API expands. No provider publishes its rendering, so this is the one part of
the bound that rests on published sizes and wide margins rather than on a proof.

**Images** count a fixed maximum each: ``OPENAI_IMAGE_MAX_TOKENS`` (48,169), the largest high-detail image on
gpt-4o-mini, the costliest of every OpenAI model; ``ANTHROPIC_IMAGE_MAX_TOKENS`` (8,464), a square at the
largest long edge any Claude model keeps (2,576 px) in 28-px patches. Gemini tiles images by their pixel
size with no published ceiling, and other providers publish no figures, so there an image cannot be bounded.

**What the request alone cannot bound** (audio, video, PDFs and other files or documents, images without a
cap, stored state such as ``previous_response_id``, ``conversation``, prompt templates and ``cachedContent``,
and hosted tools such as web search, file search, code execution and MCP, whose results enter the context)
raises ``EstimateError`` naming the field, unless the caller passes ``extra_input_tokens``, a bound of their
own for all of it, which is then added.

**Output** is bounded by the request's own limit: ``max_completion_tokens`` or ``max_tokens`` (OpenAI chat;
if both are given, the larger), ``max_output_tokens`` (OpenAI Responses), ``max_tokens`` (Anthropic),
``generationConfig.maxOutputTokens`` (Gemini). Each provider counts reasoning or thinking tokens inside that
limit; an explicit thinking budget above it (Anthropic's interleaved thinking, Gemini's ``thinkingBudget``)
is counted as well. The limit is multiplied by ``n`` (OpenAI chat) or ``candidateCount`` (Gemini), and an
OpenAI predicted output adds its own tokens, because rejected prediction tokens are billed as output. A request
without a limit takes the caller's ``default_max_output``, and without one it raises ``EstimateError``.

Other providers' requests are read as OpenAI-compatible chat completions (or Responses). The bound then also
assumes their chat templates stay within the overheads above, and that their request fields this module does
not know add no more than their JSON bytes.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from schemas.usage import MAX_COUNT, canonical_provider

# -- chat format -------------------------------------------------------------------------------------------

#: Per message (or Responses input item): role markers, separators, end of turn. OpenAI's cookbook counts
#: 3 per message (4 for gpt-3.5-turbo-0301) plus 1 per name; ChatML, Llama 3, Gemma and Claude's turn markers
#: are at most about 8. 16 is twice the largest.
MESSAGE_OVERHEAD_TOKENS: Final = 16
#: Per content part or block: a separator between parts, and the dummy-prefix token SentencePiece puts
#: before each text it tokenizes separately.
PART_OVERHEAD_TOKENS: Final = 4
#: Per request: the start-of-text token and the reply priming (3 tokens, ``<|start|>assistant<|message|>``,
#: in OpenAI's cookbook), with room to spare.
REQUEST_OVERHEAD_TOKENS: Final = 32

# -- tools and schemas -------------------------------------------------------------------------------------

#: OpenAI publishes no size for the preamble its models get with tools (the "# Tools / namespace functions"
#: wrapper of the open harmony format is a few dozen tokens). A generous allowance, not a measured figure.
OPENAI_TOOL_PROMPT_TOKENS: Final = 1024
#: Anthropic's tool-use pricing table: the hidden tool-use system prompt is 346 tokens (tool_choice auto or
#: none) or 313 (any or tool) on Claude 4.x and 3.7 Sonnet; the largest figure listed is 530 (Claude 3 Opus,
#: auto). About twice that.
ANTHROPIC_TOOL_PROMPT_TOKENS: Final = 1024
#: Google publishes no figure for Gemini's function-calling preamble: the same generous allowance.
GEMINI_TOOL_PROMPT_TOKENS: Final = 1024
#: Any other (OpenAI-compatible) provider: nothing published, the same generous allowance.
OTHER_TOOL_PROMPT_TOKENS: Final = 1024
#: Per tool definition, for the wrapper each is rendered in (a comment line, ``type name = (_: ...) => any;``
#: or an XML element), on top of the JSON bytes of the definition.
TOOL_DEFINITION_OVERHEAD_TOKENS: Final = 16
#: Per Anthropic-defined client tool (``bash_*``, ``text_editor_*``, ``computer_*``, ``memory_*``), whose
#: short request entry the API expands into a full definition: bash 245 tokens, text editor 700, computer use
#: 735 plus its 466-499-token system prompt (Anthropic's tool docs); none published for memory. 2,048 covers each.
ANTHROPIC_CLIENT_TOOL_TOKENS: Final = 2048
#: Per response schema (OpenAI ``response_format`` / ``text.format``, Anthropic ``output_config.format``,
#: Gemini ``responseSchema``), for the instructions around it; the schema itself counts by its JSON bytes.
#: No provider publishes a figure: a generous allowance.
SCHEMA_PROMPT_TOKENS: Final = 256
#: Per Anthropic document with citations enabled, on top of counting its text twice (Anthropic says enabling
#: citations adds "a small number" of tokens, for a system prompt and for chunking into citable sentences).
CITATIONS_PROMPT_TOKENS: Final = 256

# -- images ------------------------------------------------------------------------------------------------

#: OpenAI (Images and vision guide). Tile models scale an image to fit 2048x2048, then its short side to 768,
#: so it covers at most 2x4 tiles of 512 px: 85 + 8 x 170 = 1,445 on gpt-4o, but gpt-4o-mini charges
#: 2,833 + 8 x 5,667 = 48,169 (its low-price multiplier). Patch models cap an image at 1,536 patches times a
#: multiplier of at most 2.46 (gpt-4.1-nano): 3,779. 48,169 holds for every OpenAI model.
OPENAI_IMAGE_MAX_TOKENS: Final = 2833 + 8 * 5667
#: Anthropic (Vision guide): an image costs one token per 28x28-px patch (earlier: width x height / 750),
#: after it is resized to the model's native resolution: 1,568 px on the long edge (~1,600 tokens) before
#: Opus 4.7, 2,576 px (~3.75 MP, ~4,800 tokens) since. A square at 2,576 px, ceil(2576 / 28)^2 = 8,464, holds
#: even if only the long-edge limit applied.
ANTHROPIC_IMAGE_MAX_TOKENS: Final = 92 * 92
#: The most one image can cost, per provider family; a family missing here has no published cap (Gemini 2.x
#: tiles images in 768-px tiles of 258 tokens with no stated maximum size), so its images need extra_input_tokens.
IMAGE_MAX_TOKENS: Final[Mapping[str, int]] = {
    "openai": OPENAI_IMAGE_MAX_TOKENS,
    "anthropic": ANTHROPIC_IMAGE_MAX_TOKENS,
}

TOOL_PROMPT_TOKENS: Final[Mapping[str, int]] = {
    "openai": OPENAI_TOOL_PROMPT_TOKENS,
    "anthropic": ANTHROPIC_TOOL_PROMPT_TOKENS,
    "google": GEMINI_TOOL_PROMPT_TOKENS,
    "other": OTHER_TOOL_PROMPT_TOKENS,
}

#: Structures nested deeper than this are refused (a JSON body is never this deep; it also stops cycles).
MAX_DEPTH: Final = 200

# Request fields that never reach the prompt, per request shape (SDK-only keyword arguments included).
_SDK_ONLY: Final = frozenset({"extra_headers", "extra_query", "extra_body", "timeout", "betas"})
_CHAT_NON_PROMPT: Final = _SDK_ONLY | {
    "model", "audio", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "metadata", "modalities",
    "parallel_tool_calls", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
    "temperature", "top_p", "user", "verbosity", "max_tokens", "max_completion_tokens", "n",
}  # fmt: skip
_RESPONSES_NON_PROMPT: Final = _SDK_ONLY | {
    "model", "background", "background_options", "include", "max_output_tokens", "max_tool_calls", "metadata",
    "parallel_tool_calls", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning",
    "safety_identifier", "service_tier", "store", "stream", "stream_options", "temperature", "top_logprobs",
    "top_p", "truncation", "user",
}  # fmt: skip
_ANTHROPIC_NON_PROMPT: Final = _SDK_ONLY | {
    "model", "max_tokens", "metadata", "service_tier", "stop_sequences", "stream", "temperature", "top_k", "top_p",
    "thinking", "anthropic_version", "anthropic_beta", "inference_geo", "speed", "user_profile_id", "workspace_id",
    "diagnostics", "cache_control",
}  # fmt: skip
_GEMINI_NON_PROMPT: Final = _SDK_ONLY | {"model", "safetySettings", "safety_settings", "labels"}

#: Request fields that pull content into the prompt from elsewhere: never bounded by the request alone.
_UNBOUNDED_KEYS: Final[Mapping[str, str]] = {
    "previous_response_id": "a stored earlier response, whose items become input",
    "conversation": "a stored conversation, whose items become input",
    "prompt": "a stored prompt template",
    "web_search_options": "web search, whose results become input",
    "data_sources": "retrieval from data sources, whose results become input",
    "mcp_servers": "MCP servers, whose tool definitions and results become input",
    "cachedContent": "cached content, which counts as input",
    "cached_content": "cached content, which counts as input",
    "plugins": "provider plugins, which may add input",
    "search_parameters": "live search, whose results become input",
}

#: Content types that are images, and content types the request cannot bound, wherever they appear.
_IMAGE_TYPES: Final = frozenset({"image_url", "input_image", "image", "computer_screenshot"})
_UNBOUNDED_TYPES: Final[Mapping[str, str]] = {
    "input_audio": "audio",
    "audio": "audio",
    "video": "video",
    "input_video": "video",
    "file": "a file",
    "input_file": "a file",
    "document": "a document",
    "container_upload": "a file uploaded to a container",
    "item_reference": "a reference to a stored item",
}
_GEMINI_MEDIA_KEYS: Final = ("inlineData", "inline_data", "fileData", "file_data")
#: Anthropic-defined client tools: the API expands their short entry into a full definition.
_ANTHROPIC_CLIENT_TOOLS: Final = ("bash_", "text_editor_", "computer_", "memory_")
#: Keys of known blocks and items that do not reach the prompt.
_BLOCK_NON_PROMPT: Final = frozenset({"type", "cache_control", "status"})


class EstimateError(ValueError):
    """A request whose tokens cannot be bounded. ``field`` is the request field at fault, e.g.
    ``request.max_tokens`` or ``request.messages.3.content.1``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class TokenBound:
    """Upper bounds of one request's input and output tokens."""

    input_tokens: int
    output_tokens: int
    #: what the bound covers and how each part was bounded, human-readable, stable wording
    notes: tuple[str, ...]


def bound_request(
    provider: str,
    request: Mapping[str, Any],
    *,
    default_max_output: int | None = None,
    extra_input_tokens: int = 0,
) -> TokenBound:
    """Upper bounds of the tokens of ``request`` (the JSON body, or the SDK's keyword arguments) to ``provider``.

    ``default_max_output`` bounds the output of a request that sets no limit; ``extra_input_tokens`` is the
    caller's bound for whatever the request alone cannot bound (files, audio, stored state...), and is added.
    """
    if not isinstance(provider, str) or not provider.strip():
        raise EstimateError("provider", "provider must be a non-empty string")
    if not isinstance(request, Mapping):
        raise EstimateError("request", f"request must be an object (the request body), got {_describe(request)}")
    default = None if default_max_output is None else _limit(default_max_output, "default_max_output")
    extra = _count(extra_input_tokens, "extra_input_tokens", minimum=0)
    body, paths = _flatten(request)
    family, shape = _shape(provider, body)
    walk = _Walk(family, canonical_provider(provider))
    _INPUTS[shape](walk, body, paths)
    output, output_notes = _OUTPUTS[shape](walk, body, paths, default)
    return walk.finish(extra, output, output_notes)


# -- the walk ----------------------------------------------------------------------------------------------


class _Walk:
    """Accumulates what the prompt holds while the request is read."""

    def __init__(self, family: str, provider: str) -> None:
        self.family = family
        self.provider = provider
        self.text_bytes = 0
        self.json_bytes = 0
        self.messages = 0
        self.parts = 0
        self.images = 0
        self.tools = 0
        self.tool_use = False
        self.client_tools = 0
        self.schemas = 0
        self.citations = 0
        self.unknown: list[str] = []
        self.unbounded: list[tuple[str, str]] = []
        self.prediction = 0

    def text(self, value: Any, field: str) -> None:
        if _absent(value):
            return
        if not isinstance(value, str):
            raise EstimateError(field, f"{field} must be a string, got {_describe(value)}")
        self.text_bytes += _text_bytes(value)

    def json(self, value: Any, field: str, *, media: bool = False) -> None:
        """Count ``value`` by its compact JSON bytes; with ``media``, also find images and files in it."""
        self.json_bytes += self._json_size(value, field, media)

    def rest(self, node: Mapping[str, Any], handled: frozenset[str], field: str) -> None:
        """Count the keys of a known block that this module does not read, by their JSON bytes."""
        for key, value in node.items():
            if key not in handled and key not in _BLOCK_NON_PROMPT and not _absent(value):
                self.json(value, f"{field}.{key}", media=True)

    def image(self, field: str) -> None:
        if self.family in IMAGE_MAX_TOKENS:
            self.images += 1
        else:
            self.cannot(field, f"an image, and {self.provider} publishes no maximum cost per image")

    def cannot(self, field: str, what: str) -> None:
        self.unbounded.append((field, what))

    def _json_size(self, value: Any, field: str, media: bool) -> int:
        total = 0
        stack: list[tuple[Any, str, int]] = [(value, field, 0)]
        while stack:
            node, path, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise EstimateError(path, f"{path} is nested more than {MAX_DEPTH} levels deep")
            if _absent(node):
                total += 4  # null
            elif isinstance(node, bool):
                total += 5
            elif isinstance(node, int):
                # bit_length / 3 >= the decimal digits; avoids str() of huge ints.
                total += len(str(node)) if -(10**100) < node < 10**100 else node.bit_length() // 3 + 2
            elif isinstance(node, float):
                total += len(json.dumps(node))
            elif isinstance(node, str):
                total += _json_str_bytes(node)
            elif isinstance(node, Mapping):
                if media:
                    self._media(node, path)
                total += 1 + max(len(node), 1)  # braces and commas
                for key, child in node.items():
                    if not isinstance(key, str):
                        raise EstimateError(path, f"{path} has a key that is not a string: {key!r}")
                    total += _json_str_bytes(key) + 1
                    stack.append((child, f"{path}.{key}", depth + 1))
            elif isinstance(node, list | tuple):
                total += 1 + max(len(node), 1)
                stack.extend((child, f"{path}.{i}", depth + 1) for i, child in enumerate(node))
            else:
                raise EstimateError(path, f"{path} must be JSON data, got {_describe(node)}")
        return total

    def _media(self, node: Mapping[str, Any], path: str) -> None:
        kind = node.get("type")
        if isinstance(kind, str):
            if kind in _IMAGE_TYPES:
                self.image(path)
            elif kind in _UNBOUNDED_TYPES:
                self.cannot(path, _UNBOUNDED_TYPES[kind])
        for key in _GEMINI_MEDIA_KEYS:
            if key in node and not _absent(node[key]):
                self.cannot(f"{path}.{key}", "inline or uploaded media")

    def finish(self, extra: int, output: int, output_notes: list[str]) -> TokenBound:
        if self.unbounded and extra == 0:
            field, what = self.unbounded[0]
            others = [f for f, _ in self.unbounded[1:]]
            also = f" (also: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
            raise EstimateError(
                field,
                f"{field} is {what}, whose tokens the request alone cannot bound{also}; "
                "pass extra_input_tokens with a bound for it, or give an estimate instead",
            )
        tool_prompt = TOOL_PROMPT_TOKENS[self.family] if self.tool_use or self.tools or self.client_tools else 0
        image_cap = IMAGE_MAX_TOKENS.get(self.family, 0)
        total = (
            REQUEST_OVERHEAD_TOKENS
            + self.messages * MESSAGE_OVERHEAD_TOKENS
            + self.parts * PART_OVERHEAD_TOKENS
            + self.text_bytes
            + self.json_bytes
            + self.images * image_cap
            + tool_prompt
            + self.tools * TOOL_DEFINITION_OVERHEAD_TOKENS
            + self.client_tools * ANTHROPIC_CLIENT_TOOL_TOKENS
            + self.schemas * SCHEMA_PROMPT_TOKENS
            + self.citations * CITATIONS_PROMPT_TOKENS
            + extra
        )
        notes = [
            f"input: text at one token per UTF-8 byte, in its longest Unicode normalization: {self.text_bytes} bytes",
            f"input: chat format: {self.messages} messages x {MESSAGE_OVERHEAD_TOKENS} + {self.parts} parts x "
            f"{PART_OVERHEAD_TOKENS} + {REQUEST_OVERHEAD_TOKENS} tokens",
        ]
        if self.json_bytes:
            notes.append(
                "input: tool definitions, schemas and other structured data at one token per byte of their "
                f"compact JSON: {self.json_bytes} bytes"
            )
        if tool_prompt:
            notes.append(f"input: tools: {tool_prompt} tokens allowed for the tool-use prompt {self.provider} adds")
        if self.tools:
            notes.append(
                f"input: {self.tools} tool definitions x {TOOL_DEFINITION_OVERHEAD_TOKENS} tokens for their wrappers"
            )
        if self.client_tools:
            notes.append(
                f"input: {self.client_tools} Anthropic-defined tools x {ANTHROPIC_CLIENT_TOOL_TOKENS} tokens for "
                "the definitions the API expands them into"
            )
        if self.schemas:
            notes.append(
                f"input: {self.schemas} response schemas x {SCHEMA_PROMPT_TOKENS} tokens for their instructions"
            )
        if self.citations:
            notes.append(
                f"input: {self.citations} documents with citations: text counted twice + "
                f"{CITATIONS_PROMPT_TOKENS} tokens each"
            )
        if self.images:
            notes.append(
                f"input: {self.images} images x {image_cap} tokens, the most one image costs on any {self.family} model"
            )
        if self.unknown:
            notes.append(f"input: unrecognised request fields counted by their JSON bytes: {', '.join(self.unknown)}")
        if extra:
            if self.unbounded:
                fields = ", ".join(f"{f} ({what.split(',')[0]})" for f, what in self.unbounded[:5])
                more = ", ..." if len(self.unbounded) > 5 else ""
                notes.append(
                    f"input: extra_input_tokens {extra} added for what the request alone cannot bound: {fields}{more}"
                )
            else:
                notes.append(f"input: extra_input_tokens {extra} added, as given by the caller")
        return TokenBound(total, output, (*notes, *output_notes))


# -- OpenAI chat completions (and OpenAI-compatible providers) ---------------------------------------------


def _chat_input(w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str]) -> None:
    if "messages" not in body:
        raise EstimateError("request.messages", "request.messages is required (a list of chat messages)")
    for key, value in body.items():
        field = paths[key]
        if key == "messages":
            for i, message in enumerate(_list(value, field)):
                _chat_message(w, message, f"{field}.{i}")
        elif key in ("tools", "functions"):
            for i, tool in enumerate(_list(value, field)):
                tf = f"{field}.{i}"
                kind = _type(tool, tf, default="function")
                if kind in ("function", "custom"):
                    w.tools += 1
                    w.json(tool, tf)
                else:
                    w.cannot(tf, f"the hosted tool {kind!r}, whose hidden definition and results become input")
        elif key in ("tool_choice", "function_call"):
            w.json(value, field)
        elif key == "response_format":
            _schema(w, value, field)
        elif key == "prediction":
            w.prediction = _prediction(value, field)
        else:
            _other_key(w, key, value, field, _CHAT_NON_PROMPT)


def _chat_message(w: _Walk, message: Any, field: str) -> None:
    _mapping(message, field)
    w.messages += 1
    for key, value in message.items():
        if _absent(value):
            continue
        kf = f"{field}.{key}"
        if key in ("role", "name", "tool_call_id", "refusal"):
            w.text(value, kf)
        elif key == "content":
            _chat_content(w, value, kf)
        elif key == "tool_calls":
            w.tool_use = True
            for i, call in enumerate(_list(value, kf)):
                _tool_call(w, call, f"{kf}.{i}")
        elif key == "function_call":
            w.tool_use = True
            _tool_call(w, {"type": "function", "function": value}, field, function_field=kf)
        elif key == "audio":
            w.cannot(kf, "an earlier audio response, referenced by id")
        else:
            w.json(value, kf, media=True)


def _chat_content(w: _Walk, content: Any, field: str) -> None:
    if isinstance(content, str):
        w.text(content, field)
        return
    for i, part in enumerate(_list(content, field, "a string or a list of content parts")):
        pf = f"{field}.{i}"
        kind = _type(part, pf)
        w.parts += 1
        if kind == "text":
            w.text(_required(part, "text", pf), f"{pf}.text")
            w.rest(part, frozenset({"text"}), pf)
        elif kind == "refusal":
            w.text(_required(part, "refusal", pf), f"{pf}.refusal")
        elif kind == "image_url":
            _required(part, "image_url", pf)
            w.image(pf)
        elif kind == "input_audio":
            w.cannot(pf, "audio")
        elif kind == "file":
            w.cannot(pf, "a file")
        else:
            w.json(part, pf, media=True)


def _tool_call(w: _Walk, call: Any, field: str, *, function_field: str | None = None) -> None:
    _mapping(call, field)
    w.parts += 1
    kind = call.get("type", "function")
    inner_key = "custom" if kind == "custom" else "function"
    inner = call.get(inner_key)
    if kind not in ("function", "custom") or not isinstance(inner, Mapping):
        w.json(call, field)
        return
    inner_field = function_field or f"{field}.{inner_key}"
    w.text(call.get("id"), f"{field}.id")
    w.text(inner.get("name"), f"{inner_field}.name")
    argument = "input" if kind == "custom" else "arguments"
    w.text(inner.get(argument), f"{inner_field}.{argument}")
    for key, value in inner.items():
        if key not in ("name", argument) and not _absent(value):
            w.json(value, f"{inner_field}.{key}")
    w.rest(call, frozenset({"id", inner_key}), field)


def _prediction(value: Any, field: str) -> int:
    """Tokens of a predicted output: rejected prediction tokens are billed as output on top of the reply."""
    _mapping(value, field)
    content = _required(value, "content", field)
    if isinstance(content, str):
        return _text_bytes(content) + PART_OVERHEAD_TOKENS
    total = 0
    for i, part in enumerate(_list(content, f"{field}.content", "a string or a list of text parts")):
        pf = f"{field}.content.{i}"
        _mapping(part, pf)
        text = _required(part, "text", pf)
        if not isinstance(text, str):
            raise EstimateError(f"{pf}.text", f"{pf}.text must be a string, got {_describe(text)}")
        total += _text_bytes(text) + PART_OVERHEAD_TOKENS
    return total


def _chat_output(
    w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str], default: int | None
) -> tuple[int, list[str]]:
    limits = [(paths[k], _limit(body[k], paths[k])) for k in ("max_completion_tokens", "max_tokens") if k in body]
    n = _count(body["n"], paths["n"], minimum=1) if "n" in body else 1
    if limits:
        field, limit = max(limits, key=lambda fl: fl[1])
        note = f"output: {field} ({limit})"
    elif default is not None:
        limit = default
        note = f"output: the request sets no max_completion_tokens or max_tokens; default_max_output ({default})"
    else:
        raise _no_limit("request.max_completion_tokens", "max_completion_tokens or max_tokens")
    notes = [f"{note} x request.n ({n}) choices" if n > 1 else note]
    output = limit * n
    if w.prediction:
        output += w.prediction * n
        notes.append(f"output: + {w.prediction} tokens per choice for the predicted output (rejected ones are billed)")
    return output, notes


# -- OpenAI Responses ---------------------------------------------------------------------------------------


def _responses_input(w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str]) -> None:
    for key, value in body.items():
        field = paths[key]
        if key == "input":
            if isinstance(value, str):
                w.messages += 1
                w.text(value, field)
            else:
                for i, item in enumerate(_list(value, field, "a string or a list of input items")):
                    _responses_item(w, item, f"{field}.{i}")
        elif key == "instructions":
            w.messages += 1
            w.text(value, field)
        elif key == "tools":
            for i, tool in enumerate(_list(value, field)):
                tf = f"{field}.{i}"
                kind = _type(tool, tf, default="function")
                if kind in ("function", "custom"):
                    w.tools += 1
                    w.json(tool, tf)
                else:
                    w.cannot(tf, f"the hosted tool {kind!r}, whose hidden definition and results become input")
        elif key == "tool_choice":
            w.json(value, field)
        elif key == "text":
            _mapping(value, field)
            for sub, subvalue in value.items():
                if sub == "format":
                    _schema(w, subvalue, f"{field}.format")
                elif sub != "verbosity" and not _absent(subvalue):
                    w.json(subvalue, f"{field}.{sub}", media=True)
        else:
            _other_key(w, key, value, field, _RESPONSES_NON_PROMPT)


def _responses_item(w: _Walk, item: Any, field: str) -> None:
    kind = _type(item, field, default="message")
    w.messages += 1
    if kind == "message":
        w.text(item.get("role"), f"{field}.role")
        if not _absent(item.get("content")):
            _responses_content(w, item["content"], f"{field}.content")
        w.rest(item, frozenset({"role", "content", "id"}), field)
    elif kind in ("function_call", "custom_tool_call"):
        w.tool_use = True
        argument = "arguments" if kind == "function_call" else "input"
        for key in ("call_id", "name", argument):
            w.text(item.get(key), f"{field}.{key}")
        w.rest(item, frozenset({"call_id", "name", argument, "id"}), field)
    elif kind in ("function_call_output", "custom_tool_call_output"):
        w.tool_use = True
        w.text(item.get("call_id"), f"{field}.call_id")
        if not _absent(item.get("output")):
            _responses_content(w, item["output"], f"{field}.output")
        w.rest(item, frozenset({"call_id", "output", "id"}), field)
    elif kind == "reasoning":
        for key in ("summary", "content"):
            if not _absent(item.get(key)):
                _responses_content(w, item[key], f"{field}.{key}")
        # The encrypted reasoning is restored into the context: its bytes stand in for its tokens.
        w.text(item.get("encrypted_content"), f"{field}.encrypted_content")
        w.rest(item, frozenset({"summary", "content", "encrypted_content", "id"}), field)
    elif kind == "item_reference":
        w.cannot(field, _UNBOUNDED_TYPES["item_reference"])
    else:
        w.json(item, field, media=True)


def _responses_content(w: _Walk, content: Any, field: str) -> None:
    if isinstance(content, str):
        w.text(content, field)
        return
    for i, part in enumerate(_list(content, field, "a string or a list of content parts")):
        pf = f"{field}.{i}"
        kind = _type(part, pf)
        w.parts += 1
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            w.text(_required(part, "text", pf), f"{pf}.text")
            w.rest(part, frozenset({"text"}), pf)
        elif kind == "refusal":
            w.text(_required(part, "refusal", pf), f"{pf}.refusal")
        elif kind == "input_image":
            w.image(pf)
        elif kind in ("input_file", "input_audio", "input_video"):
            w.cannot(pf, _UNBOUNDED_TYPES[kind])
        else:
            w.json(part, pf, media=True)


def _responses_output(
    w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str], default: int | None
) -> tuple[int, list[str]]:
    if "max_output_tokens" in body:
        field = paths["max_output_tokens"]
        limit = _limit(body["max_output_tokens"], field)
        return limit, [f"output: {field} ({limit}), reasoning included"]
    if default is not None:
        return default, [f"output: the request sets no max_output_tokens; default_max_output ({default})"]
    raise _no_limit("request.max_output_tokens", "max_output_tokens")


# -- Anthropic messages -------------------------------------------------------------------------------------


def _anthropic_input(w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str]) -> None:
    if "messages" not in body:
        raise EstimateError("request.messages", "request.messages is required (a list of messages)")
    for key, value in body.items():
        field = paths[key]
        if key == "system":
            w.messages += 1
            _anthropic_content(w, value, field)
        elif key == "messages":
            for i, message in enumerate(_list(value, field)):
                mf = f"{field}.{i}"
                _mapping(message, mf)
                w.messages += 1
                w.text(message.get("role"), f"{mf}.role")
                if not _absent(message.get("content")):
                    _anthropic_content(w, message["content"], f"{mf}.content")
                w.rest(message, frozenset({"role", "content"}), mf)
        elif key == "tools":
            for i, tool in enumerate(_list(value, field)):
                tf = f"{field}.{i}"
                kind = _type(tool, tf, default="custom")
                if kind == "custom":
                    w.tools += 1
                    w.json(tool, tf)
                elif kind.startswith(_ANTHROPIC_CLIENT_TOOLS):
                    w.client_tools += 1
                    w.json(tool, tf)
                else:
                    w.cannot(tf, f"the server tool {kind!r}, whose definition and results become input")
        elif key == "tool_choice":
            w.json(value, field)
        elif key in ("output_config", "output_format"):
            if key == "output_format":
                _schema(w, value, field)
                continue
            _mapping(value, field)
            for sub, subvalue in value.items():
                if sub == "format":
                    _schema(w, subvalue, f"{field}.format")
                elif sub != "effort" and not _absent(subvalue):
                    w.json(subvalue, f"{field}.{sub}", media=True)
        elif key == "container":
            if isinstance(value, Mapping) and value.get("skills"):
                w.cannot(f"{field}.skills", "skills, whose instructions and files become input")
        else:
            _other_key(w, key, value, field, _ANTHROPIC_NON_PROMPT)


def _anthropic_content(w: _Walk, content: Any, field: str) -> None:
    if isinstance(content, str):
        w.text(content, field)
        return
    for i, block in enumerate(_list(content, field, "a string or a list of content blocks")):
        _anthropic_block(w, block, f"{field}.{i}")


def _anthropic_block(w: _Walk, block: Any, field: str) -> None:
    kind = _type(block, field)
    w.parts += 1
    if kind == "text":
        w.text(_required(block, "text", field), f"{field}.text")
        w.rest(block, frozenset({"text"}), field)
    elif kind == "image":
        _required(block, "source", field)
        w.image(field)
    elif kind == "document":
        _anthropic_document(w, block, field)
    elif kind == "search_result":
        for key in ("source", "title"):
            w.text(block.get(key), f"{field}.{key}")
        if not _absent(block.get("content")):
            _anthropic_content(w, block["content"], f"{field}.content")
        w.rest(block, frozenset({"source", "title", "content", "citations"}), field)
    elif kind == "thinking":
        # The signature carries the full thinking, which the API may restore: count both.
        w.text(block.get("thinking"), f"{field}.thinking")
        w.text(block.get("signature"), f"{field}.signature")
    elif kind == "redacted_thinking":
        w.text(block.get("data"), f"{field}.data")
    elif kind in ("tool_use", "server_tool_use"):
        w.tool_use = True
        w.text(block.get("id"), f"{field}.id")
        w.text(block.get("name"), f"{field}.name")
        if "input" in block:
            w.json(block["input"], f"{field}.input")
        w.rest(block, frozenset({"id", "name", "input"}), field)
    elif kind == "tool_result":
        w.tool_use = True
        w.text(block.get("tool_use_id"), f"{field}.tool_use_id")
        if not _absent(block.get("content")):
            _anthropic_content(w, block["content"], f"{field}.content")
        w.rest(block, frozenset({"tool_use_id", "content", "is_error"}), field)
    elif kind == "tool_reference":
        w.text(block.get("tool_name"), f"{field}.tool_name")
    elif kind == "web_search_tool_result":
        w.cannot(field, "web search results, which the API decrypts into input")
    else:
        w.json(block, field, media=True)


def _anthropic_document(w: _Walk, block: Mapping[str, Any], field: str) -> None:
    source = _required(block, "source", field)
    sf = f"{field}.source"
    _mapping(source, sf)
    before = w.text_bytes
    kind = source.get("type")
    if kind == "text":
        w.text(_required(source, "data", sf), f"{sf}.data")
    elif kind == "content":
        _anthropic_content(w, _required(source, "content", sf), f"{sf}.content")
    else:
        w.cannot(sf, "a PDF or file document")
    for key in ("title", "context"):
        w.text(block.get(key), f"{field}.{key}")
    citations = block.get("citations")
    if isinstance(citations, Mapping) and citations.get("enabled"):
        w.citations += 1
        w.text_bytes += w.text_bytes - before
    w.rest(block, frozenset({"source", "title", "context", "citations"}), field)


def _anthropic_output(
    w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str], default: int | None
) -> tuple[int, list[str]]:
    if "max_tokens" in body:
        field = paths["max_tokens"]
        limit = _limit(body["max_tokens"], field)
        note = f"output: {field} ({limit}), thinking included"
    elif default is not None:
        limit = default
        note = f"output: the request sets no max_tokens; default_max_output ({default})"
    else:
        raise _no_limit("request.max_tokens", "max_tokens")
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping) and not _absent(thinking.get("budget_tokens")):
        field = f"{paths['thinking']}.budget_tokens"
        budget = _limit(thinking["budget_tokens"], field)
        if budget > limit:
            return budget, [note, f"output: {field} ({budget}) is larger and bounds the thinking across the turn"]
    return limit, [note]


# -- Gemini generateContent ---------------------------------------------------------------------------------


def _gemini_input(w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str]) -> None:
    if "contents" not in body:
        raise EstimateError("request.contents", "request.contents is required (a list of contents)")
    for key, value in body.items():
        field = paths[key]
        name = _camel(key)
        if name == "contents":
            for i, content in enumerate(_list(value, field)):
                _gemini_content(w, content, f"{field}.{i}")
        elif name == "systemInstruction":
            if isinstance(value, str):
                w.messages += 1
                w.text(value, field)
            else:
                _gemini_content(w, value, field)
        elif name == "tools":
            for i, tool in enumerate(_list(value, field)):
                tf = f"{field}.{i}"
                _mapping(tool, tf)
                for sub, subvalue in tool.items():
                    if _absent(subvalue):
                        continue
                    if _camel(sub) == "functionDeclarations":
                        for j, declaration in enumerate(_list(subvalue, f"{tf}.{sub}")):
                            w.tools += 1
                            w.json(declaration, f"{tf}.{sub}.{j}")
                    else:
                        w.cannot(f"{tf}.{sub}", f"the built-in tool {sub!r}, whose results become input")
        elif name == "toolConfig":
            w.json(value, field)
        elif name == "generationConfig":
            _mapping(value, field)
            for sub, subvalue in value.items():
                if _camel(sub.lstrip("_")) in ("responseSchema", "responseJsonSchema") and not _absent(subvalue):
                    w.schemas += 1
                    w.json(subvalue, f"{field}.{sub}")
        else:
            _other_key(w, key, value, field, _GEMINI_NON_PROMPT)


def _gemini_content(w: _Walk, content: Any, field: str) -> None:
    _mapping(content, field)
    w.messages += 1
    for key, value in content.items():
        if _absent(value):
            continue
        kf = f"{field}.{key}"
        if key == "role":
            w.text(value, kf)
        elif key == "parts":
            for i, part in enumerate(_list(value, kf)):
                _gemini_part(w, part, f"{kf}.{i}")
        else:
            w.json(value, kf, media=True)


def _gemini_part(w: _Walk, part: Any, field: str) -> None:
    _mapping(part, field)
    w.parts += 1
    for key, value in part.items():
        if _absent(value):
            continue
        kf = f"{field}.{key}"
        name = _camel(key)
        if name in ("text", "thoughtSignature"):
            w.text(value, kf)
        elif name in ("inlineData", "fileData"):
            w.cannot(kf, "inline or uploaded media (Gemini publishes no maximum cost per image, audio or file)")
        elif name in ("functionCall", "functionResponse"):
            w.tool_use = True
            w.json(value, kf, media=name == "functionResponse")
        elif name not in ("thought", "videoMetadata", "mediaResolution", "partMetadata"):
            w.json(value, kf, media=True)


def _gemini_output(
    w: _Walk, body: Mapping[str, Any], paths: Mapping[str, str], default: int | None
) -> tuple[int, list[str]]:
    config_key = next((k for k in body if _camel(k) == "generationConfig"), None)
    config: Mapping[str, Any] = body[config_key] if config_key is not None else {}
    base = paths[config_key] if config_key is not None else "request.generationConfig"
    keys = {_camel(k): k for k in config if not _absent(config[k])}
    if "maxOutputTokens" in keys:
        field = f"{base}.{keys['maxOutputTokens']}"
        limit = _limit(config[keys["maxOutputTokens"]], field)
        notes = [f"output: {field} ({limit}), thinking included"]
    elif default is not None:
        limit = default
        notes = [f"output: the request sets no maxOutputTokens; default_max_output ({default})"]
    else:
        raise _no_limit(f"{base}.maxOutputTokens", "generationConfig.maxOutputTokens")
    thinking = config.get(keys["thinkingConfig"]) if "thinkingConfig" in keys else None
    if isinstance(thinking, Mapping):
        budget_key = next((k for k in thinking if _camel(k) == "thinkingBudget"), None)
        if budget_key is not None and not _absent(thinking[budget_key]):
            field = f"{base}.{keys['thinkingConfig']}.{budget_key}"
            budget = _count(thinking[budget_key], field, minimum=-1)
            if budget > 0:
                limit += budget
                notes.append(f"output: + {field} ({budget}), in case thinking falls outside maxOutputTokens")
    candidates = 1
    if "candidateCount" in keys:
        candidates = _count(config[keys["candidateCount"]], f"{base}.{keys['candidateCount']}", minimum=1)
        if candidates > 1:
            notes.append(f"output: x {base}.{keys['candidateCount']} ({candidates}) candidates")
    return limit * candidates, notes


_INPUTS: Final[Mapping[str, Callable[[_Walk, Mapping[str, Any], Mapping[str, str]], None]]] = {
    "chat": _chat_input,
    "responses": _responses_input,
    "anthropic": _anthropic_input,
    "gemini": _gemini_input,
}
_OUTPUTS: Final[
    Mapping[str, Callable[[_Walk, Mapping[str, Any], Mapping[str, str], int | None], tuple[int, list[str]]]]
] = {
    "chat": _chat_output,
    "responses": _responses_output,
    "anthropic": _anthropic_output,
    "gemini": _gemini_output,
}
_RESPONSES_ONLY: Final = frozenset(
    {"input", "instructions", "max_output_tokens", "previous_response_id", "conversation", "text", "truncation"}
)


# -- helpers ------------------------------------------------------------------------------------------------


def _shape(provider: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """The provider family (image caps, tool allowance) and the request shape."""
    pid = canonical_provider(provider)
    if pid == "anthropic" or "anthropic_version" in body:
        return "anthropic", "anthropic"
    if pid == "google":
        if "contents" in body or "messages" not in body:
            return "google", "gemini"
        return "google", "chat"  # Gemini's OpenAI-compatible endpoint
    family = "openai" if pid in ("openai", "azure") else "other"
    responses = _RESPONSES_ONLY & body.keys() or isinstance(body.get("prompt"), Mapping)
    if "messages" in body and responses:
        raise EstimateError(
            "request.messages", "the request mixes chat completions (messages) and Responses fields (input, ...)"
        )
    return family, "responses" if responses else "chat"


def _flatten(request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The body without absent values, with SDK ``extra_body`` merged in; and each key's field path."""
    body: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for key, value in request.items():
        if not isinstance(key, str):
            raise EstimateError("request", f"request has a key that is not a string: {key!r}")
        if not _absent(value) and key != "extra_body":
            body[key], paths[key] = value, f"request.{key}"
    extra = request.get("extra_body")
    if not _absent(extra):
        if not isinstance(extra, Mapping):
            raise EstimateError("request.extra_body", f"request.extra_body must be an object, got {_describe(extra)}")
        for key, value in extra.items():
            if not _absent(value):
                body[str(key)], paths[str(key)] = value, f"request.extra_body.{key}"
    return body, paths


def _other_key(w: _Walk, key: str, value: Any, field: str, non_prompt: frozenset[str]) -> None:
    if key in non_prompt:
        return
    if key in _UNBOUNDED_KEYS:
        w.cannot(field, _UNBOUNDED_KEYS[key])
        return
    w.unknown.append(key)
    w.json(value, field, media=True)


def _schema(w: _Walk, value: Any, field: str) -> None:
    """A response format: its JSON bytes, plus the instructions' allowance unless it is plain text."""
    if _absent(value):
        return
    w.json(value, field)
    if not (isinstance(value, Mapping) and value.get("type") == "text"):
        w.schemas += 1


def _text_bytes(text: str) -> int:
    """UTF-8 bytes of ``text`` in whichever Unicode normalization makes it longest (lone surrogates: 3 each)."""
    if text.isascii():
        return len(text)
    longest = len(text.encode("utf-8", "surrogatepass"))
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        if not unicodedata.is_normalized(form, text):
            longest = max(longest, len(unicodedata.normalize(form, text).encode("utf-8", "surrogatepass")))
    return longest


def _json_str_bytes(text: str) -> int:
    """Bytes of ``text`` as a JSON string, the larger of its ASCII-escaped and UTF-8 forms."""
    escaped = len(json.dumps(text))
    if text.isascii():
        return escaped
    return max(escaped, _text_bytes(json.dumps(text, ensure_ascii=False)))


def _absent(value: Any) -> bool:
    # The OpenAI and Anthropic SDKs' "not given" sentinels, when SDK keyword arguments are passed verbatim.
    return value is None or type(value).__name__ in ("NotGiven", "Omit")


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _mapping(value: Any, field: str) -> None:
    if not isinstance(value, Mapping):
        raise EstimateError(field, f"{field} must be an object, got {_describe(value)}")


def _list(value: Any, field: str, what: str = "a list") -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise EstimateError(field, f"{field} must be {what}, got {_describe(value)}")
    return value


def _type(node: Any, field: str, default: str | None = None) -> str:
    _mapping(node, field)
    kind = node.get("type", default)
    if not isinstance(kind, str):
        raise EstimateError(f"{field}.type", f"{field}.type must be a string, got {_describe(kind)}")
    return kind


def _required(node: Mapping[str, Any], key: str, field: str) -> Any:
    value = node.get(key)
    if _absent(value):
        raise EstimateError(f"{field}.{key}", f"{field}.{key} is required")
    return value


def _count(value: Any, field: str, *, minimum: int) -> int:
    # bool is an int subclass: `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EstimateError(field, f"{field} must be an integer, got {_describe(value)}")
    if not minimum <= value <= MAX_COUNT:
        raise EstimateError(field, f"{field} must be between {minimum} and {MAX_COUNT}, got {value}")
    return value


def _limit(value: Any, field: str) -> int:
    return _count(value, field, minimum=1)


def _no_limit(field: str, names: str) -> EstimateError:
    return EstimateError(
        field,
        f"the request sets no output limit ({names}) and no default is configured, so its output cannot be "
        f"bounded; set {field.removeprefix('request.')}",
    )


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return type(value).__name__
