"""The OpenAI-compatible backends against a local stub server (tests/openai_stub.py), through the real client."""
import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fgaif_utils import llm
from fgaif_utils.facts import check_fact, extract_facts_rules
from openai_stub import Reply, StubServer, rules_answer

SECRET = "sk-test-NEVER-WRITE-ME-0123456789"          # the stub endpoint's key, in STUB_API_KEY
OPENAI_SECRET = "sk-openai-NEVER-SEND-TO-THE-STUB-42"   # OPENAI_API_KEY: only for api.openai.com
KEY_VARIABLE = "STUB_API_KEY"
WORLD_SUBSENTENCES = [
    "there is a large red heart",
    "a small blue square is to the left of a green triangle",
    "there is no circle",
    "i can see two yellow stars and a ring",
    "the heart is not red",
    "the star is above the ring",
    "in the image , there are no hearts or stars",
    "the picture contains a purple disc under a big orange box",
    "it looks calm",
    "a green triangle",
]
RESPONSE = " . ".join(WORLD_SUBSENTENCES) + " ."
ITEMS = [(part, RESPONSE) for part in WORLD_SUBSENTENCES]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


def extractor(stub, cache_dir, **knobs):
    knobs = {"concurrency": 4, "max_retries": 3, "timeout": 5, "backoff_base": 0.001, "progress": False,
             "api_key_env": KEY_VARIABLE, **knobs}
    return llm.OpenAIFactExtractor(knobs.pop("model", "gpt-3.5-turbo-0125"), base_url=stub.url,
                                   cache_dir=cache_dir, **knobs)


def rules_facts(subsentence):
    return [{k: v for k, v in fact.items() if k != "span"} for fact in extract_facts_rules(subsentence)]


def cache_files(cache_dir):
    return sorted(path for path in cache_dir.rglob("*.json"))


# ---- parsing and validation (no server) ----

def test_check_llm_fact_accepts_free_text_and_normalises():
    assert llm.check_llm_fact({"type": "relation", "subject": " Dog ", "relation": "next  to", "object": "bench",
                               "confidence": 0.9}) == \
        {"type": "relation", "subject": "dog", "relation": "next to", "object": "bench"}
    assert llm.check_llm_fact({"type": "attribute", "subject": "dog", "kind": "color", "value": "Brown"}) == \
        {"type": "attribute", "subject": "dog", "kind": "colour", "value": "brown"}
    assert llm.check_llm_fact({"type": "attribute", "subject": "bench", "kind": "other", "value": "wooden"})["kind"] \
        == "other"
    assert llm.check_llm_fact({"type": "object", "subject": "person", "negated": True})["negated"] is True
    # Why llm.py needs its own check: facts.check_fact only knows the synthetic world's relations and kinds.
    with pytest.raises(ValueError):
        check_fact({"type": "relation", "subject": "dog", "relation": "next to", "object": "bench"})


@pytest.mark.parametrize("fact, message", [
    ({"type": "object", "subject": "dog"}, "boolean 'negated'"),
    ({"type": "object", "subject": "dog", "negated": "false"}, "boolean 'negated'"),
    ({"type": "object", "subject": "  ", "negated": False}, "non-empty string 'subject'"),
    ({"type": "attribute", "subject": "dog", "kind": "shape", "value": "round"}, "'kind' in"),
    ({"type": "attribute", "subject": "dog", "kind": ["colour"], "value": "brown"}, "string 'kind'"),
    ({"type": "attribute", "subject": "dog", "kind": {"colour": "brown"}, "value": "brown"}, "string 'kind'"),
    ({"type": "object", "subject": ["dog"], "negated": False}, "non-empty string 'subject'"),
    ({"type": "attribute", "subject": "dog", "kind": "colour", "value": 3}, "non-empty string 'value'"),
    ({"type": "relation", "subject": "dog", "relation": "on"}, "non-empty string 'object'"),
    ({"type": "colour", "subject": "dog"}, "fact type must be one of"),
    (["object", "dog"], "must be a JSON object"),
])
def test_check_llm_fact_rejects(fact, message):
    with pytest.raises(ValueError, match=message):
        llm.check_llm_fact(fact)


