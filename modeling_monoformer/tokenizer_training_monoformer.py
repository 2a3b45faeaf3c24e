"""A byte-level BPE tokenizer trained on a corpus, for models built from scratch (demo recipes, tests, benchmarks).

Models converted from a pretrained LLM keep that LLM's tokenizer; this is for the ones that have none. `tokenizers`
is imported inside the function, so importing this module costs nothing.
"""

from collections.abc import Iterable


def train_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 300,
    *,
    bos_token: str | None = "<s>",
    eos_token: str | None = "</s>",
    pad_token: str | None = "<pad>",
    unk_token: str | None = None,
    padding_side: str | None = None,
):
    """Train a byte-level BPE tokenizer (GPT-2 style: every byte is in the alphabet, so nothing is unknown) on
    `corpus` and wrap it as a `PreTrainedTokenizerFast`. Deterministic for a given corpus and `vocab_size`.

    The special tokens take the first ids in the order pad (or unk), bos, eos: the defaults give `<pad>` = 0, `<s>` = 1,
    `</s>` = 2, as a Llama config with `pad_token_id=0, bos_token_id=1, eos_token_id=2` expects. A special token set to
    None is left out. `padding_side` None keeps transformers' default ("right").

    Example:
        ```python
        >>> from modeling_monoformer import train_bpe_tokenizer
        >>> tok = train_bpe_tokenizer(["a photo of a sneaker", "an ankle boot"] * 10, vocab_size=280)
        >>> tok.convert_ids_to_tokens([0, 1, 2])
        ['<pad>', '<s>', '</s>']
        ```
    """
    if isinstance(corpus, str):
        raise TypeError("`corpus` must be an iterable of texts, not one string: wrap it in a list.")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"`padding_side` must be 'left', 'right' or None, got {padding_side!r}.")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = [t for t in (pad_token, unk_token, bos_token, eos_token) if t is not None]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"`vocab_size` must be at least {smallest} (the {len(alphabet)} byte symbols and {len(special_tokens)} "
            f"special tokens), got {vocab_size}."
        )
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    options = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token,
               "padding_side": padding_side}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in options.items() if v is not None})


__all__ = ["train_bpe_tokenizer"]
