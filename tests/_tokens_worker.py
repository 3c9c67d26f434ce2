"""Worker for tests/test_tokens.py: loads the train split of an HH folder through ``schedule.Examples``
and records how often this process built a token cache file (each build reads every row and
tokenizes them).

``_tokens_worker.py DATA CACHE OUT [--hold-build | --after-build-starts]``. Under torchrun each rank
joins a gloo process group and writes ``OUT/rank<r>.json``; otherwise the process writes
``OUT/<role>.json``. ``--hold-build``: once it is building (the split's lock held) it writes
``OUT/building`` and waits for ``OUT/second_started``; ``--after-build-starts`` waits for
``OUT/building``, writes ``OUT/second_started`` and loads, so it asks while the other builds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from _data_fixtures import char_tokenizer
from caldpo.train import tokens
from caldpo.train.config import load_config
from caldpo.train.distributed import Process
from caldpo.train.schedule import Examples


def _wait_for(path: Path, limit_s: float = 240.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.05)


def main(data: str, cache: str, out: str, role: str = "") -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    calls = {"builds": 0}
    build = tokens.build

    def counting_build(*a, **k):
        calls["builds"] += 1
        if role == "--hold-build":  # the split's lock is held: let the other process ask now
            (out_dir / "building").write_text("")
            _wait_for(out_dir / "second_started")
        return build(*a, **k)

    tokens.build = counting_build
    if role == "--after-build-starts":
        _wait_for(out_dir / "building")
        (out_dir / "second_started").write_text("")
    process = Process.setup("cpu", fsdp=False) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    cfg = load_config(["datasets=[hh]", f"data.paths.hh={data}", f"data.token_cache_dir={cache}", "max_length=64",
                       "max_prompt_length=24", "data.on_error=skip"])
    data_ = Examples(cfg, "train", sft=False, verbose=process is None or process.is_main,
                     tokenizer=char_tokenizer(), process=process)
    name = f"rank{process.rank}" if process is not None else role.lstrip("-") or "single"
    result = {**calls, "fingerprint": data_.fingerprint, "n": len(data_), "file": str(data_.tables[0].path)}
    (out_dir / f"{name}.json").write_text(json.dumps(result))
    if process is not None:
        process.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
