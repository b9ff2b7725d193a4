"""Upper bounds of a request's tokens: the byte bound for text, the fixed caps, what must be refused."""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import estimate
from schemas.estimate import (
    ANTHROPIC_CLIENT_TOOL_TOKENS,
    ANTHROPIC_IMAGE_MAX_TOKENS,
    ANTHROPIC_TOOL_PROMPT_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    OPENAI_IMAGE_MAX_TOKENS,
    OPENAI_TOOL_PROMPT_TOKENS,
    PART_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    SCHEMA_PROMPT_TOKENS,
    TOOL_DEFINITION_OVERHEAD_TOKENS,
    EstimateError,
    TokenBound,
    bound_request,
)

BASE = REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS  # one message, string content


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": 100, **extra}


def claude(content: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def gemini(parts: list[Any], **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": {"maxOutputTokens": 100}, **extra}


def error(provider: str, request: Any, **kwargs: Any) -> EstimateError:
    with pytest.raises(EstimateError) as info:
        bound_request(provider, request, **kwargs)
    return info.value


# -- text: one token per byte ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "make"),
    [
        ("openai", chat),
        ("openai", lambda text: {"input": text, "max_output_tokens": 10}),
        ("anthropic", claude),
        ("google", lambda text: gemini([{"text": text}])),
        ("mistral", chat),
    ],
)
@given(text=st.text(max_size=300))
@settings(max_examples=60, deadline=None)
def test_every_text_byte_counts_at_least_one_token(provider: str, make: Any, text: str) -> None:
    bound = bound_request(provider, make(text))
    assert bound.input_tokens >= len(text.encode("utf-8", "surrogatepass")) + REQUEST_OVERHEAD_TOKENS


@pytest.mark.parametrize("n", [0, 1, 17, 10_000])
def test_n_ascii_characters_bound_to_at_least_n_tokens(n: int) -> None:
    short = bound_request("openai", chat("")).input_tokens
    assert bound_request("openai", chat("x" * n)).input_tokens == short + n


def test_multibyte_text_counts_bytes_not_characters() -> None:
    empty = bound_request("anthropic", claude("")).input_tokens
    text = "日本語のテキスト🙂"  # 8 characters of 3 bytes, one of 4
    assert len(text) == 9
    assert bound_request("anthropic", claude(text)).input_tokens - empty == len(text.encode()) == 28


def test_text_counts_in_its_longest_normalization() -> None:
    # NFKC expands these (a tokenizer that normalizes first sees the long form).
    empty = bound_request("openai", chat("")).input_tokens
    for text in ("㍿", "\ufdfa", "ﬁ", "é"):
        longest = max(len(unicodedata.normalize(f, text).encode()) for f in ("NFC", "NFD", "NFKC", "NFKD"))
        assert bound_request("openai", chat(text)).input_tokens - empty == max(longest, len(text.encode()))
    assert bound_request("openai", chat("\ufdfa")).input_tokens - empty == 33


def test_lone_surrogates_count_three_bytes() -> None:
    empty = bound_request("openai", chat("")).input_tokens
    assert bound_request("openai", chat("a\ud800")).input_tokens - empty == 4


@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
@settings(max_examples=200, deadline=None)
def test_structured_data_counts_at_least_its_compact_json_bytes(value: Any) -> None:
    walk = estimate._Walk("openai", "openai")
    size = walk._json_size(value, "request.x", False)
    compact = json.dumps(value, separators=(",", ":"))
    assert size >= len(compact.encode("utf-8", "surrogatepass"))
    assert size >= len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if json.dumps(value, ensure_ascii=False).isascii() and not any(isinstance(v, bool) for v in _leaves(value)):
        assert size == len(compact)  # exact for ASCII: tight where it is safe


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_roles_and_names_count() -> None:
    plain = bound_request("openai", chat("hi")).input_tokens
    named = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "name": "alice", "content": "hi"}]}
    assert bound_request("openai", named).input_tokens == plain + len("alice")