def test_parse_facts_answer():
    good = '{"facts": [{"type": "object", "subject": "dog", "negated": false}]}'
    assert llm.parse_facts_answer(good) == ([{"type": "object", "subject": "dog", "negated": False}], None)
    assert llm.parse_facts_answer("```json\n" + good + "\n```")[0] == llm.parse_facts_answer(good)[0]
    assert llm.parse_facts_answer('{"facts": []}') == ([], None)
    assert "not valid JSON" in llm.parse_facts_answer("{'facts': []}")[1]   # python literal, not JSON
    assert "empty" in llm.parse_facts_answer("  ")[1]
    assert "empty" in llm.parse_facts_answer(None)[1]
    assert '"facts" list' in llm.parse_facts_answer("[]")[1]
    assert "invalid fact" in llm.parse_facts_answer('{"facts": [{"type": "object"}]}')[1]
    # a list or object where a string belongs is an unusable answer (repaired, else failed), never a TypeError
    for kind in ('["colour"]', '{"colour": "brown"}'):
        answer = '{"facts": [{"type": "attribute", "subject": "dog", "kind": %s, "value": "brown"}]}' % kind
        assert "string 'kind'" in llm.parse_facts_answer(answer)[1]
    number_subject = '{"facts": [{"type": "object", "subject": 3, "negated": true}]}'
    assert "string 'subject'" in llm.parse_facts_answer(number_subject)[1]
    assert '"facts" list' in llm.parse_facts_answer('{"facts": {"type": "object", "subject": "dog"}}')[1]
    # a degenerate answer nested deeper than the parser's recursion: unusable, never a RecursionError
    assert "nested too deeply" in llm.parse_facts_answer('{"facts": ' + "[" * 100_000 + "]" * 100_000 + "}")[1]


@pytest.mark.parametrize("text, answer", [
    ("Yes.", "yes"), ("no, it is brown", "no"), ("NO!", "no"), ("Answer: yes", "yes"), ("The answer is no.", "no"),
    ("yes or no", "yes"), ("either yes or no", "unknown"), ("maybe", "unknown"), ("", "unknown"),
    (None, "unknown"), ("Definitely not", "unknown"), ("yesterday", "unknown"),
    ("It is hard to say, yes", "unknown"),   # the sixth word is past "the first few"
])
def test_parse_yes_no(text, answer):
    assert llm.parse_yes_no(text) == answer


def test_prompt_few_shots_are_valid_and_cover_negation_relation_attributes():
    messages = llm.fact_messages("a dog", "a dog . a cat .")
    assert messages[0]["role"] == "system" and all(t in messages[0]["content"] for t in ("object", "attribute",
                                                                                          "relation"))
    roles = [message["role"] for message in messages[1:]]
    assert roles == ["user", "assistant"] * len(llm.FEW_SHOT) + ["user"]
    shots = [llm.parse_facts_answer(message["content"]) for message in messages[2:-1:2]]
    assert all(problem is None for _, problem in shots)
    all_facts = [fact for facts, _ in shots for fact in facts]
    assert any(fact["type"] == "object" and fact["negated"] for fact in all_facts)
    assert any(fact["type"] == "relation" for fact in all_facts)
    assert {fact["kind"] for fact in all_facts if fact["type"] == "attribute"} == {"colour", "size", "other"}
    assert messages[-1]["content"].endswith(f"{llm.SUBSENTENCE_LABEL} a dog")
    assert "a dog . a cat ." in messages[-1]["content"]


# ---- fact extraction over HTTP ----

