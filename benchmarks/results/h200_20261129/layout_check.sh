#!/bin/bash
# Device check for the layouts (issue 11): prefix_shared vs packed vs padded on CUDA, Pythia-410M-shaped
# random GPT-NeoX (V=50304), HH-format sample, Cal-DPO, FSDP2 bf16 on one GPU; sdpa and flex_attention.
set -u
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .r_device/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
W=/tmp/w; mkdir -p $W
python3 - <<'PY'
import shutil, torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from caldpo.train.tiny import tiny_model_dir
tok = tiny_model_dir()
cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=int(__import__("os").environ.get("HID", 1024)), num_hidden_layers=int(__import__("os").environ.get("LAYERS", 24)), num_attention_heads=16,
                    intermediate_size=4 * int(__import__("os").environ.get("HID", 1024)), rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                    tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
GPTNeoXForCausalLM(cfg).save_pretrained("/tmp/w/p410m")
for f in tok.iterdir():
    if "token" in f.name or f.name.endswith(".txt") or f.name.endswith(".json") and "config" not in f.name:
        shutil.copy(f, "/tmp/w/p410m/")
PY
A="model=hf model.name_or_path=/tmp/w/p410m model.tokenizer_name_or_path=$(python3 -c 'from caldpo.train.tiny import tiny_model_dir; print(tiny_model_dir())') model.block_name=GPTNeoXLayer model.reference_dtype=bfloat16 datasets=[sample] loss=caldpo trainer=FSDPTrainer model.fsdp_policy_mp=bfloat16 batch_size=32 n_examples=${NEX:-320} eval_batch_size=32 n_eval_examples=32 do_first_eval=false eval_every=100000 lr=1e-6 device=${DEV:-cuda} export_hf=false export_at_eval=false max_length=512"
for v in "padded sdpa" "packed sdpa" "prefix_shared sdpa" "prefix_shared flex_attention" "padded sdpa"; do
  set -- $v
  d=$W/run_$1_$2_$RANDOM
  timeout 100 python3 -m caldpo.train $A layout=$1 model.attn_implementation=$2 run_dir=$d > $d.log 2>&1; echo "== layout=$1 attn=$2 rc=$?"; grep -E "model |Error|error" $d.log | head -3
  python3 - $d <<'PY'
import json, sys, statistics
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
tr = [r for r in recs if r.get("split") == "train"]
if tr:
    tps = [r["tokens_per_second"] for r in tr[2:]] or [tr[-1]["tokens_per_second"]]
    print(f"   step1 loss {tr[0]['loss']:.6f} chosen {tr[0].get('rewards/chosen')} | median tok/s (steps 3+) {statistics.median(tps):.0f} "
          f"| mfu {statistics.median([r.get('mfu', 0) for r in tr[2:]] or [0]):.3f} | backbone_tokens {tr[-1].get('backbone_tokens')} "
          f"| peak GiB {max(r.get('peak_memory_gb', 0) for r in tr):.1f}")
PY
done