def test_the_exact_sum_for_a_simple_chat() -> None:
    request = {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "max_completion_tokens": 256,
        "temperature": 0.2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "seed": 7,
        "stop": ["\n"],
        "metadata": {"k": "v"},
    }
    bound = bound_request("openai", request)
    text = len("system") + len("Be brief.") + len("user") + len("Hello")
    assert bound == TokenBound(REQUEST_OVERHEAD_TOKENS + 2 * MESSAGE_OVERHEAD_TOKENS + text, 256, bound.notes)
    assert bound.notes == (
        f"input: text at one token per UTF-8 byte, in its longest Unicode normalization: {text} bytes",
        "input: chat format: 2 messages x 16 + 0 parts x 4 + 32 tokens",
        "output: request.max_completion_tokens (256)",
    )


# -- OpenAI chat ---------------------------------------------------------------------------------------------


def test_openai_chat_parts_tools_and_schema() -> None:
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    request = chat([{"type": "text", "text": "abc"}, {"type": "text", "text": "de"}], tools=tools, response_format=fmt)
    request["tool_choice"] = "auto"
    bound = bound_request("openai", request)
    structured = sum(len(json.dumps(v, separators=(",", ":"))) for v in (tools[0], fmt, "auto"))
    assert bound.input_tokens == (
        BASE
        + len("user")
        + 5
        + 2 * PART_OVERHEAD_TOKENS
        + structured
        + OPENAI_TOOL_PROMPT_TOKENS
        + TOOL_DEFINITION_OVERHEAD_TOKENS
        + SCHEMA_PROMPT_TOKENS
    )
    assert any("tool-use prompt openai adds" in note for note in bound.notes)


def test_openai_chat_tool_calls_count_names_arguments_and_results() -> None:
    arguments = json.dumps({"city": "Paris"})
    request = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": arguments}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }
    bound = bound_request("openai", request)
    text = len("userweather?assistantcall_1w") + len(arguments) + len("toolcall_1sunny")
    expected = REQUEST_OVERHEAD_TOKENS + 3 * MESSAGE_OVERHEAD_TOKENS + PART_OVERHEAD_TOKENS + text
    assert bound.input_tokens == expected + OPENAI_TOOL_PROMPT_TOKENS


def test_openai_images_are_capped_whatever_their_size() -> None:
    small = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
    big = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000, "detail": "high"}}
    empty = bound_request("openai", chat([])).input_tokens
    for part in (small, big):
        assert (
            bound_request("openai", chat([part])).input_tokens == empty + PART_OVERHEAD_TOKENS + OPENAI_IMAGE_MAX_TOKENS
        )
    two = bound_request("openai", chat([small, big]))
    assert two.input_tokens == empty + 2 * (PART_OVERHEAD_TOKENS + OPENAI_IMAGE_MAX_TOKENS)
    assert "input: 2 images x 48169 tokens, the most one image costs on any openai model" in two.notes


def test_image_caps_hold_the_published_maxima() -> None:
    assert OPENAI_IMAGE_MAX_TOKENS >= 2833 + 8 * 5667 >= 85 + 8 * 170  # gpt-4o-mini, gpt-4o at 2x4 tiles
    assert int(1536 * 2.46) + 1 <= OPENAI_IMAGE_MAX_TOKENS  # patch models (gpt-4.1-nano)
    assert ANTHROPIC_IMAGE_MAX_TOKENS >= math.ceil(2576 / 28) ** 2 >= 1568 * 1568 // 750 >= 1600


@pytest.mark.parametrize(
    ("part", "what"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "a file"),
        ({"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBER", "filename": "a.pdf"}}, "a file"),
    ],
)
def test_openai_audio_and_files_raise_unless_extra_input_tokens(part: dict[str, Any], what: str) -> None:
    request = chat(["ignored"]) | {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]}
    err = error("openai", request)
    assert err.field == "request.messages.0.content.1"
    assert err.message.startswith(f"request.messages.0.content.1 is {what},")
    assert "extra_input_tokens" in err.message
    without = bound_request("openai", chat([{"type": "text", "text": "see"}])).input_tokens
    bound = bound_request("openai", request, extra_input_tokens=5000)
    assert bound.input_tokens == without + PART_OVERHEAD_TOKENS + 5000
    assert any(n.startswith("input: extra_input_tokens 5000 added for what the request alone") for n in bound.notes)