def test_healthy_extraction_matches_rules_backend(stub, tmp_path):
    backend = extractor(stub, tmp_path)
    results = backend.extract_many(ITEMS)
    assert [result["facts"] for result in results] == [rules_facts(part) for part in WORLD_SUBSENTENCES]
    assert all(r["status"] == "ok" and r["error"] is None and not r["cached"] for r in results)
    rules = llm.make_fact_extractor("rules").extract_many(ITEMS)
    assert [[{k: v for k, v in f.items() if k != "span"} for f in r["facts"]] for r in rules] == \
        [r["facts"] for r in results]
    assert len(stub.requests) == len(ITEMS) == backend.usage["calls"]
    body = stub.requests[0]["body"]
    assert body["model"] == "gpt-3.5-turbo-0125" and body["temperature"] == 0.0
    assert body["response_format"] == {"type": "json_object"}
    assert all(request["headers"]["authorization"] == f"Bearer {SECRET}" for request in stub.requests)
    assert backend.usage["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in stub.answered) > 0
    assert backend.usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in stub.answered) > 0
    expected_cost = (backend.usage["prompt_tokens"] * 0.50 + backend.usage["completion_tokens"] * 1.50) / 1e6
    assert backend.estimated_cost_usd() == pytest.approx(expected_cost)
    assert extractor(stub, tmp_path, model="my-local-llm").estimated_cost_usd() is None


def test_results_keep_input_order_under_concurrency(tmp_path):
    # Later items answer sooner, so completion order is the reverse of input order.
    delays = {part: 0.03 * (len(WORLD_SUBSENTENCES) - i) for i, part in enumerate(WORLD_SUBSENTENCES)}

    def slow_for_early_items(body):
        reply = rules_answer(body)
        reply.delay = delays[body["messages"][-1]["content"].rsplit(llm.SUBSENTENCE_LABEL, 1)[1].strip()]
        return reply

    with StubServer(default=slow_for_early_items) as stub:
        results = extractor(stub, tmp_path, concurrency=10).extract_many(ITEMS)
    assert [result["facts"] for result in results] == [rules_facts(part) for part in WORLD_SUBSENTENCES]
    assert stub.peak_in_flight > 1               # the requests overlapped


def test_second_run_is_served_from_cache(stub, tmp_path):
    first = extractor(stub, tmp_path).extract_many(ITEMS)
    assert len(cache_files(tmp_path)) == len(ITEMS)
    n_requests = len(stub.requests)
    again = extractor(stub, tmp_path)
    second = again.extract_many(ITEMS)
    assert len(stub.requests) == n_requests
    assert [r["facts"] for r in second] == [r["facts"] for r in first]
    assert all(r["cached"] and r["status"] == "ok" for r in second)
    assert again.usage["calls"] == 0 and again.usage["cache_hits"] == len(ITEMS)
    assert again.estimated_cost_usd() == 0.0


def test_the_extractor_cache_is_keyed_by_endpoint_and_temperature(tmp_path):
    items = ITEMS[:1]
    with StubServer() as stub, StubServer() as other_server:
        extractor(stub, tmp_path).extract_many(items)
        extractor(stub, tmp_path).extract_many(items)
        assert len(stub.requests) == 1
        extractor(stub, tmp_path, temperature=0.7).extract_many(items)
        assert len(stub.requests) == 2
        extractor(other_server, tmp_path).extract_many(items)         # another server: maybe another model
        assert len(other_server.requests) == 1


def test_run_failing_halfway_resumes_without_repeating(tmp_path):
    n_ok = 4
    with StubServer(default=lambda body: Reply(status=500)) as stub:
        stub.script.extend([rules_answer] * n_ok)
        first = extractor(stub, tmp_path, concurrency=1, max_retries=0).extract_many(ITEMS)
        assert [r["status"] for r in first] == ["ok"] * n_ok + ["failed"] * (len(ITEMS) - n_ok)
        assert all("HTTP 500" in r["error"] and r["facts"] == [] for r in first[n_ok:])
        assert len(cache_files(tmp_path)) == n_ok   # failures are not cached
        stub.default, n_before = rules_answer, len(stub.requests)    # the server is back
        resumed = extractor(stub, tmp_path)
        second = resumed.extract_many(ITEMS)
        asked = [request["body"]["messages"][-1]["content"] for request in stub.requests[n_before:]]
    assert len(asked) == len(ITEMS) - n_ok
    assert all(any(content.endswith(part) for content in asked) for part in WORLD_SUBSENTENCES[n_ok:])
    assert [r["cached"] for r in second] == [True] * n_ok + [False] * (len(ITEMS) - n_ok)
    assert [r["facts"] for r in second] == [rules_facts(part) for part in WORLD_SUBSENTENCES]


