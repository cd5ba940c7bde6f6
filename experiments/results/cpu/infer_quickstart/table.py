"""The five precisions' records side by side: python experiments/results/cpu/infer_quickstart/table.py"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
print('| precision | weight bytes | size ratio | held-out ppl (bf16) | quality ratio | MCR | '
      'stdlib_next_line acc / acc_norm | TTFT p50 / p99 ms | TPOT p50 ms | output tok/s | '
      'decode bytes/step |')
print('|---|---|---|---|---|---|---|---|---|---|---|')
for p in ('bf16', 'fp16', 'int8', 'int4', 'fp8'):
  with open(os.path.join(HERE, f'infer_{p}.results.jsonl')) as f:
    r = json.loads(f.read().splitlines()[-1])
  m, q = r['metrics'], r['quality']
  t = q['tasks']['stdlib_next_line']
  print(f"| {p} | {m['compression']['weight_bytes']:,} | {m['compression']['size_ratio']:.3f} | "
        f"{q['eval_perplexity']:.3f} ({q['baseline_eval_perplexity']:.3f}) | "
        f"{q['quality_ratio']:.4f} | {m['compression']['mcr']:.3f} | "
        f"{t['acc']:.3f} / {t['acc_norm']:.3f} | {m['latency']['ttft_ms']['p50']:.0f} / "
        f"{m['latency']['ttft_ms']['p99']:.0f} | {m['latency']['tpot_ms']['p50']:.2f} | "
        f"{m['throughput']['output_tokens_per_s']:.0f} | "
        f"{m['compute']['decode_bytes_per_step']:,} |")
