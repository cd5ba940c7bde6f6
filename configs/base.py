"""The full config tree with its defaults: the schema every study config starts from.

A study config (e.g. `quickstart.py`) calls `base.get_config()` and changes only what its
study point changes. Every key that exists here can be overridden on the command line
(`--config.model.num_layers=4`); a key that does not exist is an error, not a new setting.
Fields whose default is "derive it" are typed placeholders (`placeholder(int)`), so an
override still gets type-checked.
"""

from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.kind = 'pretrain'          # experiment registry key (experiments/registry.py)
  c.seed = 0
  # jit: each step one compiled program (XLA fuses it); eager: the same step op by op under
  # jax.disable_jit (each primitive still compiled by XLA on its own), to measure what fusion buys.
  c.execution = 'jit'
  # Set by experiments.sweep, so that a record names its study point (reports group by it).
  st = c.study = config_dict.ConfigDict()
  st.name = placeholder(str)        # the study (configs/studies/<name>.py)
  st.point = placeholder(str)       # the study point: one named set of overrides
  st.axis = placeholder(str)        # the block its points are ranked within (attention, ...)
  st.repeat = placeholder(int)      # which repeat (its seed is `seed`)

  m = c.model = config_dict.ConfigDict()
  # Trained weights to start from (their architecture replaces the fields below; the optimizer
  # starts afresh): 'hf:DIR' (a Hugging Face checkpoint) | 'run:WORKDIR[:STEP]' (a run of this
  # project); None: random initialisation.
  m.init = placeholder(str)
  m.vocab_size = placeholder(int)  # None: the tokenizer's vocabulary rounded up to 128
  m.embed_dim = 2048
  m.num_layers = 24
  m.num_heads = 16
  m.num_kv_heads = placeholder(int)  # None: = num_heads
  m.head_dim = placeholder(int)      # None: embed_dim // num_heads
  m.mlp_dim = 5632
  m.attention = 'mha'               # attention registry key: mha | gqa | mqa | mla | nsa
  m.attention_impl = 'auto'         # auto | xla | cudnn  (jax.nn.dot_product_attention)
  m.qkv_bias = False                # biases on the q/k/v projections (Qwen2)
  m.qk_norm = False                 # RMSNorm on queries and keys per head, before RoPE
  m.sliding_window = placeholder(int)  # keys per query, itself included; None: the whole past
  m.position = 'rope'               # positional-encoding registry key
  m.rope_theta = 10000.0
  m.max_seq_len = placeholder(int)  # longest sequence for learned positions; None: data.seq_len
  y = m.yarn = config_dict.ConfigDict()  # YaRN RoPE scaling (HF's parameters); factor 1 = off
  y.factor = 1.0
  y.original_max_len = 4096
  y.beta_fast = 32.0
  y.beta_slow = 1.0
  y.mscale = 1.0
  y.mscale_all_dim = 0.0
  y.truncate = True                 # round YaRN's ramp ends to whole dims (HF's default)
  l3 = m.llama3_rope = config_dict.ConfigDict()  # Llama 3.1's RoPE scaling (HF's llama3)
  l3.factor = 1.0                   # long wavelengths / this; 1 = off (Llama 3.1: 8, 3.2: 32)
  l3.low_freq_factor = 1.0          # wavelengths > original_max_len / this are scaled fully
  l3.high_freq_factor = 4.0         # wavelengths < original_max_len / this are kept
  l3.original_max_len = 8192        # the context the model was trained at before scaling
  m.linear_rope_factor = 1.0        # HF's linear RoPE scaling: frequencies / this; 1 = off
  r = m.relative = config_dict.ConfigDict()  # position='relative': T5 bucketed bias
  r.num_buckets = 32
  r.max_distance = 128
  la = m.mla = config_dict.ConfigDict()  # attention='mla' (DeepSeek-V2)
  la.q_lora_rank = 0                # 0: no query compression
  la.kv_lora_rank = 512
  la.qk_nope_head_dim = 128
  la.qk_rope_head_dim = 64
  la.v_head_dim = 128
  ns = m.nsa = config_dict.ConfigDict()  # attention='nsa' (native sparse attention)
  ns.block_len = 32                 # l
  ns.stride = 16                    # d
  ns.select_block_len = 64          # l'
  ns.num_selected = 16              # n
  ns.window = 512                   # w
  ns.compression = 'mlp'            # mlp | mean
  ns.implementation = 'auto'        # auto | reference | triton | interpret (kernels/nsa)
  m.ffn = 'dense'                   # FFN registry key: dense | moe
  e = m.moe = config_dict.ConfigDict()  # ffn='moe': sparse mixture of SwiGLU experts
  e.num_experts = 8
  e.top_k = 2
  e.expert_dim = placeholder(int)   # each routed expert's hidden width; None: model.mlp_dim
  e.num_shared_experts = 0          # always-on experts (DeepSeek), computed as one MLP
  e.shared_expert_dim = placeholder(int)  # that MLP's width; None: num_shared_experts·expert_dim
  e.shared_expert_gate = False      # scale the shared MLP by sigmoid(x·w) (Qwen2-MoE)
  e.first_dense_layers = 0          # leading layers with a dense FFN of model.mlp_dim (DeepSeek)
  e.router = 'softmax'              # softmax (Mixtral, DeepSeek-V2) | sigmoid (DeepSeek-V3)
  e.norm_topk_prob = True           # renormalise the top-k weights to sum to 1
  e.routed_scaling_factor = 1.0     # multiplies the routed experts' weights (DeepSeek)
  e.num_groups = 1                  # group-limited routing: experts in this many groups ...
  e.topk_groups = 1                 # ... of which each token may use this many
  e.aux_loss_coef = 0.01            # Switch/GShard load-balancing loss E·Σ fᵢ·Pᵢ
  e.z_loss_coef = 0.0               # router z-loss (ST-MoE)
  e.seq_aux_loss_coef = 0.0         # the same balance per sequence (DeepSeek-V3)
  e.aux_free = False                # DeepSeek-V3's bias balancing, updated after each step ...
  e.bias_update_rate = 0.001        # ... by this much: b += u·sign(mean load - load)
  e.dispatch = 'dropless'           # dense | capacity | dropless
  e.capacity_factor = 1.25          # capacity: slots per expert = factor · tokens · k / experts
  e.grouped_matmul = 'auto'         # dropless: auto | autotune | ragged_dot | triton | mosaic_gpu
                                   #   | tokamax | reference
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.init_std = 0.02
  m.param_dtype = 'float32'
  m.dtype = 'bfloat16'              # compute dtype
  m.scan_layers = True
  m.remat = 'none'                  # none | full | dots_saveable

  f = c.finetune = config_dict.ConfigDict()  # kind='finetune' (efficientjax/peft, peft's names)
  f.method = 'lora'                 # full | freeze | lora | lora_plus | rslora | dora | pissa
  f.target_modules = 'all-linear'   # LoRA family: all-linear (not lm_head) or comma-separated
                                    #   q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj ...
  f.rank = 8                        # r
  f.alpha = 16.0                    # lora_alpha: scaling alpha/r (rslora: alpha/sqrt(r))
  f.dropout = 0.0                   # lora_dropout, on the adapter's input while training
  f.init = placeholder(str)         # kaiming | gaussian | pissa | pissa_niter_K; None: the
                                    #   method's (pissa: pissa, others: kaiming)
  f.lora_plus_ratio = 16.0          # lora_plus: B's (and 1-D params') rate over A's
  f.freeze_layers = 2               # freeze: the last N layers train; -N: the first N
  f.freeze_modules = 'all'          # freeze: all, or comma-separated parts of those layers
                                    #   (attn, mlp, q_proj, attn_norm ...)
  f.freeze_extra = ''               # freeze: comma-separated top-level modules that also train
                                    #   (embed, lm_head, final_norm)
  f.base_dtype = placeholder(str)   # the frozen base's dtype (bfloat16 halves it); None:
                                    #   model.param_dtype
  f.export = 'adapter'              # at the end: adapter (<workdir>/adapter, peft's files) |
                                    #   merged (<workdir>/merged, a HF checkpoint) | none

  i = c.inference = config_dict.ConfigDict()  # kind='inference' (efficientjax/infer, quant)
  i.precision = 'bf16'              # bf16 | fp16 | int8 | int4 | fp8 (efficientjax/quant)
  i.quant_method = 'rtn'            # int8/int4: rtn | awq | gptq (awq/gptq calibrate on the corpus)
  i.group_size = 128                # int4: input features per scale (32, 64, 128)
  i.symmetric = True                # int4: False adds a zero point per group
  i.quantize_lm_head = False        # AWQ and GPTQ leave the head in 16 bits; so do we by default
  i.calibration_samples = 128       # awq/gptq: sequences of data.seq_len from the training split
  i.kv_cache_dtype = placeholder(str)  # bfloat16 | float16 | float32 | int8 (a scale per token
                                    #   and head); None: the compute dtype
  i.num_slots = 16                  # requests decoded together (the decode batch)
  i.max_len = 2048                  # longest request, prompt + output (the cache's length)
  i.prefill_chunk = 512             # most prompt tokens one prefill call runs
  i.prompts = placeholder(str)      # jsonl:PATH | a corpus (its held-out documents) | synthetic;
                                    #   None: data.corpus
  i.num_requests = 64
  i.input_lengths = 'uniform:128:512'  # prompt tokens (not read for jsonl): N | uniform:A:B |
                                    #   normal:MEAN:STD
  i.output_lengths = '256'          # tokens to generate per request (same forms)
  i.scenario = 'offline'            # MLPerf's: offline (all at once) | server (Poisson arrivals)
  i.rate_per_s = 4.0                # server: mean arrivals per second
  i.stop_at_eos = False             # end a request at the tokenizer's eos (else at output_len)
  i.temperature = 0.0               # 0: greedy
  i.top_k = 0                       # 0: off
  i.top_p = 1.0                     # 1: off
  i.eval_batches = 8                # held-out perplexity: batches of num_slots × data.seq_len
  i.eval_tasks = ''                 # comma-separated lm-eval multiple-choice task YAMLs (local
                                    #   data) or offline tasks: stdlib_next_line
  i.eval_limit = placeholder(int)   # documents per task; None: all

  d = c.data = config_dict.ConfigDict()
  d.corpus = 'stdlib'               # pretrain: stdlib | text:GLOB | hf:NAME[:CONFIG] | synthetic;
                                    #   finetune: functions[:GLOB] | jsonl:PATH
  d.tokenizer = 'byte'              # byte | a Hugging Face tokenizer.json | checkpoint directory
  d.eos_token = placeholder(str)    # HF tokenizers: the separator token (default: eos_token of
                                    # tokenizer_config.json, else guessed)
  d.seq_len = 1024
  d.eval_fraction = 0.02            # share of documents held out (by a hash of their name)
  d.max_documents = placeholder(int)

  t = c.train = config_dict.ConfigDict()
  t.steps = 1000
  t.global_batch_size = 32          # sequences per optimizer step, summed over all devices
  t.grad_accum_steps = 1            # the global batch is split into this many micro-batches
  t.learning_rate = 3e-4            # peak
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1              # cosine decays to learning_rate * min_lr_ratio
  t.weight_decay = 0.1              # AdamW; never applied to norm gains or biases
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip_norm = 1.0            # 0 disables clipping
  t.opt_state_dtype = 'float32'     # AdamW's moments: float32 | bfloat16 (half the bytes)
  t.offload_optimizer = False       # keep the moments in host memory (pinned_host), brought to
                                    #   the device for the update only (GPU/TPU; GH200: C2C)
  t.eval_every = 200                # steps; 0: only at the start and the end
  t.eval_batches = 8
  t.log_every = 10
  t.checkpoint_every = 500          # steps; 0 disables checkpoints
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.resume_step = placeholder(int)  # resume from this checkpoint step; None: the newest good one
  t.on_bad_checkpoint = 'fallback'  # fallback: set a damaged checkpoint aside, use an older one | fail
  t.on_nonfinite = 'stop'           # a step with non-finite loss/gradients/params: stop | skip
  t.max_skipped_steps = 10          # on_nonfinite='skip': stop after this many skipped steps
  t.timing_warmup_steps = 2         # steps after compilation left out of the timings

  me = c.metrics = config_dict.ConfigDict()
  me.sample_interval_s = 0.1        # memory / power sampler period
  me.peak_flops_per_s = placeholder(float)  # per device; None: the table in metrics/peaks.py
  me.peak_bandwidth_bytes_per_s = placeholder(float)  # per device, for MBU; None: the table

  p = c.profile = config_dict.ConfigDict()
  p.steps = 0                       # >0: trace that many steps after warm-up (excluded from timings)

  mesh = c.mesh = config_dict.ConfigDict()
  # Devices per mesh axis; -1 takes what the others leave. Default: pure FSDP.
  mesh.data = 1
  mesh.fsdp = -1
  mesh.tensor = 1
  mesh.expert = 1
  return c


def smoke_training(c: config_dict.ConfigDict) -> None:
  """The training side of a `:smoke` preset: a few fp32 steps on short sequences of a small
  corpus, with an evaluation and a checkpoint on the way, so a laptop CPU runs it in seconds."""
  c.model.dtype = 'float32'  # bf16 matmuls are emulated on CPUs and run slower than fp32
  c.model.remat = 'none'
  c.data.seq_len = 64
  c.data.max_documents = 200
  c.train.steps = 6
  c.train.global_batch_size = 4
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 2
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