def test_run_killed_halfway_resumes_without_repeating(stub, tmp_path, monkeypatch):
    n_done = 3
    backend = extractor(stub, tmp_path, concurrency=1)
    real_complete = backend._complete

    def dies_after_n(messages):
        if len(stub.requests) >= n_done:
            raise KeyboardInterrupt
        return real_complete(messages)

    monkeypatch.setattr(backend, "_complete", dies_after_n)
    with pytest.raises(KeyboardInterrupt):
        backend.extract_many(ITEMS)
    assert len(cache_files(tmp_path)) == n_done
    assert not list(tmp_path.rglob(".tmp-*"))
    second = extractor(stub, tmp_path).extract_many(ITEMS)
    assert len(stub.requests) == len(ITEMS)   # n_done before the kill, the rest after it
    assert sum(r["cached"] for r in second) == n_done
    assert [r["facts"] for r in second] == [rules_facts(part) for part in WORLD_SUBSENTENCES]


def test_429_then_success_is_one_retry_honouring_retry_after(stub, tmp_path, monkeypatch):
    stub.script.append(Reply(status=429, headers={"Retry-After": "0"}))
    backend = extractor(stub, tmp_path, backoff_base=20.0)   # without Retry-After: 0 this would sleep >= 10 s
    slept = []
    monkeypatch.setattr(llm, "time", SimpleNamespace(sleep=slept.append))   # llm's own waits only, not the stub's
    [result] = backend.extract_many(ITEMS[:1])
    assert slept == [0.0]
    assert result["status"] == "ok" and result["facts"] == rules_facts(ITEMS[0][0])
    assert backend.usage["retries"] == 1 and backend.usage["calls"] == 2 and backend.usage["failures"] == 0


def test_500_fails_after_max_retries(tmp_path):
    with StubServer(default=lambda body: Reply(status=500)) as stub:
        backend = extractor(stub, tmp_path, max_retries=2)
        results = backend.extract_many(ITEMS[:2])
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all("HTTP 500 after 3 attempts" in r["error"] for r in results)
    assert len(stub.requests) == backend.usage["calls"] == 6
    assert backend.usage["retries"] == 4 and backend.usage["failures"] == 2
    assert cache_files(tmp_path) == []


def test_timeout_is_retried_then_fails(tmp_path):
    with StubServer() as stub:
        stub.script.append(Reply(delay=1.0))
        backend = extractor(stub, tmp_path, timeout=0.3, max_retries=1)
        [result] = backend.extract_many(ITEMS[:1])
        assert result["status"] == "ok" and backend.usage["retries"] == 1 and backend.usage["calls"] == 2
    with StubServer(default=lambda body: Reply(delay=1.0, content='{"facts": []}')) as stub:
        backend = extractor(stub, tmp_path, timeout=0.3, max_retries=1)
        [result] = backend.extract_many(ITEMS[1:2])
    assert result["status"] == "failed" and "Timeout" in result["error"]
    assert backend.usage["calls"] == 2 and backend.usage["failures"] == 1


def test_non_retryable_error_fails_at_once_without_leaking_the_key(tmp_path):
    with StubServer(default=lambda body: Reply(status=401, error_message=f"Incorrect API key provided: {SECRET}")) \
            as stub:
        backend = extractor(stub, tmp_path)
        [result] = backend.extract_many(ITEMS[:1])
    assert result["status"] == "failed" and "HTTP 401" in result["error"]
    assert SECRET not in result["error"] and "***" in result["error"]
    assert backend.usage["calls"] == 1 and backend.usage["retries"] == 0


