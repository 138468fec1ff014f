"""The twin server (`sim serve`, a subprocess) as real clients use it: the official `openai` SDK
(chat and completions streams, `get_final_completion()`, the Responses API's event stream and
`get_final_response()`, models.list / models.retrieve) and the `ollama` client (chat, generate,
ps, show, list, version). Every event is also checked against the SDK's own pydantic types."""
from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from test_twin import scenario
from twin_proc import serve

PROMPT = "one two three four five six seven"  # 7 prompt tokens
MSGS = [{"role": "user", "content": PROMPT}]
DEFAULT_MAX = 8  # test_twin.scenario's m1: default_max_tokens


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twin_clients")
    with serve(scenario(tmp, 0.002, name="clients"), tmp) as srv:
        yield srv.url


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20.0) as c:
        yield c


def words(s: str) -> int:
    return len(s.split())


# ---------------------------------------------------------------- chat completions
@pytest.mark.parametrize("kw, n, reason", [
    ({"max_tokens": 5, "extra_headers": {"X-Requested-Max-Tokens": "50"}}, 5, "stop"),  # natural length below the max
    ({}, DEFAULT_MAX, "stop"),  # no max: the model's default answer length, ended by itself
], ids=["natural", "default"])
def test_openai_chat_stream_final_completion(client, url, kw, n, reason):
    deltas = []
    with client.chat.completions.stream(model="m1", messages=MSGS, stream_options={"include_usage": True}, **kw) as s:
        for ev in s:
            if ev.type == "content.delta":
                deltas.append(ev.delta)
        final = s.get_final_completion()
    ch = final.choices[0]
    assert ch.finish_reason == reason
    assert words(ch.message.content) == n == len([d for d in deltas if d])
    assert final.usage.completion_tokens == n and final.usage.prompt_tokens == 7
    job = httpx.get(f"{url}/requests/{final.id}").json()
    assert job["output_tokens"] == n and job["status"] == "completed"


def test_openai_chat_stream_capped_is_length(client):
    """The SDK's parsing helpers refuse an answer cut by max_tokens (finish_reason "length"), as they
    do against OpenAI; the error carries the usage of what was generated."""
    with pytest.raises(openai.LengthFinishReasonError) as e:
        with client.chat.completions.stream(model="m1", messages=MSGS, max_tokens=6,
                                            stream_options={"include_usage": True}) as s:
            s.until_done()
            s.get_final_completion()
    assert e.value.completion.choices[0].finish_reason == "length"
    assert e.value.completion.usage.completion_tokens == 6 and words(e.value.completion.choices[0].message.content) == 6


def test_openai_chat_chunks_match_the_sdk_types_and_usage_only_when_asked(client, url):
    def raw(body):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=20.0) as r:
            assert r.status_code == 200
            data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [ChatCompletionChunk.model_validate(json.loads(d), strict=False) for d in data[:-1]]
    with_usage = raw({"model": "m1", "messages": MSGS, "max_tokens": 4, "stream": True,
                      "stream_options": {"include_usage": True}})
    without = raw({"model": "m1", "messages": MSGS, "max_tokens": 4, "stream": True})
    assert [c.usage for c in without] == [None] * len(without)
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4
    assert sum(1 for c in with_usage if c.usage is not None) == 1
    whole = client.chat.completions.create(model="m1", messages=MSGS, max_tokens=3)
    assert whole.choices[0].finish_reason == "length" and words(whole.choices[0].message.content) == 3
    assert whole.usage.total_tokens == 10


def test_openai_completions_stream_and_whole(client):
    got, usage, reasons = 0, None, []
    for c in client.completions.create(model="m1", prompt=PROMPT, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}):
        if c.choices:
            got += bool(c.choices[0].text)
            reasons.append(c.choices[0].finish_reason)
        if c.usage is not None:
            usage = c.usage
    assert got == 5 and usage.completion_tokens == 5 and usage.prompt_tokens == 7
    assert [r for r in reasons if r] == ["length"]
    whole = client.completions.create(model="m1", prompt=PROMPT, max_tokens=9,
                                      extra_headers={"X-Requested-Max-Tokens": "100"})
    assert whole.choices[0].finish_reason == "stop" and words(whole.choices[0].text) == 9