def test_extra_input_tokens_is_added_even_when_nothing_needs_it() -> None:
    plain = bound_request("openai", chat("hi"))
    more = bound_request("openai", chat("hi"), extra_input_tokens=7)
    assert more.input_tokens == plain.input_tokens + 7
    assert "input: extra_input_tokens 7 added, as given by the caller" in more.notes


def test_n_multiplies_output() -> None:
    assert bound_request("openai", chat("hi", n=1)).output_tokens == 100
    bound = bound_request("openai", chat("hi", n=4))
    assert bound.output_tokens == 400
    assert "output: request.max_tokens (100) x request.n (4) choices" in bound.notes
    assert bound_request("openai", chat("hi", n=4)).input_tokens == bound_request("openai", chat("hi")).input_tokens


def test_max_completion_tokens_and_the_larger_of_both_limits() -> None:
    request = chat("hi")
    del request["max_tokens"]
    assert bound_request("openai", request | {"max_completion_tokens": 64}).output_tokens == 64
    assert bound_request("openai", request | {"max_completion_tokens": 64, "max_tokens": 500}).output_tokens == 500


def test_predicted_output_adds_to_the_output() -> None:
    prediction = {"type": "content", "content": "x" * 50}
    assert bound_request("openai", chat("hi", prediction=prediction)).output_tokens == 100 + 50 + PART_OVERHEAD_TOKENS
    parts = {"type": "content", "content": [{"type": "text", "text": "abc"}]}
    assert bound_request("openai", chat("hi", prediction=parts, n=2)).output_tokens == 2 * (100 + 3 + 4)


def test_unknown_fields_count_by_their_json_bytes_and_non_prompt_ones_do_not() -> None:
    plain = bound_request("openai", chat("hi")).input_tokens
    noise = {"temperature": 1.0, "top_p": 0.5, "user": "x" * 100, "metadata": {"a": "b" * 100}, "seed": 1}
    assert bound_request("openai", chat("hi", **noise)).input_tokens == plain
    bound = bound_request("openai", chat("hi", surprise={"text": "y" * 100}))
    assert bound.input_tokens == plain + len(json.dumps({"text": "y" * 100}, separators=(",", ":")))
    assert "input: unrecognised request fields counted by their JSON bytes: surprise" in bound.notes


def test_sdk_sentinels_and_extra_body() -> None:
    class NotGiven:
        pass

    plain = bound_request("openai", chat("hi"))
    assert bound_request("openai", chat("hi", temperature=NotGiven(), tools=NotGiven())) == plain
    moved = chat("hi")
    del moved["max_tokens"]
    bound = bound_request("openai", moved | {"extra_body": {"max_tokens": 9}, "extra_headers": {"x": "y"}})
    assert bound.output_tokens == 9
    assert "output: request.extra_body.max_tokens (9)" in bound.notes


@pytest.mark.parametrize(
    ("key", "value"),
    [("web_search_options", {}), ("data_sources", [{"type": "azure_search"}])],
)
def test_retrieval_fields_need_extra_input_tokens(key: str, value: Any) -> None:
    assert error("openai", chat("hi", **{key: value})).field == f"request.{key}"
    assert bound_request("openai", chat("hi", **{key: value}), extra_input_tokens=100).input_tokens > 100


def test_openai_compatible_providers_read_chat_but_have_no_image_cap() -> None:
    bound = bound_request("deepseek", chat("hello"))
    assert bound.input_tokens == bound_request("openai", chat("hello")).input_tokens
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    err = error("mistral", chat([image]))
    assert err.field == "request.messages.0.content.0"
    assert "publishes no maximum cost per image" in err.message


# -- OpenAI Responses ----------------------------------------------------------------------------------------