def test_answers_are_limited_to_max_tokens_and_a_cut_one_says_so(stub, tmp_path):
    extractor(stub, tmp_path / "a", max_tokens=None).extract_many(ITEMS[:1])
    assert "max_tokens" not in stub.requests[-1]["body"]
    sent = len(stub.requests)    # an answer cached without a limit is read under one: a cut answer is never cached
    [cached] = extractor(stub, tmp_path / "a").extract_many(ITEMS[:1])
    assert cached["cached"] and len(stub.requests) == sent
    extractor(stub, tmp_path / "b").extract_many(ITEMS[:1])
    assert stub.requests[-1]["body"]["max_tokens"] == 1024                   # the default limit is sent
    runaway = '{"facts": [' + '{"type": "object", "subject": "heart", "negated": false}, ' * 3
    stub.script.extend([Reply(content=runaway, finish_reason="length")] * 2)
    [result] = extractor(stub, tmp_path / "c", max_tokens=40).extract_many(ITEMS[:1])
    assert result["status"] == "failed" and "cut at max_tokens (40)" in result["error"]
    assert [r["body"]["max_tokens"] for r in stub.requests[-2:]] == [40, 40]   # the repair is limited too
    stub.script.append(Reply(content=runaway, finish_reason="length"))      # cut once, then a complete answer
    [repaired] = extractor(stub, tmp_path / "d", max_tokens=40).extract_many(ITEMS[:1])
    assert repaired["status"] == "ok" and repaired["facts"] == rules_facts(ITEMS[0][0])
    with pytest.raises(ValueError, match="max_tokens"):
        extractor(stub, tmp_path, max_tokens=0)


def test_malformed_json_is_repaired_once(stub, tmp_path):
    stub.script.append(Reply(content="{'facts': [oops"))
    backend = extractor(stub, tmp_path)
    [result] = backend.extract_many(ITEMS[1:2])
    assert result["status"] == "ok" and result["facts"] == rules_facts(ITEMS[1][0])
    repair = stub.requests[1]["body"]["messages"]
    assert repair[:-2] == stub.requests[0]["body"]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "{'facts': [oops"}
    assert repair[-1]["role"] == "user" and "not valid JSON" in repair[-1]["content"]
    assert backend.usage["calls"] == 2 and backend.usage["failures"] == 0


def test_invalid_fact_list_is_repaired(stub, tmp_path):
    stub.script.append(Reply(content='{"facts": [{"type": "object", "subject": "heart"}]}'))
    [result] = extractor(stub, tmp_path).extract_many(ITEMS[:1])
    assert result["status"] == "ok" and result["facts"] == rules_facts(ITEMS[0][0])
    assert "boolean 'negated'" in stub.requests[1]["body"]["messages"][-1]["content"]


def test_a_list_kind_is_repaired_and_twice_fails_without_aborting_the_other_items(stub, tmp_path):
    list_kind = Reply(content='{"facts": [{"type": "attribute", "subject": "heart", "kind": ["colour"], '
                              '"value": "red"}]}')
    stub.script.append(list_kind)
    [result] = extractor(stub, tmp_path / "a").extract_many(ITEMS[:1])
    assert result["status"] == "ok" and "string 'kind'" in stub.requests[1]["body"]["messages"][-1]["content"]
    stub.script.extend([list_kind, list_kind])
    results = extractor(stub, tmp_path / "b", concurrency=1).extract_many(ITEMS[:2])
    assert [r["status"] for r in results] == ["failed", "ok"] and "string 'kind'" in results[0]["error"]


def test_malformed_twice_fails_and_is_counted(stub, tmp_path):
    stub.script.extend([Reply(content="not json"), Reply(content='{"facts": "none"}')])
    backend = extractor(stub, tmp_path, concurrency=1)
    results = backend.extract_many(ITEMS[:2])
    failed = [r for r in results if r["status"] == "failed"]
    assert len(failed) == 1 and backend.usage["failures"] == 1 and failed[0]["facts"] == []
    assert "after one repair attempt" in failed[0]["error"] and '"facts" list' in failed[0]["error"]
    assert len(cache_files(tmp_path)) == 1
    assert len(stub.requests) == 3


