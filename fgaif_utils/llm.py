"""OpenAI-compatible backends of the AI-feedback stage: the LLM fact extractor and the vision yes/no verifier.

Both talk to any server that speaks the OpenAI chat-completions API (api.openai.com, vLLM, Ollama, LM Studio)
through the sync `openai` client, with:
- an on-disk cache, one small JSON file per request key (sha256 of the model and the request), written
  atomically, so an interrupted run resumes without repeating finished calls and a rerun makes no calls;
  failures are never cached, so a rerun retries them;
- bounded concurrency (a thread pool; the sync client is thread-safe) with a tqdm bar;
- our own retries (the client is built with max_retries=0): exponential backoff with jitter on 429, 5xx,
  timeouts and connection errors, honouring Retry-After (capped);
- usage counters (`.usage`) and a cost estimate from a small price table.
No record is ever dropped: a call that fails for good comes back with status "failed" (facts) or None (answers)
and is counted in usage["failures"]. An answer the model gave that is neither yes nor no is "unknown", and cached:
at temperature 0 the same request gets the same reply.

Keys come from the environment only and are never written anywhere. OPENAI_API_KEY goes to the OpenAI API only;
another endpoint (base_url) gets the key of the variable its params name (`api_key_env`), and none without one, so
a key never reaches a server it was not meant for.

Facts here are free text (COCO world): {"type": "object", "subject": "dog", "negated": false},
{"type": "attribute", "subject": "dog", "kind": "colour" | "size" | "other", "value": "brown"},
{"type": "relation", "subject": "dog", "relation": "next to", "object": "bench"}. facts.check_fact only accepts
the synthetic world's closed vocabulary (kinds colour/size, relations left/right/above/below), so LLM facts are
validated structurally by check_llm_fact instead.
"""
import base64
import hashlib
import io
import json
import os
import random
import re
import string
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import openai
from PIL import Image
from tqdm import tqdm   # text bars: they stream into papermill's live notebook and logs

from fgaif_utils import facts as facts_lib

# USD per 1M tokens: (input, output).
PRICES_PER_MILLION = {"gpt-3.5-turbo-0125": (0.50, 1.50), "gpt-4o-2024-08-06": (2.50, 10.00)}
ATTRIBUTE_KINDS = ("colour", "size", "other")
KIND_ALIASES = {"color": "colour"}
API_KEY_VARIABLE = "OPENAI_API_KEY"
OPENAI_API_HOST = "api.openai.com"
OPENAI_API_URL = f"https://{OPENAI_API_HOST}/v1"   # named explicitly: the client would read OPENAI_BASE_URL
LOCAL_PLACEHOLDER_KEY = "EMPTY"   # what local servers (vLLM, Ollama, LM Studio) accept when they need no key
SUBSENTENCE_LABEL = "Sub-sentence:"
YES_NO_INSTRUCTION = " Answer with yes or no."   # appended to every vision verifier question

SYSTEM_PROMPT = """You extract atomic visual facts from one sub-sentence of an image description.

There are three fact types:
1. object: an object the sub-sentence says is (or is not) in the image.
   {"type": "object", "subject": "<object name>", "negated": <true if it says the object is absent, else false>}
2. attribute: a property of an object.
   {"type": "attribute", "subject": "<object name>", "kind": "colour" | "size" | "other", "value": "<the property>"}
   kind is "colour" for colours, "size" for sizes (small, large, tall, ...), "other" for anything else
   (material, shape, state, count, action, ...).
3. relation: a spatial or interactive relation between two objects.
   {"type": "relation", "subject": "<object name>", "relation": "<relation phrase>", "object": "<object name>"}

Rules:
- Extract only facts that the sub-sentence itself states. The whole response is given only as context: use it
  to resolve pronouns ("it", "they") to the object's name, but do not add facts from other sentences, and do not
  add an object fact for an object the sub-sentence refers to only by a pronoun.
- Object names are short singular nouns in lower case ("dog", "person", "traffic light").
- An object said to be absent gets "negated": true and no attribute or relation facts.
- Statements about mood, style or the photographer are not visual facts; such a sub-sentence has no facts.

Answer with only a JSON object: {"facts": [...]} (an empty list when there is no fact)."""

