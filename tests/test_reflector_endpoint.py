"""The reflector behind an OpenAI-compatible endpoint (fast.reflector: openai:<model>), tested against a real
HTTP server on 127.0.0.1 that the test starts (http.server in a thread, speaking the chat-completions JSON
with scripted replies): the real `openai` client, its retries and timeouts, the round's skips, start-up
checks, and a run that checkpoints and resumes. Loopback only; every wait is bounded."""
import json
import random
import shutil
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

import context_opt as co  # noqa: E402
import fst  # noqa: E402
from plumbing import config, runlog  # noqa: E402
from context_opt import fast_round  # noqa: E402
from pool import PromptPool, as_context  # noqa: E402

SEED = "Solve the problem step by step."
MODEL = "scripted-7b"
KEY = "sk-test-9f3a61c0ffee"  # set in the environment by the tests that check it never reaches a run folder


def magic_reply(messages: list[dict]) -> str:
    """A reply that fixes what the scorer below rewards, distinct per request (so no two children are
    duplicates) and a function of the request alone (so a resumed run gets the replies it got before)."""
    tag = zlib.crc32(messages[-1]["content"].encode()) % 10_000
    return f"Here is the new instruction.\n```\n{SEED} MAGIC rule {tag}: add what is bought.\n```\nDone."


class Endpoint:
    """A chat-completions server on 127.0.0.1 with a script: `statuses` are answered (in turn) before any
    real reply, `delay` seconds pass before each answer, `reply(messages) -> text` writes the reply, and
    `shapes` (in turn) reshape the first replies' bodies. It records every request's body and
    Authorization header and the most requests it held at once."""

    def __init__(self, reply=magic_reply, *, statuses=(), delay=0.0, models=(MODEL,), shapes=()):
        self.reply, self.statuses, self.delay, self.models = reply, list(statuses), delay, list(models)
        self.shapes = list(shapes)
        self.bodies, self.auth, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def send(self, status: int, body: dict, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self.send(404, {"error": {"message": "not found"}})
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                            "owned_by": "test"} for m in endpoint.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.bodies.append(body)
                    endpoint.auth.append(self.headers.get("Authorization"))
                    status = endpoint.statuses.pop(0) if endpoint.statuses else 200
                    shape = endpoint.shapes.pop(0) if endpoint.shapes and status == 200 else (lambda reply: reply)
                    endpoint.in_flight += 1
                    endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight)
                try:
                    time.sleep(endpoint.delay)
                    if status != 200:  # retry-after-ms keeps the client's backoff short in a test
                        return self.send(status, {"error": {"message": f"scripted {status}"}},
                                         [("retry-after-ms", "20")])
                    if self.path.rstrip("/") != "/v1/chat/completions" or body["model"] not in endpoint.models:
                        return self.send(404, {"error": {"message": "no such model"}})
                    text = endpoint.reply(body["messages"])
                    self.send(200, shape({"id": "c", "object": "chat.completion", "created": 0,
                                          "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": text}}],
                                          "usage": {"prompt_tokens": 50, "completion_tokens": len(text.split()),
                                                    "total_tokens": 50 + len(text.split())}}))
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

        return Handler


@pytest.fixture()
def serve():
    started = []

    def start(*args, **kwargs) -> Endpoint:
        started.append(Endpoint(*args, **kwargs))
        return started[-1]
    yield start
    for endpoint in started:
        endpoint.close()


