# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Greedy answers from a loaded model: chat messages -> model inputs -> `generate` -> decoded text.

The one path the command line (`chat`), the demo, the evaluation and the web app generate through, so that a fix to
prompting or decoding reaches all of them.
"""

import torch


def user_message(images: list, question: str) -> dict:
    """A user turn with one image block per image (a path, PIL image or array), then the question."""
    content = [{"type": "image", "path": image} if isinstance(image, str) else {"type": "image", "image": image}
               for image in images]
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


def build_inputs(processor, conversations: list, **processor_kwargs):
    """Model inputs for one conversation (a list of messages) or a batch of them, ending with the assistant's
    generation prompt; `processor_kwargs` go to the processor (`images`, `padding_side`, `max_length`, ...)."""
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )


def decode_answers(processor, inputs, output_ids: torch.Tensor) -> list[str]:
    """The generated part of each row of `output_ids` `(batch_size, prompt_length + new_tokens)`, as text."""
    new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate_answers(model, processor, conversations: list, max_new_tokens: int = 256, processor_kwargs=None,
                     **generate_kwargs) -> list[str]:
    """Greedy answers, one per conversation. `conversations` is a batch (a list of message lists; padded on the
    tokenizer's side, left for this model); `generate_kwargs` go to `generate` (`streamer`, `stopping_criteria`...)."""
    inputs = build_inputs(processor, conversations, **(processor_kwargs or {})).to(model.device)
    generate_kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return decode_answers(processor, inputs, output_ids)
