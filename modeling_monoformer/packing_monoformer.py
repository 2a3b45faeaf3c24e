"""Sequence packing: several training samples in one row, no compute spent on padding.

`pack_batch` turns a right-padded batch from `MonoFormerDataCollator` into packed rows. Each sample keeps its own
position ids (restarting at 0), so `create_causal_mask` (given no 2D mask) recognises the samples and makes the
attention block-diagonal over them, with the usual causal + bidirectional-image mask inside each sample; under
`flex_attention` that is a sparse `BlockMask`. Images keep their order of appearance, so `latents`, `timesteps` and
`diffusion_target` pass through unchanged, and the loss on the same samples is the same as with padding.
"""

import torch


def pack_batch(batch: dict, max_length: int | None = None, pad_token_id: int = 0) -> dict:
    """Pack a right-padded batch (`input_ids`, `attention_mask`, `labels`, + image fields) into rows of at most
    `max_length` tokens (default: the longest sample), next-fit in order: a sample that does not fit the current row
    starts a new one, so samples (and their images) never change order and `latents` stay aligned.

    Returns the same keys with `attention_mask` removed, `position_ids` added and `use_cache=False`: with a cache
    (the LLM's default) `create_causal_mask` does not look for packed samples, so text-only rows would attend across
    them. The first label of every sample is set to -100 so no sample learns to predict its neighbour; leftover row
    space is filled with `pad_token_id` as its own isolated segment (positions restart, labels -100).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
    if bool((attention_mask[:, :-1] < attention_mask[:, 1:]).any()):
        raise ValueError("`pack_batch` needs a right-padded batch (`padding_side='right'`).")
    lengths = attention_mask.sum(1).tolist()
    max_length = max_length or max(lengths)
    if max(lengths) > max_length:
        raise ValueError(f"A sample has {max(lengths)} tokens, more than `max_length`={max_length}.")

    rows: list[list[int]] = []  # sample indices per packed row, in order
    used = 0
    for i, n in enumerate(lengths):
        if not rows or used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    row_len = max(sum(lengths[i] for i in row) for row in rows)

    ids_out = torch.full((len(rows), row_len), pad_token_id, dtype=input_ids.dtype)
    pos_out = torch.zeros((len(rows), row_len), dtype=torch.long)
    lab_out = torch.full((len(rows), row_len), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            ids_out[r, start : start + n] = input_ids[i, :n]
            pos_out[r, start : start + n] = torch.arange(n)
            if labels is not None:
                lab_out[r, start : start + n] = labels[i, :n]
                lab_out[r, start] = -100
            start += n
        pos_out[r, start:] = torch.arange(row_len - start)  # the padding tail is a segment of its own

    packed = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    packed.update(input_ids=ids_out, position_ids=pos_out, use_cache=False)
    if labels is not None:
        packed["labels"] = lab_out
    return packed


__all__ = ["pack_batch"]
