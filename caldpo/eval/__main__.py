"""Judged win rates: ``python -m caldpo.eval SAMPLES.json [--against OTHER.json] --judge ... [options]``.

SAMPLES.json is the JSON list written by ``python -m caldpo.train.generate`` (rows with
"prompt", "response", "reference" and possibly more fields). The candidate is each row's
``--candidate-field`` (default "response"); the baseline is the same row's
``--baseline-field`` (default "reference", the dataset's preferred response), or, with
``--against OTHER.json``, the candidate field of OTHER's row with the same prompt (head
to head; rows are matched by prompt, the n-th repeat of a prompt with the n-th repeat).

Judges (``--judge``):
  reward-model  a local Hugging Face sequence-classification model (``--reward-model DIR``)
                scores prompt + each response; the higher score wins.
  chat          an LLM over the OpenAI-compatible chat-completions protocol (OpenAI, vLLM,
                TGI, llama.cpp): ``--model NAME [--base-url URL]``, the key read from the
                environment variable ``--api-key-env`` (default OPENAI_API_KEY). Verdicts are
                cached in ``--cache`` (default: <report>.cache.jsonl), so a rerun resumes.
  lm            a local causal LM (``--judge-lm DIR``) given the same judging prompt; the
                verdict is its likeliest next token among " A", " B", " tie".

For the two LLM judges the order of the two responses is a seeded coin flip per item
(``--seed``), recorded in the report. The win rate counts ties as half a win (or
excludes them: ``--ties exclude``); its 95% interval is Wilson's score interval.
Unparsable verdicts are reported and left out of the win rate.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from caldpo.files import check_writable, json_text, write_output

from .judges import ChatJudge, Comparison, JudgeError, LocalLMJudge, RewardModelJudge, VerdictCache, shown_order
from .prompts import TASKS, detect_task
from .stats import POSITION_ALPHA, position_bias, win_rate


class EvalError(ValueError):
    """Bad input to the evaluation: printed as one ``caldpo: ...`` line, exit status 2."""


def load_samples(path: str) -> list[dict]:
    """The rows of a samples file; EvalError names the file and what is wrong."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not a JSON samples file ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalError(f"{path}: expected a JSON list of objects (as written by caldpo.train.generate)")
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str):
            raise EvalError(f"{path}: row {i} has no string 'prompt'")
    return rows


def _field(rows: list[dict], field: str, path: str, option: str) -> list[str]:
    for i, r in enumerate(rows):
        if not isinstance(r.get(field), str):
            have = sorted(k for k, v in r.items() if isinstance(v, str) and k != "prompt")
            raise EvalError(f"{option} {field}: row {i} of {path} has no string {field!r}; "
                            f"its text fields are {have}")
    return [r[field] for r in rows]


def build_pairs(samples: str, candidate_field: str, baseline_field: str, against: str | None) -> tuple[list, dict]:
    """[(prompt, candidate, baseline)] and a description of both sides."""
    rows = load_samples(samples)
    cands = _field(rows, candidate_field, samples, "--candidate-field")
    if against is None:
        base = _field(rows, baseline_field, samples, "--baseline-field")
        pairs = [(r["prompt"], c, b) for r, c, b in zip(rows, cands, base)]
        return pairs, {"candidate": f"{samples}:{candidate_field}", "baseline": f"{samples}:{baseline_field}",
                       "unmatched": 0}
    other = load_samples(against)
    other_resp = _field(other, candidate_field, against, "--candidate-field")
    pool: dict[str, list[str]] = {}
    for r, x in zip(other, other_resp):
        pool.setdefault(r["prompt"], []).append(x)
    pairs, unmatched = [], 0
    for r, c in zip(rows, cands):
        q = pool.get(r["prompt"])
        if q:
            pairs.append((r["prompt"], c, q.pop(0)))
        else:
            unmatched += 1
    if not pairs:
        raise EvalError(f"--against {against}: no prompt of {samples} is in it; head to head needs the same prompts")
    return pairs, {"candidate": f"{samples}:{candidate_field}", "baseline": f"{against}:{candidate_field}",
                   "unmatched": unmatched}