# ---------------------------------------------------------------- responses
SEQUENCE = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def test_openai_responses_stream_event_sequence_and_final_response(client, url):
    with client.responses.stream(model="m1", input=PROMPT) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    n = DEFAULT_MAX
    assert types == SEQUENCE + ["response.output_text.delta"] * n + TAIL + ["response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.status == "completed" and words(final.output_text) == n
    assert final.usage.output_tokens == n and final.usage.input_tokens == 7
    # every raw event also validates against the SDK's own union of stream event types
    adapter = TypeAdapter(ResponseStreamEvent)
    with httpx.stream("POST", f"{url}/v1/responses", json={"model": "m1", "input": PROMPT, "stream": True,
                                                            "max_output_tokens": 3}, timeout=20.0) as r:
        raw = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
    parsed = [adapter.validate_python(d) for d in raw]
    assert [p.type for p in parsed] == SEQUENCE + ["response.output_text.delta"] * 3 + TAIL + ["response.incomplete"]
    assert parsed[-1].response.incomplete_details.reason == "max_output_tokens"


def test_openai_responses_capped_and_whole(client):
    with client.responses.stream(model="m1", input=PROMPT, max_output_tokens=4) as s:
        events = list(s)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert sum(1 for e in events if e.type == "response.output_text.delta") == 4
    r = client.responses.create(model="m1", input=[{"role": "user", "content": PROMPT}])
    assert r.status == "completed" and words(r.output_text) == DEFAULT_MAX and r.usage.total_tokens == 7 + DEFAULT_MAX


# ---------------------------------------------------------------- models
def test_openai_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["m1", "off"]
    m = client.models.retrieve("m1")
    assert m.id == "m1" and m.object == "model" and m.owned_by == "servesim"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)


# ---------------------------------------------------------------- ollama
@pytest.fixture
def ol(url):
    return ollama.Client(host=url, timeout=20.0)


def test_ollama_chat_and_generate(ol):
    r = ol.chat(model="m1", messages=MSGS, options={"num_predict": 5})
    assert words(r.message.content) == 5 and r.eval_count == 5 and r.prompt_eval_count == 7 and r.done_reason == "length"
    parts = list(ol.chat(model="m1", messages=MSGS, stream=True, options={"num_predict": 4}))
    assert [p.done for p in parts] == [False] * 4 + [True] and parts[-1].eval_count == 4
    assert words("".join(p.message.content for p in parts)) == 4
    g = ol.generate(model="m1", prompt=PROMPT)  # no num_predict: the model's default length, ended by itself
    assert words(g.response) == DEFAULT_MAX and g.done_reason == "stop" and g.total_duration > 0
    gs = list(ol.generate(model="m1", prompt=PROMPT, stream=True, options={"num_predict": 3}))
    assert sum(1 for p in gs if p.response) == 3 and gs[-1].done and gs[-1].eval_count == 3
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model="nope", messages=MSGS)
    assert e.value.status_code == 404


def test_ollama_ps_show_list_version(ol, url):
    assert [m.model for m in ol.list().models] == ["m1"]  # the disabled model is not offered
    ps = ol.ps()
    assert [m.model for m in ps.models] == ["m1"] and ps.models[0].expires_at is not None
    show = ol.show("m1")
    assert show.modelinfo["general.architecture"] == "servesim" and show.details.family == "servesim"
    with pytest.raises(ollama.ResponseError):
        ol.show("nope")
    v = httpx.get(f"{url}/api/version").json()
    assert isinstance(v["version"], str) and v["version"].count(".") == 2