FEW_SHOT = [
    ("The image shows a brown dog lying on a wooden bench next to a red bicycle. The park behind them is sunny.",
     "The image shows a brown dog lying on a wooden bench",
     [{"type": "object", "subject": "dog", "negated": False},
      {"type": "attribute", "subject": "dog", "kind": "colour", "value": "brown"},
      {"type": "object", "subject": "bench", "negated": False},
      {"type": "attribute", "subject": "bench", "kind": "other", "value": "wooden"},
      {"type": "relation", "subject": "dog", "relation": "lying on", "object": "bench"}]),
    ("A quiet street at night. There are no people or cars on the road, and the shops are closed.",
     "There are no people or cars on the road",
     [{"type": "object", "subject": "person", "negated": True},
      {"type": "object", "subject": "car", "negated": True},
      {"type": "object", "subject": "road", "negated": False}]),
    ("A large cat sits on the windowsill. It is watching a small bird outside, which gives the scene a calm mood.",
     "It is watching a small bird outside",
     [{"type": "object", "subject": "bird", "negated": False},
      {"type": "attribute", "subject": "bird", "kind": "size", "value": "small"},
      {"type": "relation", "subject": "cat", "relation": "watching", "object": "bird"}]),
]


class CallFailed(Exception):
    """A request that failed for good (after retries / the repair attempt); its message goes into the record."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status   # the HTTP status of the last attempt, when there was one


def _require(condition, message, fact):
    if not condition:
        raise ValueError(f"{message}: {json.dumps(fact)[:300]}")


def _text_field(fact, key):
    value = fact.get(key)
    _require(isinstance(value, str) and value.strip(), f"{fact.get('type')} fact needs a non-empty string {key!r}",
             fact)
    return " ".join(value.lower().split())


def check_llm_fact(fact):
    """The normalised copy of one LLM fact (canonical keys only, strings lower-cased and trimmed);
    ValueError saying what is wrong when it is not a well-formed free-text fact."""
    _require(isinstance(fact, dict), "a fact must be a JSON object", fact)
    fact_type = fact.get("type")
    _require(fact_type in facts_lib.FACT_TYPES, f"fact type must be one of {list(facts_lib.FACT_TYPES)}", fact)
    if fact_type == "object":
        _require(isinstance(fact.get("negated"), bool), "object fact needs a boolean 'negated'", fact)
        return {"type": "object", "subject": _text_field(fact, "subject"), "negated": fact["negated"]}
    if fact_type == "attribute":
        kind = fact.get("kind")
        _require(isinstance(kind, str), f"attribute fact needs a string 'kind' in {list(ATTRIBUTE_KINDS)}", fact)
        kind = KIND_ALIASES.get(kind, kind)
        _require(kind in ATTRIBUTE_KINDS, f"attribute fact needs 'kind' in {list(ATTRIBUTE_KINDS)}", fact)
        return {"type": "attribute", "subject": _text_field(fact, "subject"), "kind": kind,
                "value": _text_field(fact, "value")}
    return {"type": "relation", "subject": _text_field(fact, "subject"), "relation": _text_field(fact, "relation"),
            "object": _text_field(fact, "object")}


def parse_facts_answer(content):
    """(facts, None) for a usable answer, else (None, what is wrong). JSON only (json.loads, never eval); a
    surrounding ``` code fence is tolerated because some local servers add one."""
    if content is None or not content.strip():
        return None, "the answer was empty"
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"the answer is not valid JSON ({error.msg} at character {error.pos})"
    except RecursionError:   # a degenerate answer: thousands of nested brackets
        return None, "the answer is nested too deeply to parse"
    if not isinstance(answer, dict) or not isinstance(answer.get("facts"), list):
        return None, 'the answer must be a JSON object with a "facts" list'
    try:
        return [check_llm_fact(fact) for fact in answer["facts"]], None
    except ValueError as error:
        return None, f"invalid fact: {error}"


def parse_yes_no(text):
    """'yes' / 'no' / 'unknown': the first word when it is yes or no (punctuation stripped), else the only one of
    yes / no among the first five words, else unknown."""
    words = [word.strip(string.punctuation) for word in (text or "").lower().split()]
    words = [word for word in words if word]
    if words and words[0] in ("yes", "no"):
        return words[0]
    found = {word for word in words[:5] if word in ("yes", "no")}
    return found.pop() if len(found) == 1 else "unknown"


def sends_to_openai(base_url):
    """Whether requests go to the OpenAI API itself (no base_url, or one on api.openai.com)."""
    return base_url is None or urllib.parse.urlsplit(base_url).hostname == OPENAI_API_HOST


def api_key_from_env(base_url, api_key_env=""):
    """The key for an endpoint, from the environment only. api_key_env names the variable that holds it; "" means
    OPENAI_API_KEY for the OpenAI API and no key ("EMPTY", what local servers accept) for any other base_url."""
    variable = api_key_env or (API_KEY_VARIABLE if sends_to_openai(base_url) else "")
    if not variable:
        return LOCAL_PLACEHOLDER_KEY
    key = os.environ.get(variable)
    if not key:
        where = "the OpenAI API" if sends_to_openai(base_url) else base_url
        raise RuntimeError(f"{where} needs an API key: set the {variable} environment variable"
                           + ("" if api_key_env else " (or give base_url for a local OpenAI-compatible server)"))
    return key


def request_key(payload):
    """sha256 of a JSON-able payload, stable across runs (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class DiskCache:
    """One JSON file per key: cache_dir/ab/abcdef....json (a two-character fan-out keeps folders small)."""

    def __init__(self, cache_dir):
        self.root = Path(cache_dir)

    def path(self, key):
        return self.root / key[:2] / f"{key}.json"

    def load(self, key):
        try:
            return json.loads(self.path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save(self, key, record):
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as file:
            json.dump(record, file)
        os.replace(temp, path)


class ChatBackend:
    """What both backends share: client, cache, retries, usage counters, the thread pool.

    usage: prompt_tokens / completion_tokens (as the server reports them), calls (HTTP requests sent, retries and
    repair requests included), cache_hits, failures (records that came back failed), retries (backoff retries).
    """

    def __init__(self, model, base_url=None, cache_dir=None, concurrency=8, max_retries=5, timeout=60,
                 temperature=0.0, backoff_base=1.0, max_backoff=60.0, progress=True, api_key_env=""):
        if cache_dir is None:
            raise ValueError(f"{type(self).__name__} needs a cache_dir (per-request cache, see the stage contract)")
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, got {concurrency}, {max_retries}")
        self.model, self.base_url = model, base_url
        self.cache = DiskCache(cache_dir)
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.temperature, self.backoff_base, self.max_backoff = temperature, backoff_base, max_backoff
        self.progress = progress
        self._api_key = api_key_from_env(base_url, api_key_env)
        self.client = openai.OpenAI(api_key=self._api_key, base_url=base_url or OPENAI_API_URL, timeout=timeout,
                                    max_retries=0)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cache_hits": 0, "failures": 0,
                      "retries": 0}
        self._lock = threading.Lock()
        self._jitter = random.Random()

    def _count(self, **amounts):
        with self._lock:
            for name, amount in amounts.items():
                self.usage[name] = self.usage.get(name, 0) + amount

    def estimated_cost_usd(self):
        """Cost of this object's calls so far (cache hits are free); None for a model not in the price table."""
        if self.model not in PRICES_PER_MILLION:
            return None
        price_in, price_out = PRICES_PER_MILLION[self.model]
        return (self.usage["prompt_tokens"] * price_in + self.usage["completion_tokens"] * price_out) / 1e6

    def _scrub(self, text):
        """Error text without the API key (servers sometimes echo part of it)."""
        return text.replace(self._api_key, "***") if self._api_key != LOCAL_PLACEHOLDER_KEY else text

    def _key_hint(self, status):
        """What to do when a server refuses the request for want of the key we did not send it."""
        if status not in (401, 403) or self._api_key != LOCAL_PLACEHOLDER_KEY:
            return ""
        return (f" (no key was sent to {self.base_url}: set the params key that configures this endpoint, "
                "feedback.llm_api_key_env, feedback.vision_api_key_env or evaluate.judge_api_key_env, to the name of "
                "the environment variable that holds its key)")

    def _backoff_s(self, attempt, error):
        retry_after = None
        response = getattr(error, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):   # absent, or an HTTP date: fall back to our own schedule
                retry_after = None
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_backoff)
        return min(self.backoff_base * 2 ** attempt, self.max_backoff) * self._jitter.uniform(0.5, 1.0)

    def _create(self, **request):
        """The answer's text of one chat completion with our retries; CallFailed when it fails for good."""
        return self._create_choice(**request).message.content

    def _create_choice(self, **request):
        """The first choice of one chat completion (message, finish_reason) with our retries."""
        for attempt in range(self.max_retries + 1):
            self._count(calls=1)
            try:
                response = self.client.chat.completions.create(model=self.model, temperature=self.temperature,
                                                               timeout=self.timeout, **request)
            except openai.APIError as error:   # timeouts, connection errors, HTTP errors, unreadable responses
                status = getattr(error, "status_code", None)
                retryable = isinstance(error, openai.APIConnectionError) or status == 429 or (status or 0) >= 500
                reason = f"HTTP {status}" if status is not None else type(error).__name__
                if not retryable or attempt == self.max_retries:
                    attempts = f" after {attempt + 1} attempts" if retryable else ""
                    raise CallFailed(self._scrub(f"{reason}{attempts}: {error}{self._key_hint(status)}"),
                                     status) from None
                self._count(retries=1)
                time.sleep(self._backoff_s(attempt, error))
                continue
            if response.usage is not None:
                self._count(prompt_tokens=response.usage.prompt_tokens or 0,
                            completion_tokens=response.usage.completion_tokens or 0)
            if not response.choices:
                raise CallFailed("the server answered with no choices")
            return response.choices[0]

    def _run_parallel(self, work, items, desc):
        """work(*item) for every item on `concurrency` threads; results in input order. An exception out of
        `work` (a bug, an interrupt) cancels what has not started and propagates; finished items stay cached."""
        results = [None] * len(items)
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(work, *item): index for index, item in enumerate(items)}
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not self.progress):
                results[futures[future]] = future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


def fact_messages(subsentence, response=None):
    """The chat messages that ask for the facts of one sub-sentence (system prompt, few-shot pairs, the query)."""
    def query(context, part):
        return f"Response (context):\n{context}\n\n{SUBSENTENCE_LABEL} {part}"

    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for context, part, answer in FEW_SHOT:
        messages.append({"role": "user", "content": query(context, part)})
        messages.append({"role": "assistant", "content": json.dumps({"facts": answer})})
    messages.append({"role": "user", "content": query(response if response is not None else subsentence,
                                                       subsentence)})
    return messages


class OpenAIFactExtractor(ChatBackend):
    """Typed atomic facts per sub-sentence from an OpenAI-compatible LLM (paper: gpt-3.5-turbo-0125)."""

    def __init__(self, model, base_url=None, cache_dir=None, max_tokens=1024, **knobs):
        super().__init__(model, base_url=base_url, cache_dir=cache_dir, **knobs)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None (no limit), got {max_tokens}")
        self.max_tokens = max_tokens   # a runaway answer costs at most this many tokens, then counts as cut
        self.json_mode = True   # response_format json_object; switched off for the run if the server rejects it

    def extract_many(self, items):
        """items: (subsentence, response) pairs -> one {"facts", "status", "error", "cached"} per item, in order."""
        items = [tuple(item) for item in items]
        for index, item in enumerate(items):
            if len(item) != 2 or not isinstance(item[0], str) or not (item[1] is None or isinstance(item[1], str)):
                raise ValueError(f"item {index} must be a (subsentence: str, response: str | None) pair, got {item!r}")
        return self._run_parallel(self.extract_one, items, desc=f"facts ({self.model})")

    def extract_one(self, subsentence, response=None):
        messages = fact_messages(subsentence, response)
        # What the answer depends on, and where it was asked. Not max_tokens: only an answer that parses is cached,
        # and a cut one never does, so a cached answer is the same under any limit (and old caches stay valid).
        key = request_key({"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                           "messages": messages})
        cached = self.cache.load(key)
        if cached is not None:
            self._count(cache_hits=1)
            return {"facts": cached["facts"], "status": "ok", "error": None, "cached": True}
        try:
            facts = self._facts_with_repair(messages)
        except CallFailed as error:
            self._count(failures=1)
            return {"facts": [], "status": "failed", "error": str(error), "cached": False}
        self.cache.save(key, {"model": self.model, "subsentence": subsentence, "facts": facts})
        return {"facts": facts, "status": "ok", "error": None, "cached": False}

    def _limit(self):
        """The max_tokens entry of a request (none without a limit, as the requests before it had none)."""
        return {} if self.max_tokens is None else {"max_tokens": self.max_tokens}

    def _read_answer(self, choice):
        """(facts, None) or (None, what is wrong) for one answer, saying so when max_tokens cut it."""
        facts, problem = parse_facts_answer(choice.message.content)
        if problem is not None and choice.finish_reason == "length":
            problem = f"the answer was cut at max_tokens ({self.max_tokens}) before it was complete: {problem}"
        return facts, problem

    def _facts_with_repair(self, messages):
        choice = self._complete(messages)
        content = choice.message.content
        facts, problem = self._read_answer(choice)
        if problem is None:
            return facts
        repair = messages + [
            {"role": "assistant", "content": content or ""},
            {"role": "user", "content": f"That answer could not be used: {problem}. Reply with only the JSON object "
                                        '{"facts": [...]} in the format described, nothing else.'}]
        facts, second_problem = self._read_answer(self._complete(repair))
        if second_problem is not None:
            raise CallFailed(f"unusable answer after one repair attempt: {second_problem} "
                             f"(first answer: {problem})")
        return facts

    def _complete(self, messages):
        """The first choice of the answer to `messages`."""
        if not self.json_mode:
            return self._create_choice(messages=messages, **self._limit())
        try:
            return self._create_choice(messages=messages, response_format={"type": "json_object"}, **self._limit())
        except CallFailed as error:
            if error.status != 400:
                raise
        # A 400 with response_format: try once without it; if that works, the server does not support it.
        choice = self._create_choice(messages=messages, **self._limit())
        self.json_mode = False
        return choice


def image_key(image):
    """A key for an image's pixels: rows of a stacked array are fresh views whose id() is reused once one is freed,
    so id() cannot key them (it once sent one image's PNG with another image's question)."""
    image = np.ascontiguousarray(image)
    return image.shape, hashlib.sha256(image.tobytes()).digest()


def ask_each_pair_once(images, questions, ask):
    """`ask(images, questions)` on the distinct (image pixels, question) pairs only, then every pair's answer in order:
    a pair repeats when several responses about one image state the same fact (tiny's stage 03 asks 145,692
    questions, 63,437 distinct pairs)."""
    pairs = [(image_key(image), question) for image, question in zip(images, questions)]
    first_row = {}
    for row, pair in enumerate(pairs):
        first_row.setdefault(pair, row)
    rows = list(first_row.values())
    answer_of = dict(zip(first_row, ask([images[row] for row in rows], [questions[row] for row in rows])))
    return [answer_of[pair] for pair in pairs]


def png_data_url(image):
    """(data URL, sha256 of the PNG bytes) of a uint8 (H, W, 3) array."""
    png = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(png, format="PNG")
    data = png.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()


def vision_messages(question, image_url):
    """The chat messages that ask one yes/no question about one image."""
    return [{"role": "user", "content": [{"type": "text", "text": f"{question}{YES_NO_INSTRUCTION}"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


class OpenAIVisionVerifier(ChatBackend):
    """Yes/no answers about images from an OpenAI-compatible vision model (e.g. gpt-4o, or LLaVA behind vLLM)."""

    def __init__(self, model, base_url=None, cache_dir=None, max_tokens=10, **knobs):
        super().__init__(model, base_url=base_url, cache_dir=cache_dir, **knobs)
        self.max_tokens = max_tokens
        self.usage["unknown"] = 0
        self.errors = []   # why each failed call failed (its answer is None)

    def request_settings(self):
        """Everything a request sends besides its question and image, and where it sends it: what the answers
        depend on, so it keys every cache of them."""
        return {"model": self.model, "base_url": self.base_url, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "instruction": YES_NO_INSTRUCTION}

    def answer(self, images, questions):
        """'yes' / 'no' / 'unknown' for each (image, question) pair, None where the call failed for good (not
        cached: asked again next time); images are uint8 (H, W, 3) arrays."""
        if len(images) != len(questions):
            raise ValueError(f"answer() needs one image per question, got {len(images)} images "
                             f"and {len(questions)} questions")
        for index, (image, question) in enumerate(zip(images, questions)):
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3):
                raise ValueError(f"image {index} must be a uint8 (H, W, 3) array, got "
                                 f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"question {index} must be a non-empty string, got {question!r}")
        return ask_each_pair_once(images, questions, self._ask_distinct)   # not once per thread either

    def _ask_distinct(self, images, questions):
        encoded = {}   # the same image is usually asked many questions: encode it once
        items = []
        for image, question in zip(images, questions):
            content = image_key(image)
            if content not in encoded:
                encoded[content] = png_data_url(image)
            items.append((*encoded[content], question))
        return self._run_parallel(self.answer_one, items, desc=f"verify ({self.model})")

    def answer_one(self, data_url, image_sha256, question):
        # the key holds the request as sent, the image by its PNG's hash (the data URL is a function of it)
        key = request_key({**self.request_settings(),
                           "messages": vision_messages(question, f"sha256:{image_sha256}")})
        cached = self.cache.load(key)
        if cached is not None:   # read again: the cache keeps the reply, the reading of it may have changed
            answer = parse_yes_no(cached["text"])
            self._count(cache_hits=1, unknown=int(answer == "unknown"))
            return answer
        try:
            text = self._create(messages=vision_messages(question, data_url), max_tokens=self.max_tokens)
        except CallFailed as error:
            self._count(failures=1)
            with self._lock:
                self.errors.append(f"{question!r} (image {image_sha256[:12]}): {error}")
            return None
        answer = parse_yes_no(text)
        self._count(unknown=int(answer == "unknown"))
        self.cache.save(key, {"model": self.model, "question": question, "image_sha256": image_sha256,
                              "text": text, "answer": answer})
        return answer


class RulesFactExtractor:
    """The offline `rules` backend behind the same interface (facts.extract_facts_rules; never fails)."""

    def __init__(self):
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cache_hits": 0, "failures": 0,
                      "retries": 0}

    def extract_many(self, items):
        return [{"facts": facts_lib.extract_facts_rules(subsentence, response), "status": "ok", "error": None,
                 "cached": False} for subsentence, response in items]

    def estimated_cost_usd(self):
        return 0.0


def make_fact_extractor(backend, **kwargs):
    """"rules" (no arguments) or "openai" (OpenAIFactExtractor's arguments)."""
    if backend == "rules":
        if kwargs:
            raise ValueError(f"the rules fact extractor takes no arguments, got {sorted(kwargs)}")
        return RulesFactExtractor()
    if backend == "openai":
        return OpenAIFactExtractor(**kwargs)
    raise ValueError(f"unknown fact extractor backend {backend!r}; expected 'rules' or 'openai'")