OUTCOME = {True: {"A": "win", "B": "loss"}, False: {"A": "loss", "B": "win"}}


def evaluate(pairs: list[tuple[str, str, str]], judge, *, task: str = "auto", seed: int = 0,
             ties: str = "half") -> dict:
    """Judge every (prompt, candidate, baseline); returns the report (summary + per-item records)."""
    comps, firsts = [], []
    for prompt, cand, base in pairs:
        t = detect_task(prompt) if task == "auto" else task
        first = shown_order(seed, prompt, cand, base)
        firsts.append(first)
        comps.append(Comparison(t, prompt, cand if first else base, base if first else cand))
    judgements = judge.judge(comps)
    items, counts = [], {"win": 0, "tie": 0, "loss": 0, "unparsable": 0}
    for i, ((prompt, cand, base), c, first, j) in enumerate(zip(pairs, comps, firsts, judgements)):
        outcome = "unparsable" if j.verdict is None else "tie" if j.verdict == "tie" else OUTCOME[first][j.verdict]
        counts[outcome] += 1
        items.append({"index": i, "task": c.task, "prompt": prompt, "candidate": cand, "baseline": base,
                      "shown": ["candidate", "baseline"] if first else ["baseline", "candidate"],
                      "verdict": j.verdict, "outcome": outcome, "raw": j.raw, "cached": j.cached})
    stats = win_rate(counts["win"], counts["tie"], counts["loss"], ties)
    bias = position_bias(sum(j.verdict == "A" for j in judgements), sum(j.verdict in ("A", "B") for j in judgements))
    summary = {"wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
               "unparsable": counts["unparsable"], "items": len(items), **stats, "ties_rule": ties,
               "ci": "95% Wilson score interval", "candidate_shown_first": sum(firsts),
               # position bias, visible: how often a decisive verdict picked the response shown first, and
               # whether that count is beyond chance (caldpo.eval.stats: two-sided exact binomial test, p < 0.05)
               "first_shown_preferred": bias["first_shown_preferred"], "decisive": bias["decisive"],
               "position_p_value": bias["p_value"], "follows_position": bias["follows_position"]}
    return {"judge": judge.name, "seed": seed, "summary": summary, "items": items}


def format_table(report: dict, sides: dict | None = None) -> str:
    s = report["summary"]
    ties = "ties count half" if s["ties_rule"] == "half" else "ties excluded"
    lines = [f"judge: {report['judge']}"]
    if sides:
        lines.append(f"candidate: {sides['candidate']}   baseline: {sides['baseline']}"
                     + (f"   (unmatched prompts skipped: {sides['unmatched']})" if sides.get("unmatched") else ""))
    lines += [f"{'items':>6}{'wins':>6}{'ties':>6}{'losses':>8}{'unparsable':>12}{'win rate':>10}   95% CI (Wilson, {ties})",
              f"{s['items']:>6}{s['wins']:>6}{s['ties']:>6}{s['losses']:>8}{s['unparsable']:>12}{s['win_rate']:>10.3f}"
              f"   [{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
              f"candidate shown first in {s['candidate_shown_first']}/{s['items']} items (seed {report['seed']}); "
              f"the response shown first preferred in {s['first_shown_preferred']}/{s['decisive']} decisive verdicts"
              + (f" (two-sided binomial test against 1/2: p = {s['position_p_value']:.2g})"
                 if "position_p_value" in s else "")]
    warning = position_warning(s)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def position_warning(summary: dict) -> str | None:
    """The warning line when the judge followed position rather than content (``stats.position_bias``), else None."""
    if not summary.get("follows_position"):
        return None
    k, n = summary["first_shown_preferred"], summary["decisive"]
    side, count = ("first", k) if 2 * k > n else ("second", n - k)
    return (f"WARNING: this judge follows position, not content: it preferred the response shown {side} in "
            f"{count}/{n} decisive verdicts (two-sided exact binomial test against 1/2: p = "
            f"{summary['position_p_value']:.2g} < {POSITION_ALPHA}), while the order was a fair coin flip per item; "
            "the win rate measures where the responses were shown, not what they say")