def test_empty_content_fails(tmp_path):
    with StubServer(default=lambda body: Reply(content="")) as stub:
        backend = extractor(stub, tmp_path)
        [result] = backend.extract_many(ITEMS[:1])
    assert result["status"] == "failed" and "empty" in result["error"]
    assert backend.usage["calls"] == 2 and backend.usage["failures"] == 1


def test_server_rejecting_response_format_is_remembered(tmp_path):
    def no_json_mode(body):
        return Reply(status=400) if "response_format" in body else rules_answer(body)

    with StubServer(default=no_json_mode) as stub:
        backend = extractor(stub, tmp_path, concurrency=1)
        results = backend.extract_many(ITEMS[:3])
    assert [r["facts"] for r in results] == [rules_facts(part) for part, _ in ITEMS[:3]]
    assert ["response_format" in request["body"] for request in stub.requests] == [True, False, False, False]
    assert backend.json_mode is False and backend.usage["retries"] == 0


def test_other_400_fails_and_keeps_json_mode(tmp_path):
    with StubServer(default=lambda body: Reply(status=400)) as stub:
        backend = extractor(stub, tmp_path)
        [result] = backend.extract_many(ITEMS[:1])
    assert result["status"] == "failed" and "HTTP 400" in result["error"]
    assert len(stub.requests) == 2 and backend.json_mode is True


