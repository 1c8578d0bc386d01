"""A tiny, fully offline Hugging Face tokenizer for tests (and tiny model folders).

WordLevel over a fixed vocabulary with a Whitespace pre-tokenizer (splits words from punctuation runs), so
token ids are easy to read off VOCAB:

  >>> tok = build_tiny_tokenizer()
  >>> tok("the movie was great!").input_ids      # BOS added by the post-processor
  [2, 6, 7, 8, 9, 11]
  >>> tok("the movie", add_special_tokens=False).input_ids
  [6, 7]

Save a model folder's tokenizer with `build_tiny_tokenizer().save_pretrained(folder)`; it loads back with
`transformers.AutoTokenizer.from_pretrained(folder)` (tokenizer.json + tokenizer_config.json + chat template).
"""

import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))

# Words from the test sentences and the built-in catalog templates; anything else maps to <unk> (1).
WORDS = (
    "the movie was great bad ! . , : ): ( - ? "
    "review rating sentiment positive negative 1 2 3 4 5 "
    "Predict associated from following Rating Write a one sentence product with of out "
    "Classify this as or Review Sentiment "
    "sound is good it broke after day I love hate"
).split()
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(WORDS))}

# ChatML-like and minimal: BOS, then "<|role|> content\n" per turn, then "<|assistant|>" to prompt a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_tokenizer(*, add_bos: bool = True,
                         chat_template: str | None = CHAT_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
  """The tiny tokenizer: vocabulary VOCAB (size len(VOCAB)), eos "</s>" (3), bos "<s>" (2), pad "<pad>" (0).

  Args:
    add_bos: prepend "<s>" when special tokens are added (the "default special tokens" of a plain call).
    chat_template: Jinja chat template, or None for a tokenizer without one.
  """
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  # Special tokens are matched before pre-tokenization, so "<|user|>" is one token, not "<|", "user", "|>".
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  if add_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
  if chat_template is not None:
    fast.chat_template = chat_template
  return fast
