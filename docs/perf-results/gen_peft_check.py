"""GPU check: HFGenerator(static_cache=True) with a PEFT adapter active (as rollouts runs it) vs eager."""
import sys, time
import torch
sys.path.insert(0, ".")
from peft import get_peft_model
from app import bench
from app.models import lora_config
from app.generation import HFGenerator, Sampling

cfg = bench.Config(shape="mistral-7b", num_layers=4, seed=0)
dev = torch.device("cuda")
base = bench.build_model(cfg, dev)
tok = bench.word_tokenizer(base.config.vocab_size); tok.padding_side = "left"
model = get_peft_model(base, lora_config(16, 32, 0.0), adapter_name="sft")
for n, p in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=0.02)
model.eval(); model.config.use_cache = True
prompts = [r["prompt"] for r in bench.texts(bench.Config(shape="mistral-7b", examples=300), base.config.vocab_size)][:300]
res = {}
import os
variants = [(True, 128), (False, 128)] + ([(False, 64)] if os.environ.get("EAGER_TWICE") else [])
for static, bs in variants:
    g = HFGenerator.around(model, tok, adapters=["sft"], batch_size=bs, static_cache=static)
    for rep in range(2 if static else 1):
        t = time.time()
        out = g.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=32, stop=()), adapter="sft")
        torch.cuda.synchronize()
        print(f"static={static} rep={rep} {time.time()-t:.1f}s tokens={sum(c[0].num_tokens for c in out)}", flush=True)
    res[(static, bs)] = out
same = sum(a == b for a, b in zip(res[(True, 128)], res[(False, 128)]))
print(f"greedy identical, static vs eager (batch 128): {same}/{len(prompts)} prompts")
if (False, 64) in res:
    same = sum(a == b for a, b in zip(res[(False, 64)], res[(False, 128)]))
    print(f"greedy identical, eager batch 64 vs eager batch 128 (other padding): {same}/{len(prompts)} prompts")
