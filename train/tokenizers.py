"""Tokenizers built offline, in code, for the built-in models: they are the only part diffusers
would otherwise download. CLIP's byte-level BPE (every CLIP-style text encoder) and T5's Unigram
(SD 3.x and FLUX), each with whole-word entries for common prompt words; any text tokenizes.

    python -c "from train.tokenizers import build_t5_tokenizer as t5; print(t5()('a dog'))"
"""

from __future__ import annotations

TOKENIZER_WORDS = (
    "a an the photo picture image of in on at with and wearing sks zwx ohwx person man woman "
    "dog cat toy bag backpack can clock bowl shoe glasses plushie vase sneaker teapot boot car "
    "red green blue yellow white black beach snow city forest background style painting").split()


def build_tokenizer(pad_token: str = "<|endoftext|>", words=TOKENIZER_WORDS):
    """A CLIPTokenizer built offline: CLIP's byte alphabet, each byte also as a word end
    (`x</w>`), and merges that make each of `words` one token. Any text tokenizes."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def build_t5_tokenizer(words=TOKENIZER_WORDS, model_max_length: int = 512):
    """A T5Tokenizer built offline: a Unigram model with `words` as whole pieces (after T5's
    word-start mark "▁") and single characters as the fallback, "<pad>" 0, "</s>" 1, "<unk>" 2
    as T5's; it appends "</s>" to every prompt as T5's does."""
    from transformers import T5Tokenizer

    chars = sorted({ch for word in words for ch in word} | set("abcdefghijklmnopqrstuvwxyz"
                                                                "0123456789.,'-!?#"))
    # Unigram scores are log-probabilities: a whole word beats spelling it out.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [(ch, -8.0) for ch in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
