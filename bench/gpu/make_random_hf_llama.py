"""Random-weight Llama-3-8B-shaped HF checkpoint + a WordLevel tokenizer (tokens `t<id>`, and the words the
stress tester's prompts are made of). Timing of an engine does not depend on weight values.

    python bench/gpu/make_random_hf_llama.py OUT [8b|1b]      # on the GPU machine (~20 s)

The tokenizer gives each prompt word its own id: the stress tester writes `r<request id><salt>` then the
prompt word (`stress probe`'s default " the") repeated, and `g<group><salt>` for shared prefixes, so the
digits are split one by one and every request's prompt starts with tokens no other request of the run has.
A vocabulary that maps two strings to one id loses one of them when `tokenizers` loads it, and a prompt word
missing from the vocabulary is the unknown token: either way prompts collide and a prefix cache serves them
without telling the client (tests/test_gpu_tokenizer.py checks both)."""
import json
import os
import sys
import time

V = 128256
WORDS = ["r", "g", "the", "n"] + [str(d) for d in range(10)]  # ids 3..16; t0/t1/t2 are bos/eos/unk


def tokenizer(vocab_size: int = V):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(3)}
    vocab.update({w: 3 + k for k, w in enumerate(WORDS)})
    vocab.update({f"t{i}": i for i in range(3 + len(WORDS), vocab_size)})
    assert len(set(vocab.values())) == len(vocab) == vocab_size  # one string per id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return tok


def write_tokenizer(out: str, vocab_size: int = V) -> None:
    tokenizer(vocab_size).save(os.path.join(out, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1", "unk_token": "t2",
               "model_max_length": 8192, "add_bos_token": False,
               "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    json.dump({"bos_token": "t0", "eos_token": "t1", "unk_token": "t2"},
              open(os.path.join(out, "special_tokens_map.json"), "w"))


def main(out: str, shape: str = "8b") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    os.makedirs(out, exist_ok=True)
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
    write_tokenizer(out)
    print("done", time.time() - t, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "8b")