def test_responses_input_items_instructions_and_tools() -> None:
    request = {
        "model": "gpt-5",
        "instructions": "Be kind.",
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "hello"}, {"type": "input_image", "image_url": "u"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thought"}]},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}, "verbosity": "low"},
        "reasoning": {"effort": "high"},
        "max_output_tokens": 2000,
        "store": False,
    }
    bound = bound_request("openai", request)
    text = len("Be kind.") + len("user") + len("hello") + len("c1f{}") + len("c142") + len("thought")
    structured = len(json.dumps(request["tools"][0], separators=(",", ":"))) + len(
        json.dumps(request["text"]["format"], separators=(",", ":"))
    )
    assert bound.input_tokens == (
        REQUEST_OVERHEAD_TOKENS
        + 5 * MESSAGE_OVERHEAD_TOKENS
        + 3 * PART_OVERHEAD_TOKENS
        + text
        + OPENAI_IMAGE_MAX_TOKENS
        + structured
        + OPENAI_TOOL_PROMPT_TOKENS
        + TOOL_DEFINITION_OVERHEAD_TOKENS
        + SCHEMA_PROMPT_TOKENS
    )
    assert bound.output_tokens == 2000


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "request.input.0.content.0",
        ),
        ({"input": "hi", "previous_response_id": "resp_1"}, "request.previous_response_id"),
        ({"input": "hi", "conversation": "conv_1"}, "request.conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "request.prompt"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "request.tools.0"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "request.input.0"),
    ],
)
def test_responses_unboundable_parts(request_: dict[str, Any], field: str) -> None:
    assert error("openai", request_ | {"max_output_tokens": 10}).field == field
    assert bound_request("openai", request_ | {"max_output_tokens": 10}, extra_input_tokens=1).input_tokens > 1


def test_responses_needs_max_output_tokens_or_a_default() -> None:
    err = error("openai", {"input": "hi"})
    assert err.field == "request.max_output_tokens"
    bound = bound_request("openai", {"input": "hi"}, default_max_output=321)
    assert bound.output_tokens == 321
    assert "output: the request sets no max_output_tokens; default_max_output (321)" in bound.notes


def test_chat_and_responses_fields_cannot_mix() -> None:
    assert error("openai", chat("hi", input="x")).field == "request.messages"


# -- Anthropic -----------------------------------------------------------------------------------------------


def test_anthropic_system_blocks_tools_and_tool_results() -> None:
    tool = {"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object"}}
    request = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"c": "P"}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sun"}]}],
            },
        ],
        "tools": [tool],
        "tool_choice": {"type": "auto"},
        "temperature": 0,
        "metadata": {"user_id": "u"},
    }
    bound = bound_request("anthropic", request)
    text = len("You are terse.") + len("user") + len("Weather in Paris?") + len("assistant") + len("t1get_weather")
    text += len("user") + len("t1") + len("sun")
    structured = sum(len(json.dumps(v, separators=(",", ":"))) for v in (tool, {"c": "P"}, {"type": "auto"}))
    assert bound.input_tokens == (
        REQUEST_OVERHEAD_TOKENS
        + 4 * MESSAGE_OVERHEAD_TOKENS
        + 4 * PART_OVERHEAD_TOKENS
        + text
        + structured
        + ANTHROPIC_TOOL_PROMPT_TOKENS
        + TOOL_DEFINITION_OVERHEAD_TOKENS
    )
    assert bound.output_tokens == 1024


def test_anthropic_tool_prompt_allowance_holds_the_documented_figures() -> None:
    # Anthropic's table: 346 / 313 tokens on Claude 4.x, at most 530 (Claude 3 Opus, auto).
    assert ANTHROPIC_TOOL_PROMPT_TOKENS >= 530
    # bash 245, text editor 700, computer use 735 + a 466-499-token system prompt.
    assert max(245, 700, 735 + 499) <= ANTHROPIC_CLIENT_TOOL_TOKENS


def test_anthropic_defined_client_tools_get_their_allowance_and_server_tools_raise() -> None:
    base = claude("hi")
    bash = {"type": "bash_20250124", "name": "bash"}
    bound = bound_request("anthropic", base | {"tools": [bash]})
    expected = (
        len(json.dumps(bash, separators=(",", ":"))) + ANTHROPIC_CLIENT_TOOL_TOKENS + ANTHROPIC_TOOL_PROMPT_TOKENS
    )
    assert bound.input_tokens == bound_request("anthropic", base).input_tokens + expected
    err = error("anthropic", base | {"tools": [bash, {"type": "web_search_20250305", "name": "web_search"}]})
    assert err.field == "request.tools.1"
    assert "server tool 'web_search_20250305'" in err.message
    assert error("anthropic", base | {"mcp_servers": [{"type": "url", "url": "u"}]}).field == "request.mcp_servers"


