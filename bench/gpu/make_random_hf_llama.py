"""Random-weight Llama-3-8B-shaped HF checkpoint + a WordLevel tokenizer (tokens `t<id>`, and the stress tester's prompt words).
Timing of an engine does not depend on weight values; prompts can be given as exact token counts."""
import json, os, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

out = sys.argv[1]
shape = sys.argv[2] if len(sys.argv) > 2 else "8b"
os.makedirs(out, exist_ok=True)
V = 128256
if shape == "8b":
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=V, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
else:  # 1b
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=V, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
cfg.torch_dtype = "bfloat16"
t = time.time()
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg)
m.save_pretrained(out, safe_serialization=True)
print("model saved", time.time() - t, flush=True)
# one string per id (tokenizers keeps one string per id when it loads the file): the stress tester's prompt
# words ("r<rid><salt>" split into "r" and single digits, " the" filler, "g" prefix groups) get ids 3..15
WORDS = ["r", "g", "the", "n"] + [str(d) for d in range(10)]
vocab = {f"t{i}": i for i in range(3)}
vocab.update({w: 3 + k for k, w in enumerate(WORDS)})
vocab.update({f"t{i}": i for i in range(3 + len(WORDS), V)})
assert len(set(vocab.values())) == len(vocab) == V
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1", "unk_token": "t2",
           "model_max_length": 8192, "add_bos_token": False,
           "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"},
          open(os.path.join(out, "tokenizer_config.json"), "w"))
json.dump({"bos_token": "t0", "eos_token": "t1", "unk_token": "t2"}, open(os.path.join(out, "special_tokens_map.json"), "w"))
print("done", time.time() - t, flush=True)