def test_api_key_from_environment_only(stub, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        llm.OpenAIFactExtractor("gpt-3.5-turbo-0125", cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):   # the OpenAI API named by its address is the same
        llm.OpenAIFactExtractor("gpt-3.5-turbo-0125", base_url="https://api.openai.com/v1", cache_dir=tmp_path)
    monkeypatch.delenv(KEY_VARIABLE)
    with pytest.raises(RuntimeError, match=f"{stub.url} needs an API key: set the {KEY_VARIABLE} environment"):
        extractor(stub, tmp_path)
    extractor(stub, tmp_path, api_key_env="").extract_many(ITEMS[:1])   # a local server without a key
    assert stub.requests[0]["headers"]["authorization"] == "Bearer EMPTY"


def test_the_openai_key_goes_to_the_openai_api_only(stub, tmp_path):
    """OPENAI_API_KEY is set, but a base_url gets no key unless api_key_env names one: a judge or extractor pointed
    at someone else's server must not hand it the OpenAI key."""
    llm.OpenAIFactExtractor("m", base_url=stub.url, cache_dir=tmp_path, progress=False).extract_many(ITEMS[:1])
    stub.script.append(Reply(content="yes"))
    llm.OpenAIVisionVerifier("m", base_url=stub.url, cache_dir=tmp_path, progress=False).answer(
        [np.zeros((4, 4, 3), np.uint8)], ["is there a heart ?"])
    assert [r["headers"]["authorization"] for r in stub.requests] == ["Bearer EMPTY"] * 2
    extractor(stub, tmp_path, api_key_env="OPENAI_API_KEY").extract_many(ITEMS[1:2])   # named on purpose: sent
    assert stub.requests[-1]["headers"]["authorization"] == f"Bearer {OPENAI_SECRET}"
    assert llm.OpenAIFactExtractor("m", base_url="https://api.openai.com/v1", cache_dir=tmp_path)._api_key == \
        OPENAI_SECRET
    assert llm.OpenAIFactExtractor("m", base_url="https://api.openai.com.example.org/v1", cache_dir=tmp_path
                                   )._api_key == llm.LOCAL_PLACEHOLDER_KEY


def test_without_base_url_the_requests_go_to_the_openai_api_whatever_openai_base_url_says(stub, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", stub.url)      # the client alone would send the OpenAI key there
    backend = llm.OpenAIFactExtractor("m", cache_dir=tmp_path, progress=False)
    assert str(backend.client.base_url).rstrip("/") == llm.OPENAI_API_URL and backend._api_key == OPENAI_SECRET
    assert str(extractor(stub, tmp_path).client.base_url).rstrip("/") == stub.url


def test_a_server_that_wants_a_key_it_was_not_sent_says_how_to_give_it(tmp_path):
    with StubServer(default=lambda body: Reply(status=401, error_message="missing key")) as stub:
        [keyless] = extractor(stub, tmp_path, api_key_env="").extract_many(ITEMS[:1])
        [wrong] = extractor(stub, tmp_path).extract_many(ITEMS[:1])
    assert keyless["status"] == "failed" and f"no key was sent to {stub.url}" in keyless["error"]
    assert "api_key_env" in keyless["error"]
    assert "HTTP 401" in wrong["error"] and "no key was sent" not in wrong["error"]   # a key went: it was wrong


def test_key_is_never_written_to_the_cache(stub, tmp_path):
    extractor(stub, tmp_path / "facts").extract_many(ITEMS)
    image = np.zeros((4, 4, 3), np.uint8)
    verifier = llm.OpenAIVisionVerifier("gpt-4o-2024-08-06", base_url=stub.url, cache_dir=tmp_path / "vision",
                                        api_key_env=KEY_VARIABLE, progress=False)
    stub.default = lambda body: Reply(content="yes")
    verifier.answer([image], ["is there a heart ?"])
    files = cache_files(tmp_path)
    assert len(files) == len(ITEMS) + 1
    assert not any(SECRET.encode() in path.read_bytes() for path in files)


def test_make_fact_extractor(stub, tmp_path):
    rules = llm.make_fact_extractor("rules")
    [result] = rules.extract_many([("there is a red heart", None)])
    assert result == {"facts": extract_facts_rules("there is a red heart"), "status": "ok", "error": None,
                      "cached": False}
    assert isinstance(llm.make_fact_extractor("openai", model="m", base_url=stub.url, cache_dir=tmp_path),
                      llm.OpenAIFactExtractor)
    with pytest.raises(ValueError, match="unknown fact extractor backend 'gpt'"):
        llm.make_fact_extractor("gpt")
    with pytest.raises(ValueError, match="item 0"):
        extractor(stub, tmp_path).extract_many([("only a sub-sentence",)])


# ---- vision verifier ----

ANSWERS = {"is there a heart ?": "Yes, there is a heart.", "is the heart red ?": "No.",
           "is the star above the ring ?": "I cannot tell from this image."}


def vision_answer(body):
    text_part, image_part = body["messages"][0]["content"]
    return Reply(content=ANSWERS[text_part["text"].removesuffix(" Answer with yes or no.")])


def verifier(stub, cache_dir, **knobs):
    knobs = {"concurrency": 2, "max_retries": 1, "timeout": 5, "backoff_base": 0.001, "progress": False,
             "api_key_env": KEY_VARIABLE, **knobs}
    return llm.OpenAIVisionVerifier("gpt-4o-2024-08-06", base_url=stub.url, cache_dir=cache_dir, **knobs)


def test_vision_answers_images_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    questions = list(ANSWERS)
    with StubServer(default=vision_answer) as stub:
        first = verifier(stub, tmp_path)
        assert first.answer([image] * 3, questions) == ["yes", "no", "unknown"]
        assert first.usage["unknown"] == 1 and first.usage["calls"] == 3 and first.usage["failures"] == 0
        for request in stub.requests:
            text_part, image_part = request["body"]["messages"][0]["content"]
            assert text_part["type"] == "text" and text_part["text"].endswith("? Answer with yes or no.")
            assert image_part["type"] == "image_url"
            url = image_part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            sent = np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
            np.testing.assert_array_equal(sent, image)
        second = verifier(stub, tmp_path)
        assert second.answer([image.copy()] * 3, questions) == ["yes", "no", "unknown"]
        assert len(stub.requests) == 3 and second.usage["cache_hits"] == 3 and second.usage["unknown"] == 1
        other_image = image.copy()
        other_image[0, 0] ^= 1
        assert second.answer([other_image], questions[:1]) == ["yes"]   # a different image is a new request
        assert len(stub.requests) == 4


def test_vision_cache_hits_are_read_again_by_today_s_parser(tmp_path, monkeypatch):
    # the cache keeps the reply's text; a changed reading of it (parse_yes_no) applies to cached replies too
    image = np.zeros((4, 4, 3), np.uint8)
    with StubServer(default=vision_answer) as stub:
        assert verifier(stub, tmp_path).answer([image], list(ANSWERS)[:1]) == ["yes"]
        monkeypatch.setattr(llm, "parse_yes_no", lambda text: "unknown")
        again = verifier(stub, tmp_path)
        assert again.answer([image], list(ANSWERS)[:1]) == ["unknown"]
        assert len(stub.requests) == 1 and again.usage["cache_hits"] == 1 and again.usage["unknown"] == 1


def test_vision_failure_is_none_counted_and_asked_again(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with StubServer(default=lambda body: Reply(status=503)) as stub:
        backend = verifier(stub, tmp_path)
        assert backend.answer([image], ["is there a heart ?"]) == [None]   # not an answer: never "unknown"
        assert backend.usage["failures"] == 1 and backend.usage["unknown"] == 0 and backend.usage["calls"] == 2
        assert "HTTP 503" in backend.errors[0]
        assert cache_files(tmp_path) == []
        stub.default = vision_answer
        assert verifier(stub, tmp_path).answer([image], ["is there a heart ?"]) == ["yes"]


def test_vision_cache_key_holds_the_whole_request(tmp_path, monkeypatch):
    image = np.zeros((4, 4, 3), np.uint8)
    question = ["is there a heart ?"]
    with StubServer(default=vision_answer) as stub, StubServer(default=vision_answer) as other_server:
        verifier(stub, tmp_path).answer([image], question)
        verifier(stub, tmp_path).answer([image], question)
        assert len(stub.requests) == 1 and stub.requests[0]["body"]["max_tokens"] == 10
        verifier(stub, tmp_path, max_tokens=3).answer([image], question)
        assert len(stub.requests) == 2 and stub.requests[1]["body"]["max_tokens"] == 3
        verifier(stub, tmp_path, temperature=0.5).answer([image], question)
        assert len(stub.requests) == 3
        verifier(other_server, tmp_path).answer([image], question)      # another server: maybe another model
        assert len(other_server.requests) == 1
        monkeypatch.setattr(llm, "YES_NO_INSTRUCTION", " Answer with yes or no.")   # the same text: still cached
        verifier(stub, tmp_path).answer([image], question)
        assert len(stub.requests) == 3
        monkeypatch.setattr(llm, "YES_NO_INSTRUCTION", " Answer yes or no.")
        stub.default = lambda body: Reply(content="yes")
        verifier(stub, tmp_path).answer([image], question)
        assert len(stub.requests) == 4 and stub.requests[3]["body"]["messages"][0]["content"][0]["text"] == \
            "is there a heart ? Answer yes or no."


def test_vision_rejects_bad_input(stub, tmp_path):
    backend = verifier(stub, tmp_path)
    with pytest.raises(ValueError, match="image 1 must be a uint8"):
        backend.answer([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)], ["a ?", "b ?"])
    with pytest.raises(ValueError, match="one image per question"):
        backend.answer([np.zeros((4, 4, 3), np.uint8)], [])


def test_vision_sends_each_question_with_its_own_image_when_the_images_come_stacked(tmp_path):
    # verify_facts stacks same-shaped images into one array; iterating it makes a new view per row, and a key by
    # the view's id() once sent one image's PNG with another image's question (found by tests/test_e2e_coco.py)
    images = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (10, 20, 30)] * 2)
    questions = [f"is there a heart in image {value} ?" for value in (10, 20, 30)] * 2

    def answer_with_the_image_value(body):
        text_part, image_part = body["messages"][0]["content"]
        sent = np.array(Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1]))))
        return Reply(content="yes" if f"image {sent[0, 0, 0]} " in text_part["text"] else "no")

    with StubServer(default=answer_with_the_image_value) as stub:
        assert verifier(stub, tmp_path, concurrency=3).answer(images, questions) == ["yes"] * 6
        assert len(stub.requests) == 3      # each repeated (image, question) pair is asked once, threads or not