def test_anthropic_images_are_capped_and_pdfs_raise() -> None:
    empty = bound_request("anthropic", claude([])).input_tokens
    for source in (
        {"type": "url", "url": "https://x/a.png"},
        {"type": "base64", "media_type": "image/png", "data": "A" * 99_999},
    ):
        block = {"type": "image", "source": source}
        assert (
            bound_request("anthropic", claude([block])).input_tokens
            == empty + PART_OVERHEAD_TOKENS + ANTHROPIC_IMAGE_MAX_TOKENS
        )
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}
    err = error("anthropic", claude([{"type": "text", "text": "read"}, pdf]))
    assert err.field == "request.messages.0.content.1.source"
    assert "a PDF or file document" in err.message
    nested = {"type": "tool_result", "tool_use_id": "t", "content": [pdf]}
    assert error("anthropic", claude([nested])).field == "request.messages.0.content.0.content.0.source"
    assert bound_request("anthropic", claude([pdf]), extra_input_tokens=3000).input_tokens >= 3000


def test_anthropic_text_documents_count_their_text_and_citations_double_it() -> None:
    empty = bound_request("anthropic", claude([])).input_tokens
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "z" * 100}, "title": "T"}
    assert bound_request("anthropic", claude([doc])).input_tokens == empty + PART_OVERHEAD_TOKENS + 101
    cited = doc | {"citations": {"enabled": True}}
    assert bound_request("anthropic", claude([cited])).input_tokens == empty + PART_OVERHEAD_TOKENS + 202 + 256


def test_anthropic_thinking_blocks_count_text_and_signature() -> None:
    empty = bound_request("anthropic", claude([])).input_tokens
    block = {"type": "thinking", "thinking": "hmm", "signature": "S" * 40}
    assert bound_request("anthropic", claude([block])).input_tokens == empty + PART_OVERHEAD_TOKENS + 43


def test_anthropic_output_covers_thinking() -> None:
    request = claude("hi", max_tokens=16000, thinking={"type": "enabled", "budget_tokens": 10000})
    assert bound_request("anthropic", request).output_tokens == 16000
    # Interleaved thinking may budget more than max_tokens across a turn: the larger one bounds.
    request = claude("hi", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 20000})
    assert bound_request("anthropic", request).output_tokens == 20000


def test_anthropic_structured_output_schema() -> None:
    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    plain = bound_request("anthropic", claude("hi")).input_tokens
    bound = bound_request("anthropic", claude("hi", output_config={"format": fmt, "effort": "low"}))
    assert bound.input_tokens == plain + len(json.dumps(fmt, separators=(",", ":"))) + SCHEMA_PROMPT_TOKENS


def test_anthropic_on_bedrock_and_vertex_by_anthropic_version() -> None:
    body = claude("hi")
    del body["model"]
    body["anthropic_version"] = "bedrock-2023-05-31"
    assert bound_request("bedrock", body) == bound_request("anthropic", claude("hi"))
    assert bound_request("vertex", body | {"anthropic_version": "vertex-2023-10-16"}).output_tokens == 100


# -- Gemini --------------------------------------------------------------------------------------------------


def test_gemini_contents_system_instruction_and_function_declarations() -> None:
    declaration = {"name": "f", "description": "d", "parameters": {"type": "OBJECT"}}
    request = {
        "systemInstruction": {"parts": [{"text": "sys"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "hello"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"x": 1}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"y": 2}}}]},
        ],
        "tools": [{"functionDeclarations": [declaration]}],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "generationConfig": {"maxOutputTokens": 500, "temperature": 0.1, "responseSchema": {"type": "OBJECT"}},
    }
    bound = bound_request("google", request)
    text = len("sys") + len("user") + len("hello") + len("model") + len("user")
    json_values = (declaration, {"name": "f", "args": {"x": 1}}, {"name": "f", "response": {"y": 2}})
    structured = sum(len(json.dumps(v, separators=(",", ":"))) for v in json_values)
    structured += len('{"functionCallingConfig":{"mode":"AUTO"}}') + len('{"type":"OBJECT"}')
    assert bound.input_tokens == (
        REQUEST_OVERHEAD_TOKENS
        + 4 * MESSAGE_OVERHEAD_TOKENS
        + 4 * PART_OVERHEAD_TOKENS
        + text
        + structured
        + estimate.GEMINI_TOOL_PROMPT_TOKENS
        + TOOL_DEFINITION_OVERHEAD_TOKENS
        + SCHEMA_PROMPT_TOKENS
    )
    assert bound.output_tokens == 500


