"""A byte-level tokenizer that needs no training data: token id = byte value."""

from pathlib import Path

BYTE_VOCAB_SIZE = 256
EOS_TOKEN = "<|endoftext|>"  # id 256


def _byte_characters():
    """The printable character that byte-level BPE uses for each byte (as in GPT-2)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters, extra = {}, 0
    for byte in range(BYTE_VOCAB_SIZE):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(BYTE_VOCAB_SIZE + extra)
            extra += 1
    return characters


def byte_tokenizer():
    """A Hugging Face fast tokenizer over raw bytes, plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_characters().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN)


def save_byte_tokenizer(path):
    byte_tokenizer().save_pretrained(str(Path(path)))


# The chat format of tokenizers without a chat template, in mlx_fm.chat and mlx_fm.lora.
PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant: "
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    + PLAIN_USER
    + "{% elif message['role'] == 'assistant' %}"
    + PLAIN_ASSISTANT
    + "{% endif %}"
    "{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + PLAIN_ASSISTANT + "{% endif %}"
)


def with_plain_chat_template(tokenizer):
    """`tokenizer` (mlx-lm's wrapper), given PLAIN_CHAT_TEMPLATE if it has no chat template."""
    if not tokenizer.has_chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        tokenizer.has_chat_template = True
    return tokenizer
