"""caldpo.eval: verdict parsing, the three judges, order randomisation, cache resume, head to head.

The chat-completions judge talks to a server this test starts on 127.0.0.1 (http.server
in a thread) backed by a programmatic judge: it prefers the response containing "good".
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from _fulldisk import full_disk_fixture  # noqa: F401 (the full_disk fixture)
from _readonly import read_only_fixture  # noqa: F401 (the read_only fixture)
from caldpo.eval.__main__ import build_pairs, cli, main
from caldpo.eval.prompts import judge_messages, parse_verdict
from caldpo.eval.stats import wilson


@pytest.mark.parametrize("text,verdict", [
    ("A is clearer.\nVerdict: A", "A"), ("Verdict: B", "B"), ("both equal\nVerdict: tie", "tie"),
    ("x\nVerdict: Tie.", "tie"), ("reasoning\n**Verdict: B**\n", "B"),
    ("Verdict: A\nActually no.", None), ("I prefer A.", None), ("Verdict: A or B", None), ("", None),
    ("Verdict: C", None), ("verdict A", None),
])
def test_verdicts_are_parsed_strictly(text, verdict):
    assert parse_verdict(text) == verdict


def test_wilson_interval_against_closed_form():
    # 8 of 10, z = 1.96: the textbook interval, written out in float64.
    z, n, p = 1.959963984540054, 10, 0.8
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = wilson(8, 10)
    assert abs(lo - (c - h)) < 1e-12 and abs(hi - (c + h)) < 1e-12
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95


# ----------------------------------------------------------------------------- chat-completions judge

class ReplyServer:
    """A chat-completions endpoint on 127.0.0.1 answering each POST with ``reply(n, user_text)`` -> (status,
    content type, body bytes), ``n`` counting requests from 1 (``full=True``: ``reply(n, path, request_body)``
    -> (status, content type, body bytes, extra headers)); ``completion(text)`` is a well-formed 200 body."""

    def __init__(self, reply, full: bool = False):
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    n = server.requests
                if full:
                    status, ctype, data, headers = reply(n, self.path, body)
                else:
                    (status, ctype, data), headers = reply(n, body["messages"][-1]["content"]), {}
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def completion(text: str, n: int = 0, model: str = "m") -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps({
            "id": f"c{n}", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge_reply(n: int, path: str, body: dict):
    """Fails the first two requests (500, then 429), then judges: the response holding "good" wins."""
    def error(code, message, headers=None):
        return code, "application/json", json.dumps({"error": {"message": message}}).encode(), headers or {}
    if not path.endswith("/chat/completions"):
        return error(404, "no such route")
    if body["model"] == "refuse":
        return error(401, "bad key")
    if n == 1:
        return error(500, "try again")
    if n == 2:
        return error(429, "slow down", {"retry-after": "0"})
    user = body["messages"][-1]["content"]
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", user, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\nWhich", user, re.S).group(1)
    if "MALFORMED" in user:
        text = "Both responses have merit; I cannot decide."
    else:
        ga, gb = "good" in a, "good" in b
        text = "Comparison.\nVerdict: " + ("A" if ga and not gb else "B" if gb and not ga else "tie")
    return (*ReplyServer.completion(text, n, body["model"]), {})


def JudgeServer() -> ReplyServer:
    """A chat-completions endpoint: fails its first two requests (500, then 429), then judges."""
    return ReplyServer(_judge_reply, full=True)


@pytest.fixture
def no_proxy(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _samples(tmp_path, n=12):
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question {i}?\n\nAssistant:"
        if i == 3:
            prompt = "\n\nHuman: MALFORMED please\n\nAssistant:"
        if i == 5:  # both good: the judge says tie
            rows.append({"prompt": prompt, "response": " good one", "reference": " good too"})
        elif i == 7:  # the reference wins
            rows.append({"prompt": prompt, "response": " poor", "reference": " good answer"})
        else:
            rows.append({"prompt": prompt, "response": f" a good answer {i}", "reference": f" plain answer {i}"})
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(rows))
    return path


def test_chat_judge_retries_counts_malformed_and_resumes_from_cache(tmp_path, no_proxy, capsys):
    samples = _samples(tmp_path)
    out = tmp_path / "report.json"
    args = [str(samples), "--judge", "chat", "--model", "judge-x", "--out", str(out), "--concurrency", "3",
            "--backoff", "0.01", "--retries", "3"]
    with JudgeServer() as server:
        base = ["--base-url", server.url]
        report = main(args + base)
        assert server.requests == 12 + 2  # every item once, plus the 500 and the 429 retried
        s = report["summary"]
        assert (s["wins"], s["ties"], s["losses"], s["unparsable"]) == (9, 1, 1, 1)
        assert s["items"] == 12 and s["n"] == 11 and abs(s["win_rate"] - 9.5 / 11) < 1e-12
        assert (s["ci_low"], s["ci_high"]) == pytest.approx(wilson(9.5, 11))
        items = report["items"]
        shown_first = [it["shown"][0] == "candidate" for it in items]
        assert any(shown_first) and not all(shown_first)  # the order is randomised per item
        for it in items:  # the verdict refers to the order shown; the outcome to the candidate
            if it["outcome"] in ("win", "loss"):
                cand_letter = "A" if it["shown"][0] == "candidate" else "B"
                assert (it["verdict"] == cand_letter) == (it["outcome"] == "win")
            assert it["raw"]
        assert items[3]["outcome"] == "unparsable" and "cannot decide" in items[3]["raw"]
        assert s["decisive"] == 10 and s["first_shown_preferred"] == sum(it["verdict"] == "A" for it in items)
        assert items[7]["outcome"] == "loss" and items[5]["outcome"] == "tie"
        printed = capsys.readouterr().out
        assert "unparsable" in printed and "Wilson" in printed

        # Resume: the same command answers every item from the cache, making no request.
        again = main(args + base)
        assert server.requests == 14
        assert [it["outcome"] for it in again["items"]] == [it["outcome"] for it in items]
        assert all(it["cached"] for it in again["items"])

        # Another seed shows other orders: new judging prompts, new requests (the cache is keyed by them).
        main(args + base + ["--seed", "1", "--limit", "4"])
        assert server.requests > 14

        # A refusal that retrying cannot fix stops with one line and status 2.
        assert cli([str(samples), "--judge", "chat", "--model", "refuse", "--out", str(tmp_path / "r2.json"),
                    "--base-url", server.url, "--retries", "1", "--backoff", "0.01"]) == 2
        assert "401" in capsys.readouterr().err


def test_chat_judge_without_key_or_url_is_refused(tmp_path, no_proxy, capsys):
    assert cli([str(_samples(tmp_path)), "--judge", "chat", "--model", "gpt-4o"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_chat_judge_without_the_openai_client_is_one_line(tmp_path, no_proxy, monkeypatch, capsys):
    """`make install` does not install openai (the `eval` extra does): --judge chat says what to install."""
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError; find_spec ValueError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    assert cli([str(_samples(tmp_path)), "--judge", "chat", "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("caldpo: --judge chat talks through the openai client")
    assert "pip install 'caldpo[eval]'" in err


def test_missing_field_names_the_fields_there(tmp_path, capsys):
    assert cli([str(_samples(tmp_path)), "--judge", "lm", "--judge-lm", str(tmp_path),
                "--baseline-field", "ref_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caldpo: --baseline-field ref_model") and "'reference'" in err


def test_head_to_head_matches_by_prompt(tmp_path):
    a = [{"prompt": "p1", "response": "a1"}, {"prompt": "p2", "response": "a2"},
         {"prompt": "p1", "response": "a1b"}, {"prompt": "p9", "response": "a9"}]
    b = [{"prompt": "p2", "response": "b2"}, {"prompt": "p1", "response": "b1"}, {"prompt": "p1", "response": "b1b"}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    pairs, sides = build_pairs(str(tmp_path / "a.json"), "response", "reference", str(tmp_path / "b.json"))
    assert pairs == [("p1", "a1", "b1"), ("p2", "a2", "b2"), ("p1", "a1b", "b1b")]
    assert sides["unmatched"] == 1


def _ok(body: dict) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(body).encode()


MALFORMED = {  # 200 answers that are not chat completions, and what the one line says about each
    "empty_choices": (_ok({"id": "c", "object": "chat.completion", "choices": []}), "'choices' is empty"),
    "no_choices": (_ok({"id": "c", "object": "chat.completion"}), "no 'choices'"),
    "error_object": (_ok({"error": {"message": "model overloaded"}}), "no 'choices' (its 'error': model overloaded)"),
    "html": ((200, "text/html", b"<html><body>502 Bad gateway</body></html>"), "not JSON"),
    "choices_not_a_list": (_ok({"choices": {"0": "x"}}), "'choices' is not a list"),
    "no_message": (_ok({"choices": [{"index": 0, "text": "Verdict: A"}]}), "'choices[0]' has no 'message'"),
}


@pytest.mark.parametrize("mode", sorted(MALFORMED))
def test_a_200_that_is_not_a_chat_completion_is_one_line_with_the_body_exit_2(tmp_path, no_proxy, capsys, mode):
    answer, reason = MALFORMED[mode]
    with ReplyServer(lambda n, user: answer) as server:
        code = cli([str(_samples(tmp_path, 1)), "--judge", "chat", "--model", "m", "--base-url", server.url,
                    "--out", str(tmp_path / "r.json"), "--retries", "1", "--backoff", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"caldpo: chat:{server.url}:m: the server answered 200 with a body that is not a chat "
                          f"completion ({reason}; {len(answer[2])} bytes, starting {answer[2][:200]!r}), 2 attempts")
    assert server.requests == 2  # retried once, as a 5xx is
    assert not (tmp_path / "r.json").exists()


def test_a_malformed_200_is_retried_like_a_5xx(tmp_path, no_proxy):
    def reply(n, user):
        return (200, "text/html", b"<html>gateway</html>") if n == 1 else ReplyServer.completion("Verdict: A")
    with ReplyServer(reply) as server:
        report = main([str(_samples(tmp_path, 3)), "--judge", "chat", "--model", "m", "--base-url", server.url,
                       "--out", str(tmp_path / "r.json"), "--retries", "2", "--backoff", "0.01", "--concurrency", "1"])
    assert server.requests == 4 and report["summary"]["unparsable"] == 0


def test_an_empty_reply_is_asked_again_once_and_never_cached(tmp_path, no_proxy):
    seen: dict[str, int] = {}

    def reply(n, user):  # question 0: always empty; question 1: empty once, then a verdict; others: a verdict
        q = re.search(r"question (\d+)", user).group(1)
        seen[q] = seen.get(q, 0) + 1
        empty = q == "0" or (q == "1" and seen[q] == 1)
        return ReplyServer.completion("" if empty else "Verdict: A")
    samples, out = _samples(tmp_path, 3), tmp_path / "r.json"
    args = [str(samples), "--judge", "chat", "--model", "m", "--out", str(out), "--retries", "0", "--concurrency", "1"]
    with ReplyServer(reply) as server:
        report = main(args + ["--base-url", server.url])
        assert seen == {"0": 2, "1": 2, "2": 1}
        items = report["items"]
        assert items[0]["outcome"] == "unparsable" and items[0]["raw"] == "" and items[1]["verdict"] == "A"
        cached = [json.loads(line) for line in out.with_suffix(".cache.jsonl").read_text().splitlines()]
        assert len(cached) == 2 and all(c["raw"] == "Verdict: A" for c in cached)
        main(args + ["--base-url", server.url])  # the rerun asks only for the empty one, again
        assert seen == {"0": 4, "1": 2, "2": 1}


def test_a_long_reply_is_stored_bounded_with_its_verdict_line(tmp_path, no_proxy):
    from caldpo.eval.judges import MAX_STORED_CHARS
    long = "blah " * 50_000 + "\nVerdict: B"
    samples, out = _samples(tmp_path, 2), tmp_path / "r.json"
    args = [str(samples), "--judge", "chat", "--model", "m", "--out", str(out), "--retries", "0"]
    with ReplyServer(lambda n, user: ReplyServer.completion(long)) as server:
        report = main(args + ["--base-url", server.url])
        again = main(args + ["--base-url", server.url])
        assert server.requests == 2
    cache = out.with_suffix(".cache.jsonl")
    assert cache.stat().st_size < 3 * MAX_STORED_CHARS and out.stat().st_size < 6 * MAX_STORED_CHARS
    for it in report["items"] + again["items"]:
        assert it["verdict"] == "B" and it["raw"].endswith("\nVerdict: B") and len(it["raw"]) < MAX_STORED_CHARS + 100
        assert it["raw"].startswith("[caldpo: the first ")


def test_a_torn_cache_line_is_cut_so_the_next_reply_is_kept(tmp_path, no_proxy):
    """A kill (or a full disk) mid-write leaves half a line; the next reply must start a line of its own,
    else it is unreadable and paid for again on every run."""
    samples, out = _samples(tmp_path, 4), tmp_path / "r.json"
    args = [str(samples), "--judge", "chat", "--model", "m", "--out", str(out), "--retries", "0", "--concurrency", "1"]
    cache = out.with_suffix(".cache.jsonl")
    with ReplyServer(lambda n, user: ReplyServer.completion("Verdict: A")) as server:
        main(args + ["--base-url", server.url])
        lines = cache.read_text().splitlines(keepends=True)
        cache.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # the last reply torn
        main(args + ["--base-url", server.url])
        assert server.requests == 5  # the torn one asked again
        assert [json.loads(line)["raw"] for line in cache.read_text().splitlines()] == ["Verdict: A"] * 4
        again = main(args + ["--base-url", server.url])
        assert server.requests == 5 and all(it["cached"] for it in again["items"])


def test_an_unwritable_report_or_cache_is_refused_before_any_request(tmp_path, no_proxy, capsys, read_only):
    out = read_only(tmp_path / "ro") / "r.json"
    with ReplyServer(lambda n, user: ReplyServer.completion("Verdict: A")) as server:
        code = cli([str(_samples(tmp_path, 2)), "--judge", "chat", "--model", "m", "--base-url", server.url,
                    "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and server.requests == 0 and err.startswith(f"caldpo: cannot write --out={out}: [Errno 30]")
    cache = out.parent / "cache.jsonl"  # the verdict cache likewise: nothing is paid for that cannot be kept
    with ReplyServer(lambda n, user: ReplyServer.completion("Verdict: A")) as server:
        code = cli([str(_samples(tmp_path, 2)), "--judge", "chat", "--model", "m", "--base-url", server.url,
                    "--out", str(tmp_path / "r.json"), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and server.requests == 0 and err.startswith(f"caldpo: cannot write --cache={cache}: [Errno 30]")


def test_a_full_disk_at_the_report_or_the_cache_is_one_line_and_keeps_what_was_paid_for(tmp_path, no_proxy, capsys,
                                                                                          full_disk):
    """The report's disk fills after the verdicts were paid for: one line (path, error, free space), exit 3, the
    verdicts kept in the cache so a rerun pays nothing. The verdict cache's own disk full: one line, exit 3."""
    full = full_disk(tmp_path / "full")
    samples, cache = _samples(tmp_path, 3), tmp_path / "cache.jsonl"
    args = [str(samples), "--judge", "chat", "--model", "m", "--retries", "0", "--concurrency", "1"]
    with ReplyServer(lambda n, user: ReplyServer.completion("Verdict: A")) as server:
        code = cli(args + ["--base-url", server.url, "--out", str(full / "r.json"), "--cache", str(cache)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 3 and server.requests == 3 and "Traceback" not in "\n".join(err), err
        assert err[-1].startswith(f"caldpo: writing the evaluation report {full / 'r.json'} failed: [Errno 28] "
                                  "No space left on device (") and "MiB free on" in err[-1], err[-1]
        assert not (full / "r.json").exists()
        assert cli(args + ["--base-url", server.url, "--out", str(tmp_path / "r.json"), "--cache", str(cache)]) == 0
        assert server.requests == 3 and len(json.loads((tmp_path / "r.json").read_text())["items"]) == 3
        capsys.readouterr()
        code = cli(args + ["--base-url", server.url, "--out", str(tmp_path / "r2.json"), "--cache",
                           str(full / "cache.jsonl")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 3 and "Traceback" not in "\n".join(err), err
        assert err[-1].startswith(f"caldpo: writing the verdict cache {full / 'cache.jsonl'} failed: [Errno 28]"), err


# ----------------------------------------------------------------------------- position bias

def test_position_test_against_the_binomial_written_out():
    """p = P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2), summed outcome by outcome."""
    from caldpo.eval.stats import binomial_two_sided_p, position_bias

    for n in range(0, 21):
        for k in range(n + 1):
            want = sum(math.comb(n, i) for i in range(n + 1) if abs(i - n / 2) >= abs(k - n / 2)) / 2 ** n
            assert binomial_two_sided_p(k, n) == pytest.approx(min(1.0, want), rel=1e-12), (k, n)
    assert binomial_two_sided_p(0, 16) == pytest.approx(2 / 2 ** 16)  # the demo's 16/16 second-shown picks
    assert position_bias(0, 16)["follows_position"] and position_bias(16, 16)["follows_position"]
    assert not position_bias(8, 16)["follows_position"] and not position_bias(12, 16)["follows_position"]  # p=.077
    assert not position_bias(0, 5)["follows_position"]  # 5 decisive verdicts cannot reach p < 0.05
    assert position_bias(0, 6)["follows_position"] and not position_bias(0, 0)["follows_position"]


class _Judge:
    """A judge reading position only ("B": the second shown) or content (the response holding "good")."""

    def __init__(self, by: str):
        self.by, self.name = by, f"stub:{by}"

    def judge(self, items):
        from caldpo.eval.judges import Judgement
        if self.by == "position":
            return [Judgement("B", "Verdict: B") for _ in items]
        return [Judgement("A" if "good" in c.a else "B", "") for c in items]


def test_a_judge_following_position_is_warned_about():
    from caldpo.eval.__main__ import evaluate, format_table
    pairs = [(f"\n\nHuman: q {i}?\n\nAssistant:", f" a good answer {i}", f" plain {i}") for i in range(16)]
    biased = evaluate(pairs, _Judge("position"))
    s = biased["summary"]
    assert s["follows_position"] and s["first_shown_preferred"] == 0 and s["decisive"] == 16
    assert s["position_p_value"] == pytest.approx(2 / 2 ** 16)
    table = format_table(biased)
    assert "WARNING: this judge follows position, not content: it preferred the response shown second in 16/16 " \
           "decisive verdicts (two-sided exact binomial test against 1/2: p = 3.1e-05 < 0.05)" in table
    fair = evaluate(pairs, _Judge("content"))
    assert fair["summary"]["wins"] == 16 and not fair["summary"]["follows_position"]
    assert "WARNING" not in format_table(fair) and "p = " in format_table(fair)


def test_the_demo_says_what_its_win_rate_means():
    from caldpo.eval.__main__ import evaluate
    from caldpo.train.demo import win_rate_meaning
    pairs = [(f"\n\nHuman: q {i}?\n\nAssistant:", f" a good answer {i}", f" plain {i}") for i in range(16)]
    line = win_rate_meaning(evaluate(pairs, _Judge("position"))["summary"])
    assert "\n" not in line and "over 16 judged test prompts" in line and "not a measure of quality" in line
    assert "followed position (the WARNING above: p = 3.1e-05)" in line and "reflects the order shown" in line
    assert "followed position" not in win_rate_meaning(evaluate(pairs, _Judge("content"))["summary"])


# ----------------------------------------------------------------------------- local models

@pytest.fixture(scope="module")
def tiny_dir():
    from caldpo.train.tiny import tiny_model_dir
    return tiny_model_dir()


def _hf_samples(tmp_path):
    rows = [{"prompt": "\n\nHuman: What is the capital of Spain?\n\nAssistant:", "response": " Madrid.",
             "reference": " The capital of Spain is Madrid, a city in the centre of the country."},
            {"prompt": "\n\nHuman: Hi there.\n\nAssistant:", "response": " Hello! How can I help you today?",
             "reference": " Hi."},
            {"prompt": "\n\nHuman: What is 6 minus 3?\n\nAssistant:", "response": " 3", "reference": " 6 minus 3 is 3."},
            {"prompt": "SUBREDDIT: r/cats\nTITLE: My cat\nPOST: My cat sleeps all day.\nTL;DR:",
             "response": " cat sleeps", "reference": " My cat sleeps a lot and I wonder why."},
            {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "response": " Blue.", "reference": " Red, or blue."}]
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(rows))
    return path, rows


def test_reward_model_judge_scores_like_the_models_own_forward(tmp_path, tiny_dir):
    from transformers import AutoConfig, AutoTokenizer, GPTNeoXForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_dir)
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = GPTNeoXForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a score head with a spread worth comparing
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.save_pretrained(tmp_path / "rm")
    samples, rows = _hf_samples(tmp_path)
    report = main([str(samples), "--judge", "reward-model", "--reward-model", str(tmp_path / "rm"),
                   "--batch-size", "3", "--device", "cpu", "--out", str(tmp_path / "rm.json")])

    def score(text):  # one unpadded sequence at a time: the last token's score
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            return rm(input_ids=ids).logits[0, 0].double().item()

    for row, it in zip(rows, report["items"]):
        sc, sb = score(row["prompt"] + row["response"]), score(row["prompt"] + row["reference"])
        raw = json.loads(it["raw"])
        shown = dict(zip(it["shown"], (raw["score_a"], raw["score_b"])))
        assert shown["candidate"] == pytest.approx(sc, abs=1e-4) and shown["baseline"] == pytest.approx(sb, abs=1e-4)
        assert it["outcome"] == ("win" if sc > sb else "loss")
    s = report["summary"]
    assert s["wins"] + s["losses"] == 5 and s["unparsable"] == 0


def test_reward_model_judge_refuses_a_model_without_a_reward_head(tmp_path, tiny_dir, capsys):
    """A causal LM's folder loads as a sequence classifier with a randomly initialised score head: refused."""
    samples, _ = _hf_samples(tmp_path)
    code = cli([str(samples), "--judge", "reward-model", "--reward-model", str(tiny_dir), "--device", "cpu",
                "--out", str(tmp_path / "rm.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"caldpo: --reward-model {tiny_dir}: the checkpoint holds no weights for its "
                          "GPTNeoXForSequenceClassification head (score.weight)")
    assert "GPTNeoXForCausalLM" in err and not (tmp_path / "rm.json").exists()


def test_local_lm_judge_reads_the_verdict_tokens(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples, rows = _hf_samples(tmp_path)
    report = main([str(samples), "--judge", "lm", "--judge-lm", str(tiny_dir), "--device", "cpu",
                   "--out", str(tmp_path / "lm.json")])
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    words = {"A": " A", "B": " B", "tie": " tie"}
    tasks = set()
    for row, it in zip(rows, report["items"]):
        a, b = (row["response"], row["reference"]) if it["shown"][0] == "candidate" else (row["reference"], row["response"])
        tasks.add(it["task"])
        msgs = judge_messages(it["task"], row["prompt"], a, b)
        text = msgs[0]["content"] + "\n\n" + msgs[1]["content"] + "\n\nVerdict:"
        ids = tok(text)["input_ids"][-lm.config.max_position_embeddings:]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].double()
        sel = torch.stack([logits[tok(w)["input_ids"][0]] for w in words.values()])
        expected = torch.log_softmax(sel, 0).tolist()
        got = json.loads(it["raw"])["logprobs"]
        assert [got[k] for k in words] == pytest.approx(expected, abs=1e-4)
        verdict = list(words)[int(sel.argmax())]
        assert it["verdict"] == verdict
        cand = "A" if it["shown"][0] == "candidate" else "B"
        assert it["outcome"] == ("tie" if verdict == "tie" else "win" if verdict == cand else "loss")
    assert tasks == {"dialogue", "summarization"}
