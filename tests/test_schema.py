"""Request validation: clear messages naming the bad field."""

from __future__ import annotations

import pytest

from worker.errors import InvalidRequest
from worker.schema import validate_request


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "stop": [""]}, "non-empty"),
        ({"prompt": "a", "priority": "urgent"}, "priority"),
        ({"prompt": "a", "surprise": 1}, "surprise"),
        ({"prompt": "a", "max_tokens": 5}, "max_tokens: OpenAI's name: genqueue's request takes "
                                           "max_new_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"prompt": "\ud800"}, "unicode"),
        ({"prompt": "a", "metadata": {"k": "v" * 20000}}, "metadata"),
        ({"prompt": "a", "metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}},
         "deeper"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_requests_are_named(body, fragment):
    with pytest.raises(InvalidRequest) as info:
        validate_request(body)
    assert fragment in str(info.value)
    assert info.value.code == "invalid_request"


def test_limit_on_max_new_tokens():
    with pytest.raises(InvalidRequest, match="above the limit 64"):
        validate_request({"prompt": "a", "max_new_tokens": 65}, max_new_tokens_limit=64)


def test_defaults_and_single_stop_string():
    req = validate_request({"prompt": "a", "stop": "\n"})
    assert req.stop == ["\n"] and req.max_new_tokens == 256 and req.temperature == 0
    assert not req.samples


def test_thousands_deep_metadata_is_refused_not_a_recursion_error():
    deep: dict = {}
    node = deep
    for _ in range(5000):  # deeper than Python's recursion limit
        node["m"] = {}
        node = node["m"]
    with pytest.raises(InvalidRequest, match="deeper than"):
        validate_request({"prompt": "x", "metadata": deep})


def test_temperature_above_openais_two_is_refused_by_name():
    """vLLM refuses a temperature above 2 in the worker: every way in refuses it first, and the
    OpenAI routes name it as their ``param``."""
    from worker.compat.chatbody import openai_message

    assert validate_request({"prompt": "a", "temperature": 2.0}).temperature == 2.0
    with pytest.raises(InvalidRequest) as info:
        validate_request({"prompt": "a", "temperature": 2.000001})
    assert str(info.value).startswith("temperature: ") and info.value.code == "invalid_request"
    assert openai_message(info.value.message, {"max_new_tokens": "max_tokens"})[1] == "temperature"