def test_gemini_snake_case_keys() -> None:
    request = {
        "system_instruction": "sys",
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "generation_config": {"max_output_tokens": 50, "candidate_count": 3},
    }
    bound = bound_request("gemini", request)
    assert bound.output_tokens == 150
    assert "output: x request.generation_config.candidate_count (3) candidates" in bound.notes


def test_gemini_media_builtin_tools_and_cached_content_raise() -> None:
    image = {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}}
    err = error("google", gemini([{"text": "what is it?"}, image]))
    assert err.field == "request.contents.0.parts.1.inlineData"
    uploaded = {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://b/a.pdf"}}
    assert error("google", gemini([uploaded])).field == "request.contents.0.parts.0.fileData"
    assert (
        error("google", gemini([{"text": "q"}], tools=[{"googleSearch": {}}])).field == "request.tools.0.googleSearch"
    )
    assert error("google", gemini([{"text": "q"}], cachedContent="cachedContents/1")).field == "request.cachedContent"
    assert bound_request("google", gemini([image]), extra_input_tokens=300).input_tokens > 300


def test_gemini_output_candidates_and_thinking_budget() -> None:
    request = gemini([{"text": "q"}])
    request["generationConfig"] = {
        "maxOutputTokens": 100,
        "candidateCount": 2,
        "thinkingConfig": {"thinkingBudget": 50},
    }
    assert bound_request("google", request).output_tokens == 2 * 150
    request["generationConfig"]["thinkingConfig"] = {"thinkingBudget": -1}
    assert bound_request("google", request).output_tokens == 200
    err = error("google", {"contents": [{"parts": [{"text": "q"}]}]})
    assert err.field == "request.generationConfig.maxOutputTokens"


def test_gemini_openai_compatible_endpoint_reads_chat() -> None:
    bound = bound_request("gemini", chat("hello"))
    assert bound.input_tokens == bound_request("openai", chat("hello")).input_tokens


# -- limits and validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "request_", "field"),
    [
        ("openai", {"messages": []}, "request.max_completion_tokens"),
        ("anthropic", {"messages": []}, "request.max_tokens"),
        ("google", {"contents": []}, "request.generationConfig.maxOutputTokens"),
    ],
)
def test_missing_max_tokens_raises_unless_a_default_is_given(
    provider: str, request_: dict[str, Any], field: str
) -> None:
    err = error(provider, request_)
    assert err.field == field
    assert "no output limit" in err.message
    assert bound_request(provider, request_, default_max_output=777).output_tokens == 777


def test_default_multiplies_by_n() -> None:
    assert bound_request("openai", {"messages": [], "n": 3}, default_max_output=10).output_tokens == 30


@pytest.mark.parametrize("value", [0, -1, 1.5, "100", True, [100]])
@pytest.mark.parametrize(
    ("provider", "make", "field"),
    [
        ("openai", lambda v: {"messages": [], "max_tokens": v}, "request.max_tokens"),
        ("openai", lambda v: {"messages": [], "max_completion_tokens": v}, "request.max_completion_tokens"),
        ("openai", lambda v: {"messages": [], "max_tokens": 5, "n": v}, "request.n"),
        ("openai", lambda v: {"input": "x", "max_output_tokens": v}, "request.max_output_tokens"),
        ("anthropic", lambda v: {"messages": [], "max_tokens": v}, "request.max_tokens"),
        (
            "google",
            lambda v: {"contents": [], "generationConfig": {"maxOutputTokens": v}},
            "request.generationConfig.maxOutputTokens",
        ),
        (
            "google",
            lambda v: {"contents": [], "generationConfig": {"maxOutputTokens": 5, "candidateCount": v}},
            "request.generationConfig.candidateCount",
        ),
    ],
)
def test_bad_limits_name_their_field(provider: str, make: Any, field: str, value: Any) -> None:
    assert error(provider, make(value)).field == field


