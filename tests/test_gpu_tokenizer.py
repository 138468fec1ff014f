"""The random model's tokenizer that bench/gpu/ measures real servers with: every request's prompt, as the
stress tester writes it, must tokenise to about its length with no unknown token and share no 16-token block
(vLLM's prefix-cache block) with another request's. The data set of 2026-12-02 was measured with a tokenizer
that gave two strings to ids 3-14; `tokenizers` keeps one per id on loading, so prompts collapsed onto the
unknown token and vLLM's prefix cache served a third of them (tests/data/real/README.md)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from stress_tester.prompts import prompt_text

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_random_hf_llama", ROOT / "bench" / "gpu" / "make_random_hf_llama.py")
mk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mk)


def _loaded(tmp_path, write):
    from transformers import PreTrainedTokenizerFast
    write(str(tmp_path))
    return PreTrainedTokenizerFast.from_pretrained(str(tmp_path))  # as vLLM loads it: from the saved files


def _longest_shared_prefix(seqs) -> int:
    seqs = sorted(tuple(s) for s in seqs)
    best = 0
    for a, b in zip(seqs, seqs[1:]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        best = max(best, n)
    return best


def _prompts(tok, salt="40917", n_req=300):
    lengths = [8 + (37 * k) % 900 for k in range(n_req)]
    ids = [tok(prompt_text(n, rid, salt=salt))["input_ids"] for rid, n in enumerate(lengths)]
    return lengths, ids


def test_prompts_are_distinct_and_their_length(tmp_path):
    tok = _loaded(tmp_path, mk.write_tokenizer)
    lengths, ids = _prompts(tok)
    assert all(2 not in s for s in ids)  # t2: the unknown token
    # the marker is "r", the id's digits and the salt's: a handful of tokens over the asked length
    assert all(n <= len(s) <= n + 10 for n, s in zip(lengths, ids))
    assert _longest_shared_prefix(ids) < 16
    # prompts of shared prefix groups share their group's prefix and then part
    shared = [tok(prompt_text(400, rid, prefix=(7,), prefix_tokens=128, salt="5"))["input_ids"] for rid in range(20)]
    assert 128 <= _longest_shared_prefix(shared) < 128 + 16


def test_a_vocabulary_with_two_strings_per_id_would_fail_it(tmp_path):
    """The check can fail: a vocabulary without the prompt's words (../shared/gpu's tokenizer: every word the
    unknown token). The earlier one, the words on ids 3-14 beside t3..t14, broke only where `tokenizers`
    keeps one string per id (releases differ), so it is not the example here."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def broken(out):
        vocab = {f"t{i}": i for i in range(2000)}
        t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Digits(individual_digits=True)])
        t.save(str(Path(out) / "tokenizer.json"))
        (Path(out) / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t2"}')

    tok = _loaded(tmp_path, broken)
    _, ids = _prompts(tok)
    assert sum(s.count(2) for s in ids) > 0.5 * sum(map(len, ids)) or _longest_shared_prefix(ids) >= 16


def test_the_prompt_word_is_one_token(tmp_path):
    """stress probe's default prompt word " the" is one token: a prompt of n asks n - 1 of them."""
    tok = _loaded(tmp_path, mk.write_tokenizer)
    the = tok.convert_tokens_to_ids("the")
    ids = tok(prompt_text(200, 31, salt="1"))["input_ids"]
    assert ids.count(the) == 199 and ids[:4] == tok.convert_tokens_to_ids(["r", "3", "1", "1"])