def dead_url() -> str:
    """A loopback URL nothing listens on: a port the OS gave us, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def client(url: str, *, timeout=1.0, retries=0, max_in_flight=8) -> co.ChatEndpoint:
    return co.ChatEndpoint(MODEL, url, timeout=timeout, retries=retries, max_in_flight=max_in_flight)


def anchors(n: int) -> list[dict]:
    return [{"id": f"p{i:02d}", "question": f"Tom has {i} red apples and buys {i + 3} more. How many apples "
             f"does Tom have now, problem number {i:02d}?", "answer": str(2 * i + 3)} for i in range(n)]


def magic_scorer(contexts, problems):
    """evaluate(): MAGIC in the context solves everything; the seed fails every third problem."""
    texts = [as_context(c).text() for c in contexts]
    return [(f"output of {p['id']}", 1.0 if "MAGIC" in t or int(p["id"][1:]) % 3 else 0.0, f"feedback on {p['id']}")
            for t, p in zip(texts, problems)]


def round_settings(**fields) -> co.FastConfig:
    return co.FastConfig(reflector=f"openai:{MODEL}", operators=["reflect"], budget=4.0, wave=4,
                         reflector_max_new_tokens=77, reflector_temperature=0.3, reflector_top_p=0.9, **fields)


def test_a_round_through_the_endpoint_accepts_children_with_the_in_process_chat(serve, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    endpoint = serve(delay=0.2)
    cfg = round_settings(reflector_format="paragraph")
    reflect = co.make_endpoint_reflector(client(endpoint.url, max_in_flight=2), max_new_tokens=77, temperature=0.3,
                                         top_p=0.9, reply_format=cfg.reflector_format)
    pool = PromptPool(SEED)
    stats = fast_round(pool, anchors(9), cfg, evaluate=magic_scorer, reflect=reflect, step=6, rng=random.Random(0))
    assert stats["accepted"] >= 1 and "MAGIC" in pool.best().text and pool.best().mean_score() == 1.0
    assert stats["skipped"]["reflector_error"] == 0 and stats["reflector"] == f"openai:{MODEL}"
    # each call on the record: the model id that answered, its tokens (the server's count) and seconds
    calls = stats["reflector_replies"]
    assert len(calls) == len(endpoint.bodies) == stats["proposals"] >= 4
    words = len(magic_reply([{"content": ""}]).split())  # the server counts a reply's words as its tokens
    assert all(c["model"] == MODEL and c["tokens"] == words and c["seconds"] >= 0.2 and not c["error"] for c in calls)
    assert stats["reflector_tokens"] == words * len(calls)
    # the chat make_reflector encodes, with the configured sampling; a wave's calls at once, 2 in flight at most
    sent = endpoint.bodies[0]
    assert sent["messages"][:2] == co.build_reflection_prompt(SEED, [])[:2] and len(sent["messages"]) == 3
    assert "## Current instruction\n```\n" + SEED in sent["messages"][2]["content"]
    assert (sent["model"], sent["max_tokens"], sent["temperature"], sent["top_p"]) == (MODEL, 77, 0.3, 0.9)
    assert endpoint.most_in_flight == 2
    assert set(endpoint.auth) == {f"Bearer {KEY}"}  # the key from the environment


@pytest.mark.parametrize("reply, finish, fmt, read", [
    ("Sure.\n```text\nBe exact.\n```\nBye", "stop", "fenced", "```\nBe exact.\n```"),
    ("Be exact.", "stop", "fenced", "```\nBe exact.\n```"),  # no fence written: read as inside the block
    ("Be exact.\n\nAnd more.", "stop", "paragraph", "```\nBe exact.\n```"),  # a blank line ends a paragraph
    ("Be exact and", "length", "fenced", "```\nBe exact and"),  # cut off by max tokens: left open
    ("Think.\n```\nBe exact.\n```", "stop", "free", "Think.\n```\nBe exact.\n```")])
def test_an_endpoint_reply_reads_as_a_prefilled_one(reply, finish, fmt, read):
    assert co.as_prefilled(reply, finish, fmt) == read
    text, reason = co.vet_reflection(read, SEED, [], 2000)
    assert (text, reason) == (("Be exact.", None) if finish == "stop" else (None, "no_fence"))


def test_a_rate_limit_and_a_server_error_are_retried_with_backoff(serve):
    endpoint = serve(statuses=[429, 503])
    reply = client(endpoint.url, retries=3).complete([{"role": "user", "content": "hi"}], max_tokens=8,
                                                     temperature=0.0, top_p=1.0)
    assert not reply.error and "MAGIC" in reply.text and reply.model == MODEL
    assert len(endpoint.bodies) == 3  # 429, 503, then the answer
    # out of retries: the error comes back (not an exception), in one line
    endpoint.statuses = [429, 429]
    reply = client(endpoint.url, retries=1).complete([{"role": "user", "content": "hi"}], max_tokens=8,
                                                     temperature=0.0, top_p=1.0)
    assert reply.error.startswith("RateLimitError") and "\n" not in reply.error and reply.text == ""


def test_a_hanging_server_times_out_and_its_proposals_are_skipped(serve, capsys):
    endpoint = serve(delay=3.0)
    reflect = co.make_endpoint_reflector(client(endpoint.url, timeout=1.0), max_new_tokens=16)
    pool = PromptPool(SEED)
    started = time.perf_counter()
    stats = fast_round(pool, anchors(9), round_settings(patience=4), evaluate=magic_scorer, reflect=reflect,
                       step=6, rng=random.Random(0))
    assert time.perf_counter() - started < 2.9  # four calls at once, each given up after 1 s
    assert stats["skipped"]["reflector_error"] == 4 and stats["proposals"] == 0 and stats["accepted"] == 0
    assert stats["metric_calls"] == 9 and [p.text for p in pool] == [SEED]  # nothing spent beyond the pool
    assert all(c["error"].startswith("APITimeoutError") for c in stats["reflector_replies"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "reflector_error" in line]
    assert len(lines) == 4 and all("APITimeoutError" in line for line in lines)


def test_replies_without_choices_or_token_counts_cost_one_proposal_at_most(serve):
    """200 with empty choices, a null message or no choices key: a failed call, one skipped proposal; usage
    without its count, or none at all: the reply stands at 0 tokens. The round finishes either way."""
    no_count = lambda r: {**r, "usage": {"prompt_tokens": 50}}
    shapes = [lambda r: {**r, "choices": []}, no_count, lambda r: {k: v for k, v in r.items() if k != "usage"},
              lambda r: {**r, "choices": [{"index": 0, "finish_reason": "stop", "message": None}]}]
    endpoint = serve(shapes=shapes)
    replies = client(endpoint.url, max_in_flight=1).complete_many([[{"role": "user", "content": f"hi {i}"}]
                                                                   for i in range(5)], max_tokens=8,
                                                                  temperature=0.0, top_p=1.0)
    assert [bool(r.error) for r in replies] == [True, False, False, True, False]
    assert replies[0].error.startswith("EmptyReply") and "\n" not in replies[0].error
    assert [r.tokens for r in replies[1:3]] == [0, 0] and all("MAGIC" in r.text for r in replies[1:3])
    endpoint.shapes = [lambda r: {k: v for k, v in r.items() if k != "choices"}, no_count]
    reflect = co.make_endpoint_reflector(client(endpoint.url, max_in_flight=1), max_new_tokens=16)
    stats = fast_round(PromptPool(SEED), anchors(9), round_settings(), evaluate=magic_scorer, reflect=reflect,
                       step=6, rng=random.Random(0))
    assert stats["skipped"]["reflector_error"] == 1 and stats["proposals"] >= 3 and stats["accepted"] >= 1


def test_ctrl_c_during_calls_returns_at_once_and_sends_no_more(serve):
    """Ctrl-C while calls are in flight (a slow server) and more are queued: complete_many gives the
    KeyboardInterrupt back at once, so the run saves and stops without waiting for the calls in flight,
    and no queued call is sent."""
    import os
    import signal
    endpoint = serve(delay=3.0)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        client(endpoint.url, timeout=10, retries=2, max_in_flight=2).complete_many(
            [[{"role": "user", "content": str(i)}] for i in range(6)], max_tokens=8, temperature=0.0, top_p=1.0)
    assert time.perf_counter() - started < 2.0  # the calls in flight answer after 3 s
    time.sleep(3.5)
    assert len(endpoint.bodies) == 2  # the two in flight, none of the four queued


def test_a_server_that_is_down_stops_the_start_up_and_skips_proposals_mid_run(capsys):
    url = dead_url()
    with pytest.raises(SystemExit) as stop:
        client(url).probe()
    assert str(stop.value).startswith(f"fast.reflector=openai:{MODEL} at {url}") and "\n" not in str(stop.value)
    assert "APIConnectionError" in str(stop.value)
    reflect = co.make_endpoint_reflector(client(url), max_new_tokens=16)
    stats = fast_round(PromptPool(SEED), anchors(9), round_settings(patience=4), evaluate=magic_scorer,
                       reflect=reflect, step=6, rng=random.Random(0))
    assert stats["skipped"]["reflector_error"] == 4 and stats["proposals"] == 0
    assert sum("reflector_error" in line for line in capsys.readouterr().err.splitlines()) == 4


def test_a_wrong_model_or_url_stops_fst_before_the_run_folder(serve, tmp_path, capsys):
    endpoint = serve()
    base = ["--config", "tiny.yaml", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "mode=fst"]
    with pytest.raises(SystemExit, match=r"no such model there \(it serves scripted-7b\)$"):
        fst.main(base + ["--set", "fast.reflector=openai:other-model", "--set", f"fast.reflector_url={endpoint.url}"])
    with pytest.raises(SystemExit, match=r"the endpoint does not answer: NotFoundError"):  # a URL without /v1
        fst.main(base + ["--set", f"fast.reflector=openai:{MODEL}",
                         "--set", f"fast.reflector_url={endpoint.url[:-3]}/nothing"])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(config.ConfigError, match="config key 'fast.reflector' must name the endpoint's model"):
        co.FastConfig(reflector="openai:").check("fast.")
    co.FastConfig(reflector="openai:llama3.1:8b").check("fast.")  # an Ollama tag, colon and all


def strip_seconds(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock fields, an endpoint call's seconds included."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if not k.startswith("seconds") and k != "tokens_per_s"}
        if "reflector_replies" in r:
            r["reflector_replies"] = [{k: v for k, v in c.items() if k != "seconds"} for c in r["reflector_replies"]]
        out.append(r)
    return out


def test_an_endpoint_run_checkpoints_resumes_and_never_records_the_key(serve, tmp_path, tiny_model_dir,
                                                                        parity_rewards, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    endpoint = serve()
    sets = {"model.name": tiny_model_dir, "out_dir": tmp_path, "run_name": "full", "train.steps": 2,
            "train.save_every": 1, "sampling.max_new_tokens": 8, "train.batch_size": 2, "sampling.group_size": 4,
            "mode": "fst", "fast.every": 2, "fast.budget": 2, "fast.operators": "[reflect, demo]",
            "fast.reflector": f"openai:{MODEL}", "fast.reflector_url": endpoint.url, "fast.reflector_timeout": 5,
            "fast.reflector_retries": 0, "eval.every": 0}
    fst.main(["--config", "tiny.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    run = tmp_path / "full"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fast = [r for r in rows if r.get("kind") == "fast"]
    assert len(fast) == 1 and all(r["reflector"] == f"openai:{MODEL}" for r in fast)
    calls = [c for r in fast for c in r["reflector_replies"]]
    assert calls and len(calls) == len(endpoint.bodies) and all(c["model"] == MODEL for c in calls)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reflector"]["reflector"] == f"openai:{MODEL}" and summary["reflector"]["models"] == [MODEL]
    assert f"reflector: openai:{MODEL} (answered as {MODEL})" in capsys.readouterr().err
    used = runlog.reflector_used(run)  # what eval.py's report names too
    assert (used["calls"], used["tokens"], used["failed_calls"]) == (len(calls), sum(c["tokens"] for c in calls), 0)
    # the key reached the server and nothing in the run folder
    assert set(endpoint.auth) == {f"Bearer {KEY}"}
    assert not [p for p in run.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    # resume from the step-0 checkpoint: step 1 and the round after it again, the same numbers
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000001")
    fst.main(["--resume", str(resumed)])
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert strip_seconds(again) == strip_seconds(rows)
    assert (resumed / "pool" / "step_000001.json").read_text() == (run / "pool" / "step_000001.json").read_text()
    assert len(endpoint.bodies) == 2 * len(calls)  # the resumed round asked the endpoint again