def make_judge(a: argparse.Namespace, report_path: Path):
    if a.judge == "reward-model":
        if not a.reward_model:
            raise EvalError("--judge reward-model needs --reward-model DIR (a sequence-classification model folder)")
        return RewardModelJudge(a.reward_model, batch_size=a.batch_size, max_length=a.max_length,
                                tie_margin=a.tie_margin, device=a.device, dtype=a.dtype)
    if a.judge == "lm":
        if not a.judge_lm:
            raise EvalError("--judge lm needs --judge-lm DIR (a causal LM folder)")
        return LocalLMJudge(a.judge_lm, device=a.device, max_length=a.max_length, dtype=a.dtype)
    if not a.model:
        raise EvalError("--judge chat needs --model NAME (the served model's name)")
    if importlib.util.find_spec("openai") is None:
        raise EvalError("--judge chat talks through the openai client, which is not installed: "
                        "pip install 'caldpo[eval]' (or pip install openai)")
    key = os.environ.get(a.api_key_env)
    if not key and a.base_url is None:
        raise EvalError(f"--judge chat without --base-url talks to OpenAI, which needs a key: set ${a.api_key_env} "
                        "(or name another variable with --api-key-env)")
    cache_path = check_writable(Path(a.cache) if a.cache else report_path.with_suffix(".cache.jsonl"), "--cache")
    cache = VerdictCache(cache_path)
    return ChatJudge(a.model, base_url=a.base_url, api_key=key, cache=cache, concurrency=a.concurrency,
                     retries=a.retries, backoff=a.backoff, max_tokens=a.max_tokens, timeout=a.timeout, seed=a.seed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caldpo.eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples JSON (a list of {prompt, response, reference, ...})")
    p.add_argument("--against", default=None, help="a second samples file: head to head, matched by prompt")
    p.add_argument("--candidate-field", default="response")
    p.add_argument("--baseline-field", default="reference", help="ignored with --against")
    p.add_argument("--judge", required=True, choices=["reward-model", "chat", "lm"])
    p.add_argument("--task", default="auto", choices=["auto", *TASKS],
                   help="judging prompt; auto: summarization for prompts ending 'TL;DR:', else dialogue")
    p.add_argument("--out", default=None, help="JSON report (default: <samples>.<judge>.eval.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-item order of the two responses")
    p.add_argument("--ties", default="half", choices=["half", "exclude"])
    p.add_argument("--limit", type=int, default=None, help="judge only the first N items")
    g = p.add_argument_group("reward-model / lm judges")
    g.add_argument("--reward-model", default=None, metavar="DIR")
    g.add_argument("--judge-lm", default=None, metavar="DIR")
    g.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's)")
    g.add_argument("--tie-margin", type=float, default=0.0, help="reward-model score gap below which it is a tie")
    g = p.add_argument_group("chat judge")
    g.add_argument("--model", default=None, help="model name on the server, e.g. gpt-4o")
    g.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    g.add_argument("--cache", default=None, help="verdict cache (default: <report>.cache.jsonl)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    g.add_argument("--retries", type=int, default=5, help="retries of a 429 / 5xx / timeout / connection error")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    pairs, sides = build_pairs(a.samples, a.candidate_field, a.baseline_field, a.against)
    if a.limit is not None:
        pairs = pairs[: a.limit]
    out = Path(a.out) if a.out else Path(a.samples).with_suffix(f".{a.judge}.eval.json")
    check_writable(out, "--out")  # before any judging is paid for
    judge = make_judge(a, out)
    report = evaluate(pairs, judge, task=a.task, seed=a.seed, ties=a.ties)
    report["sides"] = sides
    if isinstance(judge, ChatJudge):
        report["requests"] = judge.requests
    write_output(out, json_text(report, indent=1, ensure_ascii=False), "the evaluation report")
    print(format_table(report, sides))
    print(f"report: {out}")
    return report


def cli(argv: list[str] | None = None) -> int:
    from caldpo.cli import run

    def work() -> None:
        main(argv)

    return run(work, errors=(EvalError, JudgeError))


if __name__ == "__main__":
    from caldpo.cli import main as _main

    _main(cli)
