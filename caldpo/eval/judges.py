"""The judges: a reward model, an LLM over the chat-completions protocol, a local causal LM.

Every judge maps a list of ``Comparison`` (prompt, response A, response B as shown) to a
list of ``Judgement`` (verdict "A" / "B" / "tie" / None for unparsable, the raw text).
Which of the two compared responses is shown as A is decided by ``shown_order``: a
seeded hash of the item, so the order is random across items (cancelling a judge's
position bias), reproducible, and the same on a resumed run.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from caldpo.files import OutputError, free_space, os_reason, prepare_jsonl

from .prompts import PROMPT_VERSION, judge_messages, parse_verdict


class JudgeError(RuntimeError):
    """A judge that cannot run (bad model folder, refused request, exhausted retries)."""


@dataclass(frozen=True)
class Comparison:
    task: str   # "dialogue" | "summarization"
    prompt: str
    a: str      # response shown first
    b: str      # response shown second


@dataclass
class Judgement:
    verdict: str | None  # "A" | "B" | "tie" | None (unparsable)
    raw: str
    cached: bool = False


def shown_order(seed: int, prompt: str, candidate: str, baseline: str) -> bool:
    """True when the candidate is shown as A: one seeded coin flip per (prompt, candidate, baseline)."""
    h = hashlib.sha256(json.dumps([seed, prompt, candidate, baseline]).encode()).digest()
    return h[0] & 1 == 0


def _device(device: str):
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- reward model

def _load_hf(path: str, auto_cls, option: str, device: str, dtype: str):
    """(device, tokenizer, model in eval mode) of a local Hugging Face folder; JudgeError if it is not one, or
    if the checkpoint lacks weights the model class needs (transformers would initialise them at random: a
    causal LM's folder loaded as a sequence classifier gets a random score head) or holds them in other shapes.

    dtype "auto": bfloat16 on CUDA, float32 elsewhere.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from caldpo.hf import from_pretrained
    p = Path(path)
    if not (p / "config.json").is_file():
        raise JudgeError(f"{option} {path}: not a Hugging Face model folder (no config.json)")
    dev = _device(device)
    torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede the one line said below
    try:
        model, info = from_pretrained(auto_cls, p, dtype=torch_dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        prefix = getattr(model, "base_model_prefix", "")
        head = [k for k in missing if prefix and not k.startswith(prefix + ".")]
        archs = ", ".join(getattr(model.config, "architectures", None) or ["?"])
        what = (f"no weights for its {type(model).__name__} head ({', '.join(head[:4])})" if head
                else f"no weights for {len(missing)} of its parameters ({', '.join(missing[:4])})" if missing
                else f"weights of other shapes for {', '.join(mismatched[:4])}")
        raise JudgeError(f"{option} {path}: the checkpoint holds {what}; transformers would initialise them at "
                         f"random and the judge would score noise. The folder was saved from {archs}: give "
                         f"{'a reward model (a sequence-classification checkpoint with its trained score head)' if auto_cls.__name__.endswith('SequenceClassification') else 'a complete model folder'}")
    return dev, AutoTokenizer.from_pretrained(p), model.to(dev).eval()


class RewardModelJudge:
    """A Hugging Face sequence-classification model scoring ``prompt + response``.

    Score = the single logit (``num_labels == 1``) or logit[1] - logit[0] (two labels). Verdict:
    A when score(A) - score(B) > ``tie_margin``, B when < -``tie_margin``, else tie. Texts are
    right-padded in batches of ``batch_size`` and truncated to ``max_length`` tokens keeping the
    end (the response); runs on CUDA when available (``device="auto"``).
    """

    def __init__(self, path: str, *, batch_size: int = 16, max_length: int | None = None, tie_margin: float = 0.0,
                 device: str = "auto", dtype: str = "auto"):
        from transformers import AutoModelForSequenceClassification
        self.device, self.tok, self.model = _load_hf(path, AutoModelForSequenceClassification, "--reward-model",
                                                     device, dtype)
        if self.model.config.num_labels not in (1, 2):
            raise JudgeError(f"--reward-model {path}: {self.model.config.num_labels} labels; a reward model has 1 "
                             "(a score) or 2 (logit[1] - logit[0])")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"
        self.max_length = max_length or min(int(getattr(self.tok, "model_max_length", 1 << 30)),
                                            int(getattr(self.model.config, "max_position_embeddings", 1 << 30)))
        self.batch_size = batch_size
        self.tie_margin = tie_margin
        self.name = f"reward-model:{Path(path).resolve()}"

    def scores(self, texts: list[str]) -> list[float]:
        """One float score per text (prompt + response)."""
        import torch
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits.float()
                sc = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
                out += sc.cpu().tolist()
        return out

    def judge(self, items: list[Comparison]) -> list[Judgement]:
        sc = self.scores([c.prompt + x for c in items for x in (c.a, c.b)])
        res = []
        for i in range(len(items)):
            sa, sb = sc[2 * i], sc[2 * i + 1]
            if math.isnan(sa) or math.isnan(sb):
                v = None
            else:
                v = "A" if sa - sb > self.tie_margin else "B" if sb - sa > self.tie_margin else "tie"
            res.append(Judgement(v, json.dumps({"score_a": sa, "score_b": sb})))
        return res


# ----------------------------------------------------------------------------- local causal LM

VERDICT_WORDS = {"A": " A", "B": " B", "tie": " tie"}


class LocalLMJudge:
    """A local causal LM prompted with the same judging prompt, read through its next-token probabilities.

    The judging text is the chat template of ``judge_messages`` when the tokenizer has one,
    else the system and user messages joined by blank lines; then ``"\\n\\nVerdict:"``. The
    verdict is the likeliest of the first tokens of " A", " B" and " tie" (no sampling); the
    raw text records the three log-probabilities (renormalised over the three).
    """

    def __init__(self, path: str, *, device: str = "auto", max_length: int | None = None, dtype: str = "auto"):
        from transformers import AutoModelForCausalLM
        self.device, self.tok, self.model = _load_hf(path, AutoModelForCausalLM, "--judge-lm", device, dtype)
        self.max_length = max_length or int(getattr(self.model.config, "max_position_embeddings", 4096))
        ids = {}
        for k, w in VERDICT_WORDS.items():
            t = self.tok(w, add_special_tokens=False)["input_ids"]
            if not t:
                raise JudgeError(f"--judge-lm {path}: its tokenizer encodes {w!r} as nothing")
            ids[k] = t[0]
        if len(set(ids.values())) != 3:
            raise JudgeError(f"--judge-lm {path}: ' A', ' B' and ' tie' share a first token; cannot read a verdict")
        self.verdict_ids = ids
        self.name = f"local-lm:{Path(path).resolve()}"

    def judging_text(self, c: Comparison) -> str:
        msgs = judge_messages(c.task, c.prompt, c.a, c.b)
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Verdict:"
        return "\n\n".join(m["content"] for m in msgs) + "\n\nVerdict:"

    def verdict_logprobs(self, c: Comparison) -> dict[str, float]:
        """log P(verdict) renormalised over the three verdict tokens, at the position after "Verdict:"."""
        import torch
        ids = self.tok(self.judging_text(c), add_special_tokens=False)["input_ids"][-self.max_length:]
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1].float()
        sel = torch.stack([logits[self.verdict_ids[k]] for k in VERDICT_WORDS])
        lp = torch.log_softmax(sel, 0).cpu().tolist()
        return dict(zip(VERDICT_WORDS, lp))

    def judge(self, items: list[Comparison]) -> list[Judgement]:
        res = []
        for c in items:
            lp = self.verdict_logprobs(c)
            v = None if any(math.isnan(x) for x in lp.values()) else max(lp, key=lp.get)
            res.append(Judgement(v, json.dumps({"logprobs": lp})))
        return res


# ----------------------------------------------------------------------------- chat completions

MAX_STORED_CHARS = 16384  # of a judge's reply, in the cache and the report (the verdict is on its last line)
BODY_SHOWN = 200  # bytes of a malformed reply's body quoted in the error


def bounded(raw: str) -> str:
    """``raw`` as stored: at most ``MAX_STORED_CHARS`` characters, its end kept (the verdict line), with a
    first line saying how much was cut. A server that ignores ``max_tokens`` cannot grow the cache or the
    report without bound."""
    if len(raw) <= MAX_STORED_CHARS:
        return raw
    return f"[caldpo: the first {len(raw) - MAX_STORED_CHARS} characters of this reply were not stored]\n" + \
        raw[-MAX_STORED_CHARS:]


class VerdictCache:
    """Raw judge replies on disk (JSON lines), keyed by judge, prompt version and the text judged.

    Appended and flushed after every reply, so an interrupted evaluation loses nothing it
    paid for; a later run with the same cache file reads them back instead of asking again.
    On open, a torn last line (a kill or a full disk mid-write) is cut (``caldpo.files.prepare_jsonl``,
    as ``metrics.jsonl`` is), so the next reply starts a line of its own. Empty replies are not stored
    (and ones an older caldpo stored are ignored): they are asked again. Replies are stored ``bounded``.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            try:
                prepare_jsonl(self.path)
            except OSError as e:
                raise JudgeError(f"verdict cache {self.path}: cannot be repaired ({os_reason(e)}); "
                                 "pass another --cache") from None
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    if isinstance(rec["raw"], str) and rec["raw"]:
                        self.data[rec["key"]] = rec["raw"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([judge, PROMPT_VERSION, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, raw: str) -> None:
        if not raw:
            return
        raw = bounded(raw)
        with self.lock:
            self.data[key] = raw
            if self.path:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"key": key, "raw": raw}) + "\n")
                except OSError as e:  # a torn line left here is cut on the next open
                    raise OutputError(f"writing the verdict cache {self.path} failed: {os_reason(e)} "
                                      f"({free_space(self.path.parent)}); the replies stored before are kept. Free "
                                      "space (or pass another --cache) and run again: it asks only for the rest",
                                      exit_code=3) from None


class MalformedReply(ValueError):
    """A 200 reply whose body is not a chat completion holding a reply (``reason``; ``body``: its bytes)."""

    def __init__(self, reason: str, body: bytes):
        super().__init__(reason)
        self.reason, self.body = reason, body


def reply_text(body: bytes) -> str:
    """The reply of a chat-completions response body: ``choices[0].message.content`` ("" when the message has
    no content). Raises MalformedReply for a body that is not JSON, or has no ``choices``, an empty or
    mistyped one, or no message."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedReply("not JSON", body) from None
    if not isinstance(data, dict):
        raise MalformedReply(f"a JSON {type(data).__name__}, not an object", body)
    choices = data.get("choices")
    if choices is None:
        err = data.get("error")
        detail = f" (its 'error': {err.get('message', err) if isinstance(err, dict) else err})" if err else ""
        raise MalformedReply(f"no 'choices'{detail}", body)
    if not isinstance(choices, list) or not choices:
        raise MalformedReply("'choices' is empty" if choices == [] else "'choices' is not a list", body)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise MalformedReply("'choices[0]' has no 'message'", body)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"'choices[0].message.content' is a {type(content).__name__}, not text", body)
    return content or ""


