"""A local OpenAI-compatible chat-completions server for the tests and the benchmark (loopback only).

    with StubServer() as stub:                       # healthy fact answers from the rules parser
        extractor = OpenAIFactExtractor("stub-model", base_url=stub.url, cache_dir=...)
        stub.script.append(Reply(status=429, headers={"Retry-After": "0"}))   # the next request gets a 429
        ...
        stub.requests                                # every request: {"path", "headers" (lower-case), "body"}

Each POST /v1/chat/completions takes the next Reply from `stub.script` when it is not empty, else calls
`stub.default(body)`; a scripted entry may also be a function of the body. A Reply with status 200 and
content=None is answered by the default behaviour after its delay (e.g. "slow, then healthy").
"""
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fgaif_utils import llm
from fgaif_utils.facts import extract_facts_rules


class _Server(ThreadingHTTPServer):
    request_queue_size = 128   # the default listen backlog (5) drops connections under concurrency: 1 s SYN retries


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    error_message: str = "stub error"
    finish_reason: str = "stop"          # "length": the answer stopped at the request's max_tokens


def last_subsentence(body):
    """The sub-sentence of the last user message that carries one (a repair message does not)."""
    for message in reversed(body["messages"]):
        if message["role"] == "user" and isinstance(message["content"], str) \
                and llm.SUBSENTENCE_LABEL in message["content"]:
            return message["content"].rsplit(llm.SUBSENTENCE_LABEL, 1)[1].strip()
    raise ValueError("no sub-sentence in the request")


def rules_answer(body):
    """A healthy fact answer: the rules parser's facts of the sub-sentence, spans dropped, as JSON."""
    facts = [{k: v for k, v in fact.items() if k != "span"} for fact in extract_facts_rules(last_subsentence(body))]
    return Reply(content=json.dumps({"facts": facts}))


def chat_completion(body, content, finish_reason="stop"):
    """An OpenAI-shaped response; token counts are a deterministic function of the request and the answer."""
    prompt_tokens = len(json.dumps(body["messages"])) // 4
    completion_tokens = len(content or "") // 4
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class StubServer:
    def __init__(self, default=rules_answer, latency=0.0):
        self.default = default
        self.latency = latency           # added to every request (the benchmark's server-side latency)
        self.script = deque()
        self.requests = []
        self.answered = []               # {"status", "content", "usage"} sent back, in order
        self.in_flight = self.peak_in_flight = 0   # requests being answered now / at most at once
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)   # a short poll keeps shutdown() fast

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _reply_for(self, path, headers, body):
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            step = self.script.popleft() if self.script else self.default
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        reply = step(body) if callable(step) else step
        time.sleep(self.latency + reply.delay)
        with self._lock:
            self.in_flight -= 1
        if reply.status == 200 and reply.content is None:
            reply = self.default(body)
        return reply

    def _handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = stub._reply_for(self.path, headers, body)
                payload = chat_completion(body, reply.content, reply.finish_reason) if reply.status == 200 else \
                    {"error": {"message": reply.error_message, "type": "stub", "code": reply.status}}
                with stub._lock:
                    stub.answered.append({"status": reply.status, "content": reply.content,
                                          "usage": payload.get("usage")})
                self._send(reply.status, payload, reply.headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        return Handler
