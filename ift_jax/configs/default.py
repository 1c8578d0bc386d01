"""The embedded default: fine-tune SmolLM2-135M-Instruct on real data (review ratings, movie sentiment, yes/no
questions, news summaries), in minutes on a 2-core CPU; one rating template is held out to test transfer.

Every field a user can override with `--config.section.key=value`. Units are given in the comments.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # data order, splits and any random init

  c.model = ml_collections.ConfigDict()
  c.model.path = "smollm2-135m-instruct"  # catalog name, Hugging Face folder, or .gguf file
  # activations and matmuls; master weights stay float32. auto: float32 on CPU (faster there), bfloat16 elsewhere
  c.model.compute_dtype = "auto"
  c.model.remat = "none"  # none | full | dots: recompute activations in the backward pass (needs scan_layers)
  # auto: cudnn on NVIDIA GPUs in bfloat16/float16, splash on TPUs (heads a multiple of 128), else einsum
  # | einsum (any backend) | jax (jax.nn.dot_product_attention) | cudnn (cuDNN flash attention; GPU, 16-bit
  # compute) | splash (Pallas splash attention with segment ids; TPU)
  c.model.attention = "auto"
  c.model.scan_layers = False  # True: one compiled layer in a loop (fast compiles for deep models); False: unrolled
  # positions per fused cross-entropy chunk: logits never whole, unweighted positions skipped; 0 = whole-row logits
  c.model.loss_chunk = 32

  c.data = ml_collections.ConfigDict()
  # comma-separated: catalog names (amazon_reviews, rotten_tomatoes, imdb, boolq, xsum), files, folders, hf:NAME
  c.data.source = "amazon_reviews,rotten_tomatoes,boolq,xsum"
  c.data.templates = ""  # YAML file of templates; "" = the built-in templates of the catalog datasets
  # comma-separated source/template names kept out of training and evaluated only (does it transfer?)
  c.data.holdout_templates = "amazon_reviews/stars_question"
  c.data.seq_len = 128  # tokens per row (static shape)
  c.data.packing = True  # several examples per row, kept apart by segment ids; False = one example per row
  c.data.chat = False  # wrap each prompt in the tokenizer's chat template as a user turn
  c.data.validation_fraction = 0.1  # of records, for sources without their own validation split
  c.data.test_fraction = 0.1  # of records, for sources without their own test split
  c.data.max_train_examples = 0  # cap on training examples after templating (0 = all); capped count is logged
  c.data.max_eval_examples = 60  # per template and eval split (0 = all); the cap is logged
  c.data.shards = 8  # fixed data shards; a multiple of the process count; keep it when resuming elsewhere
  c.data.skip_malformed = False  # skip (and count) malformed lines in data files instead of stopping

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # global rows per step, over all devices and micro-batches
  c.train.grad_accum = 1  # micro-batches per step; batch_size must divide by grad_accum × data-parallel size
  c.train.steps = 80  # optimizer steps; 0 = derive from train.epochs
  c.train.epochs = 1  # passes over the training data, used when train.steps is 0
  c.train.eval_every = 40  # steps between validation evaluations (also at step 0: the base model)
  c.train.eval_batch_size = 16  # rows per eval step
  c.train.log_every = 1  # steps between train metric lines in metrics.jsonl
  c.train.skip_nonfinite = False  # NaN/inf loss or gradient: False = stop (keep last good checkpoint); True = skip

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # peak learning rate
  c.optim.warmup_steps = 8  # linear warmup from 0 to optim.lr
  c.optim.end_lr_ratio = 0.1  # cosine decay ends at lr × this, at the last step
  c.optim.weight_decay = 0.01  # AdamW decoupled decay, not applied to norms and biases
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0  # global gradient-norm clipping

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel replicas; -1 = all devices left after fsdp and tensor
  c.mesh.fsdp = 1  # parameter-sharded data parallelism
  c.mesh.tensor = 1  # tensor (model) parallelism over heads, MLP and vocabulary

  c.eval = ml_collections.ConfigDict()  # `ift-jax eval`: task metrics of base and fine-tuned models
  c.eval.k_shot = 3  # solved train examples in the base model's few-shot prompt (0 = no few-shot row)
  c.eval.max_prompt_tokens = 512  # few-shot prompts drop whole examples to fit this
  c.eval.max_new_tokens = 48  # generated tokens for free-text templates (choice templates need fewer)
  c.eval.compute_dtype = "float32"  # exact scores; "" = model.compute_dtype

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 40  # steps between checkpoints (and always at the end)
  c.checkpoint.keep = 2  # most recent checkpoints kept
  c.checkpoint.best_metric = "validation/loss"  # kept separately under DIR/best
  c.checkpoint.best_mode = "min"  # min | max
  return c
