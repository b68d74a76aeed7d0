"""Tokenizers built offline, in code, for the built-in models: they are the only part diffusers
would otherwise download. CLIP's byte-level BPE (every CLIP-style text encoder), T5's Unigram
(SD 3.x and FLUX) and Qwen3's byte-level BPE with its chat template (FLUX.2 [klein]), each with
whole-word entries for common prompt words; any text tokenizes.

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


# Qwen3's chat template, as its tokenizer_config.json ships it (FLUX.2 [klein] wraps each prompt
# in it: one user message, the generation prompt, thinking off). A backslash at a line's end
# continues the template's line on the next.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user\
 query.\\n\\nYou are provided with function signatures within <tools></tools> XML\
 tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and\
 arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\":\
 <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and\
 not(message.content.startswith('<tool_response>') and\
 message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content =\
 content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' +\
 reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
# Qwen3's added tokens in its order (ids after the vocabulary's), and whether each is special.
QWEN3_ADDED_TOKENS = [(token, True) for token in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")] + [
    ("<tool_call>", False), ("</tool_call>", False)] + [(token, True) for token in (
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
        "<|file_sep|>")] + [(token, False) for token in (
            "<tool_response>", "</tool_response>", "<think>", "</think>")]


def build_qwen_tokenizer(words=TOKENIZER_WORDS):
    """A Qwen2Tokenizer (Qwen3's class) built offline: byte-level BPE over GPT-2's byte alphabet
    with merges that make each of `words` one token (alone, and after a space: `Ġdog`), then
    Qwen3's added tokens, pad "<|endoftext|>", end "<|im_end|>", and Qwen3's chat template.
    Any text tokenizes."""
    from transformers import AddedToken, Qwen2Tokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in words:
        chain = list(word)
        while len(chain) > 1:  # left to right: w, wo, wor, word
            pair = (chain[0], chain[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            chain = [pair[0] + pair[1]] + chain[2:]
        spaced = (alphabet[ord(" ")], word)  # then the word after a space, whole
        if spaced not in merges:
            merges.append(spaced)
        vocab.setdefault("".join(spaced), len(vocab))
    for token, _ in QWEN3_ADDED_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               model_max_length=131072)
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)
                          for token, special in QWEN3_ADDED_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer
