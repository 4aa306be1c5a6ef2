"""Pairwise judging against a stub OpenAI-compatible server on 127.0.0.1: position swapping, retries, timeouts and
failures reported as missing (never counted), and an API key that is sent but never written anywhere."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pock_eval.judge import EndpointJudge, judge_pairs, parse_verdict
from pock_eval.models import System
from pock_eval.runner import Settings, run_evaluation

from .test_eval_tasks import tiny_loader, write_json

SECRET = "sk-test-0123456789"


class StubJudge(BaseHTTPRequestHandler):
    """Prefers the answer that contains "good"; `server.plan` lists what to do with each request in turn
    ("ok", "fail" = HTTP 500, "slow" = answer after the client's timeout, "biased" = always [[A]], "babble")."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.auth.append(self.headers.get("Authorization"))
        action = server.plan.pop(0) if server.plan else server.default
        if action == "fail":
            self.send_error(500, "judge overloaded")
            return
        if action == "slow":
            time.sleep(0.5)
        user = body["messages"][-1]["content"]
        answer_a = user.split("[The Start of Assistant A's Answer]")[1].split("[The End")[0]
        verdict = {"biased": "[[A]]", "babble": "I cannot decide."}.get(action)
        verdict = verdict or ("[[A]]" if "good" in answer_a else "[[B]]")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Reasoning. {verdict}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    httpd.plan, httpd.default, httpd.auth = [], "ok", []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def endpoint(server, **options) -> EndpointJudge:
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return EndpointJudge(url, model="stub", api_key_env="POCK_TEST_JUDGE_KEY", backoff=0.0, **options)


def test_parse_verdict():
    assert parse_verdict("A is better. [[A]]") == "A"
    assert parse_verdict("[[A]] at first, but finally [[C]]") == "tie"
    assert parse_verdict("no verdict") is None and parse_verdict(None) is None


def test_position_swap_cancels_order_bias(server, monkeypatch):
    monkeypatch.setenv("POCK_TEST_JUDGE_KEY", SECRET)
    judge = endpoint(server)
    outcomes = judge_pairs(judge, ["q1", "q2"], ["a good answer", "meh"], ["meh", "a good answer"])
    assert [o.score for o in outcomes] == [1.0, 0.0]
    assert server.auth == [f"Bearer {SECRET}"] * 4  # the key is sent as a bearer token with every request
    server.default = "biased"  # a judge that always picks the first position: every pair is inconsistent, a tie
    assert [o.score for o in judge_pairs(judge, ["q"], ["a good answer"], ["meh"])] == [0.5]


def test_failures_are_retried_then_missing(server, caplog):
    judge = endpoint(server, retries=2, timeout=0.2)
    server.plan = ["fail", "fail", "ok", "ok"]  # the first request succeeds on its third try
    outcome = judge_pairs(judge, ["q"], ["a good answer"], ["meh"])[0]
    assert outcome.score == 1.0 and not server.plan
    server.plan = ["slow", "slow", "slow", "ok"]  # every try of the first request times out
    with caplog.at_level(logging.WARNING):
        outcome = judge_pairs(judge, ["q"], ["a good answer"], ["meh"])[0]
    assert outcome.score is None and outcome.missing_reason == "judge request failed"
    assert "try 3 of 3 failed" in caplog.text
    server.default = "babble"
    outcome = judge_pairs(judge, ["q"], ["a good answer"], ["meh"])[0]
    assert outcome.score is None and "no [[A]]/[[B]]/[[C]] verdict" in outcome.missing_reason


def test_runner_reports_win_rate_and_missing_pairs(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("POCK_TEST_JUDGE_KEY", SECRET)
    rows = [{"question": f"Question {i}?", "reference": "a good answer"} for i in range(4)]
    write_json(tmp_path / "questions.json", rows)
    (tmp_path / "chat.yaml").write_text(
        "data: questions.json\noutput_type: pairwise\ndoc_to_text: '{question}'\ndoc_to_target: '{reference}'\n"
        "chat_template: true\ngeneration: {max_new_tokens: 4}\n"
    )
    server.plan = ["ok", "ok"] + ["fail"] * 3  # pair 1 judged; pair 2's first request fails all 3 tries
    settings = Settings(batch_size=4, resamples=100, progress=False)
    with caplog.at_level(logging.WARNING):
        summary = run_evaluation(
            [System("tiny")],
            [str(tmp_path / "chat.yaml")],
            output=tmp_path / "out",
            data_dir=tmp_path,
            settings=settings,
            make_judge=lambda: endpoint(server, retries=2, timeout=1.0),
            load=tiny_loader,
        )
    (row,) = summary["pairwise"]
    # one system: judged against the references ("a good answer"), which the stub always prefers
    assert row["baseline"] == "reference answers" and row["missing"] == 1 and row["losses"] == 3
    assert row["win_rate"] == 0.0 and summary["results"]["tiny"]["chat"]["missing"] == 1
    records = [json.loads(line) for line in (tmp_path / "out" / "tiny" / "chat.jsonl").open()]
    assert records[1]["score"]["win_rate"] is None and records[1]["judge"]["missing_reason"] == "judge request failed"
    written = "".join(
        path.read_text() for path in (tmp_path / "out").rglob("*") if path.suffix in (".json", ".jsonl", ".md")
    )
    assert SECRET not in written and SECRET not in caplog.text