@pytest.mark.parametrize("value", [0, -5, 2.0, "1"])
def test_bad_default_and_extra(value: Any) -> None:
    assert error("openai", {"messages": []}, default_max_output=value).field == "default_max_output"
    if value != 0:
        assert error("openai", chat("x"), extra_input_tokens=value).field == "extra_input_tokens"


@pytest.mark.parametrize(
    ("provider", "request_", "field"),
    [
        ("openai", "not a mapping", "request"),
        ("openai", {"messages": "hi", "max_tokens": 1}, "request.messages"),
        ("openai", {"messages": ["hi"], "max_tokens": 1}, "request.messages.0"),
        ("openai", {"messages": [{"role": 1, "content": "x"}], "max_tokens": 1}, "request.messages.0.role"),
        ("openai", {"messages": [{"role": "user", "content": 5}], "max_tokens": 1}, "request.messages.0.content"),
        (
            "openai",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 1},
            "request.messages.0.content.0.text",
        ),
        (
            "openai",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}], "max_tokens": 1},
            "request.messages.0.content.0.text",
        ),
        (
            "openai",
            {"messages": [{"role": "user", "content": [{"text": "no type"}]}], "max_tokens": 1},
            "request.messages.0.content.0.type",
        ),
        ("openai", {"messages": [], "max_tokens": 1, "tools": {"a": 1}}, "request.tools"),
        ("openai", {"messages": [], "max_tokens": 1, "surprise": {"x": object()}}, "request.surprise.x"),
        ("anthropic", {"max_tokens": 1}, "request.messages"),
        (
            "anthropic",
            {"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]},
            "request.messages.0.content.1",
        ),
        ("anthropic", {"max_tokens": 1, "messages": [], "system": 42}, "request.system"),
        ("google", {"generationConfig": {"maxOutputTokens": 1}}, "request.contents"),
        (
            "google",
            {"contents": [{"parts": "hi"}], "generationConfig": {"maxOutputTokens": 1}},
            "request.contents.0.parts",
        ),
        (
            "google",
            {"contents": [{"parts": [{"text": ["x"]}]}], "generationConfig": {"maxOutputTokens": 1}},
            "request.contents.0.parts.0.text",
        ),
        ("", {"messages": []}, "provider"),
    ],
)
def test_wrong_types_name_the_field(provider: str, request_: Any, field: str) -> None:
    err = error(provider, request_)
    assert err.field == field
    assert isinstance(err, ValueError)
    assert err.message == str(err)


def test_nesting_too_deep_is_refused_not_crashed() -> None:
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    assert error("openai", chat("hi", surprise=deep)).field.startswith("request.surprise")


def test_huge_integers_still_count_at_least_their_digits() -> None:
    plain = bound_request("openai", chat("hi")).input_tokens
    big = 10**5000
    assert bound_request("openai", chat("hi", surprise=big)).input_tokens - plain >= 5001


def test_notes_say_what_each_part_is() -> None:
    bound = bound_request("anthropic", claude([{"type": "image", "source": {"type": "url", "url": "u"}}]))
    assert bound.notes[0].startswith("input: text at one token per UTF-8 byte")
    assert bound.notes[1].startswith("input: chat format:")
    assert "input: 1 images x 8464 tokens, the most one image costs on any anthropic model" in bound.notes
    assert bound.notes[-1] == "output: request.max_tokens (100), thinking included"


def test_token_bound_is_frozen() -> None:
    bound = bound_request("openai", chat("hi"))
    with pytest.raises(AttributeError):
        bound.input_tokens = 0  # type: ignore[misc]


def test_imports_nothing_of_ours_but_schemas() -> None:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(estimate.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {
        m for m in modules if m.split(".")[0] in {"ingest", "processors", "sinks", "query", "control", "meterstream"}
    }
    assert not ours
    assert not {m for m in modules if m.split(".")[0] in {"tiktoken", "openai", "anthropic"}}