class ChatJudge:
    """An LLM judge over the OpenAI-compatible chat-completions protocol (the official ``openai`` client).

    ``base_url`` None means OpenAI itself. Requests run ``concurrency`` at a time; a 429, a
    5xx, a timeout or a dropped connection is retried up to ``retries`` times with
    exponential backoff (``backoff`` s, doubling, with jitter), and so is a 200 whose body is not
    a chat completion (``reply_text``); any other refusal (401, 404, 400...) stops the evaluation
    with the server's message. Decoding is greedy (temperature 0). Replies are cached
    (``VerdictCache``) before they are parsed; an empty one is asked again once and never cached.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 cache: VerdictCache | None = None, concurrency: int = 8, retries: int = 5, backoff: float = 1.0,
                 max_tokens: int = 256, timeout: float = 120.0, seed: int = 0):
        import openai
        self.openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout)
        self.model, self.base_url = model, base_url
        self.cache = cache or VerdictCache(None)
        self.concurrency, self.retries, self.backoff = max(1, concurrency), retries, backoff
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.requests = 0
        self._count_lock = threading.Lock()
        self.name = f"chat:{base_url or 'https://api.openai.com/v1'}:{model}"

    def _count(self) -> None:
        with self._count_lock:
            self.requests += 1

    def _ask(self, messages: list[dict]) -> str:
        """The reply text. Transient failures are retried up to ``retries`` times with backoff: 429, 5xx,
        timeouts, dropped connections, and a 200 whose body is not a chat completion (a gateway's HTML page,
        no or empty ``choices``); an empty reply is asked again once. Raises JudgeError naming the server
        (and, for a malformed body, its first bytes)."""
        o = self.openai
        attempt, asked_again = 0, False
        while True:
            self._count()
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=0.0, max_tokens=self.max_tokens)
                text = reply_text(raw.http_response.content)
            except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError,
                    MalformedReply) as e:
                if attempt == self.retries:
                    if isinstance(e, MalformedReply):
                        raise JudgeError(
                            f"{self.name}: the server answered 200 with a body that is not a chat completion "
                            f"({e.reason}; {len(e.body)} bytes, starting {e.body[:BODY_SHOWN]!r}), "
                            f"{attempt + 1} attempt{'s' if attempt else ''}; is --base-url the server's "
                            "OpenAI-compatible /v1 endpoint?") from None
                    raise JudgeError(f"{self.name}: gave up after {attempt + 1} attempts: {e}") from None
                time.sleep(self.backoff * 2 ** attempt * (0.5 + self.rng.random()))
                attempt += 1
                continue
            except o.APIStatusError as e:
                raise JudgeError(f"{self.name}: the server refused the request ({e.status_code}): {e.message}") from None
            if text or asked_again:
                return text
            asked_again = True

    def _one(self, c: Comparison) -> Judgement:
        messages = judge_messages(c.task, c.prompt, c.a, c.b)
        key = self.cache.key(self.name, messages)
        raw = self.cache.get(key)
        cached = raw is not None
        if raw is None:
            raw = self._ask(messages)
            self.cache.put(key, raw)  # stored bounded; an empty reply is not stored (asked again next run)
        return Judgement(parse_verdict(raw), bounded(raw), cached)

    def judge(self, items: list[Comparison]) -> list[Judgement]:
        """Every item's judgement; on the first JudgeError the items not yet asked are not asked (the replies
        in flight are still cached)."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            return list(pool.map(self._one, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
