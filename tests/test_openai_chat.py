"""The OpenAI surface's Chat Completions, Completions and Models, driven by the official
``openai`` SDK against a real gateway (and real workers where text is compared)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time

import openai
import pytest

from tests.conftest import ROOT
from worker.compat.chatstream import visible_text
from worker.compat.models import DEMO_ID, resolve_model
from worker.compat.translate import from_openai
from worker.errors import InvalidRequest, ModelNotFound

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def base(http) -> str:
    return f"{str(http.base_url).rstrip('/')}/v1"


def sdk(http, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=base(http), api_key=key, max_retries=0, timeout=60)


def request_id(completion_id: str) -> str:
    return completion_id.split("-", 1)[1]


def wait_status(http, rid: str, status: str, timeout: float = 10.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = http.get(f"/v1/generations/{rid}", headers=headers).json()
        if got["status"] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


# -- the request fields (no server) ---------------------------------------------------------


def test_openai_defaults_apply_only_on_the_openai_surface():
    """The sampling default is OpenAI's there (the token-limit defaults need the prompt's
    length: ``test_absent_max_tokens_is_the_context_left_capped_by_the_limit``)."""
    body = {"messages": MESSAGES, "model": "m", "user": "u"}
    assert from_openai({"url": "/v1/chat/completions", "body": body}) == {"messages": MESSAGES}
    assert from_openai(body, openai_defaults=True) == {"messages": MESSAGES, "temperature": 1.0}
    assert from_openai({**body, "temperature": 0, "max_completion_tokens": 5},
                       openai_defaults=True) == {
        "messages": MESSAGES, "temperature": 0, "max_new_tokens": 5}
    assert from_openai({"prompt": "Hi"}, url="/v1/completions", openai_defaults=True) == {
        "prompt": "Hi", "temperature": 1.0}
    assert from_openai({"prompt": ["Hi"], "max_tokens": 3, "echo": False, "logprobs": None},
                       url="/v1/completions") == {"prompt": "Hi", "max_new_tokens": 3}


def test_openai_fields_translate_and_unimplemented_ones_are_refused_by_name():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    got = from_openai({"messages": [{"role": "developer", "content": "be brief"},
                                    {"role": "user", "content": parts}],
                       "stop": "\n", "seed": 3, "top_p": 0.5, "max_tokens": 9, "temperature": None,
                       "n": 2, "logprobs": True, "top_logprobs": 3, "stream": False,
                       "response_format": {"type": "json_object"}})
    assert got == {"messages": [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "one\ntwo"}],
                   "stop": "\n", "seed": 3, "top_p": 0.5, "max_new_tokens": 9, "n": 2,
                   "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_object"}}
    legacy = from_openai({"prompt": "p", "logprobs": 2, "n": 3}, url="/v1/completions")
    assert legacy == {"prompt": "p", "logprobs": True, "top_logprobs": 2, "n": 3}
    refused = {"logit_bias": ({"logit_bias": {"5": 1}}, "logit_bias"),
               "tools": ({"tools": []}, "tools: not supported"),
               "best_of": ({"best_of": 2}, "best_of: 2 is not supported"),
               "image": ({"messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages[0].content[0]: only text parts"),
               "limits": ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
               "prompts": ({"prompt": ["a", "b"]}, "prompt: only one prompt")}
    for name, (extra, message) in refused.items():
        legacy = name in ("prompts", "best_of")
        url = "/v1/completions" if legacy else "/v1/chat/completions"
        base = {"prompt": "p"} if name == "best_of" else {} if legacy else {"messages": MESSAGES}
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            from_openai({**base, **extra}, url=url)
    with pytest.raises(InvalidRequest, match=re.escape("body.messages[0].content[0]")):
        from_openai({"url": "/v1/chat/completions", "body": {"messages": [
            {"role": "user", "content": [{"type": "input_audio"}]}]}})


def test_model_names_select_the_adapter():
    bases = {DEMO_ID: ["a", "b"]}
    assert resolve_model(None, bases) is None
    assert resolve_model("", bases) is None
    assert resolve_model(DEMO_ID, bases) is None
    assert resolve_model("demo", bases) is None
    assert resolve_model("a", bases) == "a"
    assert resolve_model(f"{DEMO_ID}:b", bases) == "b"
    assert resolve_model("demo:b", bases) == "b"
    for name in ("gpt-4o", f"{DEMO_ID}:c", "c"):
        with pytest.raises(ModelNotFound):
            resolve_model(name, bases)


def test_streamed_text_holds_back_what_may_still_change():
    assert visible_text("Hello wor", []) == "Hello wor"
    assert visible_text("Hello\ufffd", []) == "Hello"  # half a UTF-8 character so far
    assert visible_text("Hello\nUs", ["\nUser"]) == "Hello"  # may become the stop string
    assert visible_text("Hello\nUser: hi", ["\nUser"]) == "Hello"
    assert visible_text("Hello\nThere", ["\nUser"]) == "Hello\nThere"


# -- the gateway without workers ------------------------------------------------------------


def test_models_without_workers_are_the_configured_ones(gateway):
    api = sdk(gateway())
    assert [m.id for m in api.models.list()] == [DEMO_ID]
    assert api.models.retrieve(DEMO_ID).owned_by == "genqueue"
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.code == "model_not_found"


def test_bad_key_is_an_authentication_error(gateway):
    http = gateway(api_keys="team-a:ka")
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(http, "wrong").chat.completions.create(model="demo", messages=MESSAGES)
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(http, "wrong").models.list()


def test_full_queue_is_a_rate_limit_error(gateway):
    http = gateway(max_pending=1)
    assert http.post("/v1/generations", json={"prompt": "fill"}).status_code == 202
    with pytest.raises(openai.RateLimitError) as err:
        sdk(http).chat.completions.create(model="demo", messages=MESSAGES)
    assert err.value.code == "queue_full"
    assert int(err.value.response.headers["retry-after"]) > 0


def test_invalid_fields_are_bad_requests_naming_the_field(gateway):
    api = sdk(gateway())
    cases = [({"n": 17}, "n: "),
             ({"response_format": {"type": "json_schema", "json_schema": {
                 "name": "s", "schema": {"type": "array", "uniqueItems": True}}}},
              "response_format: Unimplemented keys"),
             ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": "data:,"}}]}]},
              "messages[0].content[0]"),
             ({"stream_options": {"include_usage": True}}, "stream_options"),
             ({"temperature": 99}, "temperature")]
    for extra, field in cases:
        kwargs = {"model": "demo", "messages": MESSAGES, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(**kwargs)
        assert field in err.value.message, (extra, err.value.message)
    with pytest.raises(openai.BadRequestError) as err:  # above OpenAI's (and vLLM's) 2
        api.chat.completions.create(model="demo", messages=MESSAGES, temperature=2.5)
    assert err.value.param == "temperature" and err.value.code == "invalid_request"


def test_sync_timeout_is_504_naming_the_request_which_keeps_waiting(gateway):
    http = gateway(sync_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        sdk(http).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8)
    assert err.value.status_code == 504 and err.value.code == "timeout"
    assert time.monotonic() - started < 10
    rid = err.value.response.headers["x-genq-request-id"]
    assert rid in err.value.message
    assert err.value.response.headers["x-should-retry"] == "false"  # a retry would queue it again
    got = http.get(f"/v1/generations/{rid}").json()
    assert got["status"] == "queued"
    assert http.get("/demand").json()["interactive"] == 1
    # the default client retries 5xx; it must not here
    with pytest.raises(openai.APIStatusError):
        openai.OpenAI(base_url=base(http), api_key="x").chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=8)
    assert http.get("/demand").json()["interactive"] == 2


def test_disconnecting_from_a_queued_stream_cancels_it(gateway):
    http = gateway()
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "demo", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        rid = response.headers["x-genq-request-id"]
        first = next(response.iter_lines())
        chunk = json.loads(first.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert wait_status(http, rid, "cancelled")["status"] == "cancelled"


def test_completions_requests_are_interactive_and_owned_by_the_key(gateway):
    http = gateway(api_keys="team-a:ka,team-b:kb", sync_timeout_s=0.3)
    with pytest.raises(openai.APIStatusError) as err:
        sdk(http, "ka").completions.create(model="demo", prompt="Once", max_tokens=4)
    rid = err.value.response.headers["x-genq-request-id"]
    assert http.get("/demand").json()["interactive"] == 1
    assert http.get(f"/v1/generations/{rid}", headers={"authorization": "Bearer kb"}).status_code == 404
    assert http.get(f"/v1/generations/{rid}",
                    headers={"authorization": "Bearer ka"}).json()["status"] == "queued"


class FakeWorker:
    """Plays a worker on the result store: takes the next queued request and writes the given
    running snapshots, then its final record (no model, exact control over the text)."""

    def __init__(self, redis_url):
        from worker.queue.results import ResultStore

        self.store = ResultStore(redis_url, 3600)

    def next_request(self, timeout: float = 10.0, statuses=("queued",)) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key in self.store.redis.scan_iter("genq:r:*"):
                rid = (key.decode() if isinstance(key, bytes) else key).removeprefix("genq:r:")
                if ":" not in rid and self.store.get(rid)["status"] in statuses:
                    return rid
            time.sleep(0.02)
        raise AssertionError("no request queued")

    def run(self, snapshots: list[str], final: dict, pause: float = 0.15) -> str:
        from worker.schema import result_record

        rid = self.next_request()
        self.store.start([result_record(rid, "running", model="fake")], ["fake:1"], [False])
        for text in snapshots:
            pipe = self.store.redis.pipeline(transaction=False)
            self.store.progress([result_record(rid, "running", model="fake", text=text)], pipe)
            pipe.execute()
            time.sleep(pause)
        self.store.finish([result_record(rid, final.pop("status", "succeeded"), model="fake",
                                         **final)])
        return rid


def in_thread(fn, *args):
    import threading

    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def test_stream_deltas_never_take_back_text(gateway, redis_url):
    api, fake = sdk(gateway(sync_timeout_s=20)), FakeWorker(redis_url)
    usage = {"prompt_tokens": 5, "completion_tokens": 7}
    worker = in_thread(fake.run, ["Hel", "Hello\n", "Hello\nUs", "Hello\nUs caf\ufffd"],
                       {"text": "Hello\nUs café", "finish_reason": "length", "usage": usage})
    chunks = list(api.chat.completions.create(model="demo", messages=MESSAGES, stream=True,
                                              stop="\nUser", stream_options={"include_usage": True}))
    worker.join()
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == "Hello\nUs café"
    assert "\ufffd" not in "".join(deltas) and len(deltas) >= 3  # it streamed as it grew
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == 12
    # the stop string: the final text is cut before it, and nothing past the cut was sent
    worker = in_thread(fake.run, ["Hi", "Hi\nUs", "Hi\nUser: more"],
                       {"text": "Hi", "finish_reason": "stop_sequence", "usage": usage})
    chunks = list(api.completions.create(model="demo", prompt="x", stream=True, stop=["\nUser"]))
    worker.join()
    assert [c.choices[0].text for c in chunks if c.choices[0].text] == ["Hi"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_failed_requests_are_openai_errors(gateway, redis_url):
    api, fake = sdk(gateway(sync_timeout_s=20)), FakeWorker(redis_url)
    cases = [("prompt_too_long", openai.BadRequestError), ("invalid_request", openai.BadRequestError),
             ("out_of_memory", openai.InternalServerError), ("worker_lost", openai.InternalServerError)]
    for code, error in cases:
        worker = in_thread(fake.run, [], {"status": "failed",
                                          "error": {"code": code, "message": f"it {code}"}})
        with pytest.raises(error) as err:
            api.chat.completions.create(model="demo", messages=MESSAGES)
        worker.join()
        assert err.value.code == code and f"it {code}" in err.value.message
    worker = in_thread(fake.run, ["partial"], {"status": "failed",
                                               "error": {"code": "out_of_memory", "message": "oom"}})
    with pytest.raises(openai.APIError, match="oom"):
        list(api.chat.completions.create(model="demo", messages=MESSAGES, stream=True))
    worker.join()


def test_a_client_that_gives_up_waiting_cancels_its_request(gateway, redis_url):
    import httpx

    http = gateway()
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                  timeout=1.0)
    rid = FakeWorker(redis_url).next_request(statuses=("queued", "cancelled"))
    assert wait_status(http, rid, "cancelled")["status"] == "cancelled"  # noticed, cancelled


# -- with real workers ----------------------------------------------------------------------


@pytest.mark.slow
def test_chat_and_completions_match_the_engine(gateway, start_worker, demo_engine):
    start_worker()  # the real demo model
    http = gateway()
    api = sdk(http)
    assert DEMO_ID in [m.id for m in api.models.list()]
    expected = demo_engine.generate([{"messages": MESSAGES, "max_new_tokens": 24}])[0]

    done = api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24,
                                       temperature=0, user="someone", seed=1)
    assert done.object == "chat.completion" and done.model == "demo"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected["text"]
    assert done.choices[0].finish_reason == ("length" if expected["finish_reason"] == "length"
                                             else "stop")
    assert done.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert done.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert done.system_fingerprint.startswith("fp_")

    stream = api.chat.completions.create(model=DEMO_ID, messages=MESSAGES, max_completion_tokens=24,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    parts = [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}]
    as_parts = api.chat.completions.create(messages=parts, max_tokens=24, temperature=0,
                                           model="demo")
    assert as_parts.choices[0].message.content == expected["text"]

    prompt = "The capital of France is"
    plain = demo_engine.generate([{"prompt": prompt, "max_new_tokens": 12}])[0]["text"]
    text = api.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text == plain
    streamed = api.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain

    stopped = api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24,
                                          temperature=0, stop=expected["text"][8:11])
    cut = expected["text"][:expected["text"].find(expected["text"][8:11])]
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    streamed_stop = api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24,
                                                temperature=0, stop=[expected["text"][8:11]],
                                                stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed_stop if c.choices) == cut

    # OpenAI's default temperature (1: sampling), where genqueue's native default is greedy
    sampled = api.chat.completions.create(model="demo", messages=MESSAGES, seed=7, max_tokens=16)
    engine_sampled = demo_engine.generate([{"messages": MESSAGES, "max_new_tokens": 16,
                                            "temperature": 1.0, "seed": 7}])[0]["text"]
    assert sampled.choices[0].message.content == engine_sampled
    assert http.post("/v1/generations", json={"messages": MESSAGES, "seed": 7,
                                              "max_new_tokens": 16}).status_code == 202

    # README's example runs as written, against this gateway
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```text\n(.*?)```", readme, re.S)
                   if "openai.OpenAI(" in b and "chat.completions.create" in b)
    assert 'base_url="http://localhost:8000/v1"' in example
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.replace("http://localhost:8000/v1", base(http)), "README.md", "exec"),
             {})
    assert DEMO_ID in out.getvalue() and len(out.getvalue()) > 60


@pytest.mark.slow
def test_absent_max_tokens_writes_up_to_the_workers_limit(gateway, start_worker, tiny_model_dir):
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_MAX_NEW_TOKENS_LIMIT="20")
    api = sdk(gateway())
    done = api.chat.completions.create(model=str(tiny_model_dir), messages=MESSAGES, temperature=0)
    assert done.usage.completion_tokens == 20 and done.choices[0].finish_reason == "length"
    legacy = api.completions.create(model=str(tiny_model_dir), prompt="Hi", temperature=0)
    assert legacy.usage.completion_tokens == 16  # OpenAI's default, within the limit


def test_absent_max_tokens_is_the_context_left_capped_by_the_limit():
    """OpenAI's absent ``max_tokens``: chat writes what fits the context, capped by the
    workers' (else this gateway's) limit; legacy completions 16 if they fit."""
    from types import SimpleNamespace

    from worker.errors import PromptTooLong
    from worker.ops.settings import Settings
    from worker.submission.checker import Checker, OpenAIRoute
    from worker.tokencount import PromptCounter

    class Counter(PromptCounter):  # one token a character
        context_length, max_prompt_tokens = 100, None

        def __init__(self):
            pass

        def count_many(self, requests):
            return [len(r.get("prompt") or r["messages"][0]["content"]) for r in requests]

    def fit(n, limit=None, url="/v1/chat/completions"):
        workers = [{"max_new_tokens_limit": limit}] if limit else []
        owner = SimpleNamespace(settings=Settings(max_new_tokens_limit=50), raw_tokens=False,
                                _fleet_info=lambda: workers,
                                counter=SimpleNamespace(get=lambda: Counter()))
        body = ({"messages": [{"role": "user", "content": "x" * n}]} if "chat" in url
                else {"prompt": "x" * n})
        return Checker(owner, OpenAIRoute(url=url)).check(body)["max_new_tokens"]

    assert fit(10) == 50
    assert fit(10, limit=30) == 30  # the workers' limit
    assert fit(80) == 20  # the context left
    assert fit(10, url="/v1/completions") == 16 and fit(90, url="/v1/completions") == 10
    with pytest.raises(PromptTooLong):
        fit(100)


@pytest.mark.slow
def test_model_selects_the_adapter(gateway, start_worker, tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_ADAPTERS=f"a={tmp_path / 'lora'}")
    http = gateway()
    api = sdk(http)
    base_id = str(tiny_model_dir)
    assert [m.id for m in api.models.list()] == [base_id, "a"]
    for model, adapter in ((base_id, None), ("a", "a"), (f"{base_id}:a", "a"), (None, None)):
        kwargs = {"model": model} if model else {"model": ""}
        done = api.chat.completions.create(messages=MESSAGES, max_tokens=4, temperature=0, **kwargs)
        got = http.get(f"/v1/generations/{request_id(done.id)}").json()
        assert got["adapter"] == adapter, model
    for model in ("demo", "b", f"{base_id}:b"):  # the worker runs the tiny model, not demo
        with pytest.raises(openai.NotFoundError) as err:
            api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        assert err.value.code == "model_not_found"


@pytest.mark.slow
def test_disconnecting_mid_stream_cancels_the_request(gateway, start_worker, tiny_model_dir):
    start_worker(GENQ_MODEL=str(tiny_model_dir))
    http = gateway()
    body = {"model": str(tiny_model_dir), "messages": MESSAGES, "max_tokens": 2000,
            "temperature": 1.0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        rid = response.headers["x-genq-request-id"]
        content = ""
        for line in response.iter_lines():
            if line.startswith("data: {"):
                content += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if content:
                break
        assert wait_status(http, rid, "running")["status"] == "running"
    got = wait_status(http, rid, "cancelled")
    assert got["status"] == "cancelled" and got["finish_reason"] == "cancelled"
    assert got["usage"]["completion_tokens"] < 2000
