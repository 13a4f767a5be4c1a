# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""QilinProcessor: QilinImageProcessor + the Llama tokenizer + the vicuna `v1` chat template.

Remote code: imports only torch/numpy/PIL/transformers and flat siblings.
"""

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

# The placeholder that stands for one image in prompts, records and templates (the tokenizer's special token).
IMAGE_TOKEN = "<image>"

# The vicuna `v1` template Qilin-Med-VL was trained with (LLaVA `conv_vicuna_v1`): the system prompt, then
# "USER: ... ASSISTANT: ...</s>" turns, a space after each user turn and "</s>" after each assistant turn.
# Image blocks render as "<image>\n" where they stand in the content, which for one leading image is exactly the
# original's "<image>\n{question}".
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The assistant part (the space after "ASSISTANT:", the answer and "</s>") is wrapped in generation tags so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the supervised tokens. The space is
# supervised because a generation prompt ends at "ASSISTANT:": the model must learn to produce it (with SentencePiece
# it is merged into the answer's first token anyway), and the last instruction token is then ":" in training and
# at inference alike, which is where HiA reads h_last.
_RENDER_CONTENT = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
VICUNA_V1_CHAT_TEMPLATE = (
    _RENDER_CONTENT
    + "{%- set ns = namespace(system='" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + render_content(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + render_content(message['content']) + '</s>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
# LLaVA's `plain` template for alignment (stage 1): the images alone stand for the user turn (its text is dropped,
# as the original did), then the caption and "\n". Use with `apply_chat_template(..., chat_template="plain")`.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{- '<image>' * (message['content'].count('<image>')) -}}"
    "{%- else -%}{%- for block in message['content'] -%}{%- if block['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -}}"
    "{%- endif -%}{{- '\\n' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class QilinProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": True, "add_special_tokens": True, "return_offsets_mapping": False}}


# Text options that change nothing here: the prompt is tokenized piecewise around the placeholders, never truncated.
NO_EFFECT_TEXT_KWARGS = {"return_attention_mask": True, "return_token_type_ids": None, "verbose": True}


class QilinProcessor(ProcessorMixin):
    r"""
    Builds model inputs from text with `<image>` placeholders and the images they stand for.

    Each `<image>` becomes `image_seq_length` image tokens. Text is tokenized the way the original LLaVA-era code
    did: split at the placeholders, each piece tokenized on its own (so SentencePiece adds its word-start marker at
    every piece), image tokens spliced in between, one BOS at the start.

    Args:
        image_processor (`QilinImageProcessor`): makes `pixel_values` and `high_res_pixel_values`.
        tokenizer: the Llama tokenizer, with `<image>` in its vocabulary.
        chat_template (`str`, *optional*): defaults to the vicuna `v1` template the model was trained with.
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder.
        image_seq_length (`int`, *optional*, defaults to 576): image tokens per image (the model config's value).
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, image_token=IMAGE_TOKEN, image_seq_length=576
    ):
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token first")
        if chat_template is None:
            chat_template = {"default": VICUNA_V1_CHAT_TEMPLATE, "plain": PLAIN_CHAT_TEMPLATE}
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`, after checking the messages (`check_chat_messages`), so a malformed
        message fails with a `ValueError` naming it instead of a KeyError or a template error."""
        check_chat_messages(conversation)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "high_res_pixel_values"]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """
        Args:
            images: one image, a flat list for all samples in order, or one list per sample. An image is a PIL
                image, numpy array, torch tensor or file path (PNG/JPEG/DICOM).
            text (`str` or `list[str]`): prompts with one `<image>` per image, anywhere in the text.
            **kwargs: routed as in every transformers processor (`ProcessingKwargs`): flat, or grouped as
                `text_kwargs={...}` / `images_kwargs={...}`; an option no part of the processor knows gets
                transformers' "not a valid argument" warning. Text options:
                `padding` (default `True`: to the longest sample, on `padding_side`), `padding_side`,
                `add_special_tokens`, `return_tensors`;
                `max_length`: the length limit after image expansion (default: the tokenizer's `model_max_length`);
                longer prompts raise instead of being truncated (never inside an image), so `truncation=True` is
                refused;
                `return_offsets_mapping`: also return `offset_mapping`, `(start, end)` character spans of each token
                in the given text (image tokens and padding get empty spans), as fast tokenizers do; this is what
                `apply_chat_template(..., return_assistant_tokens_mask=True)` uses to find the assistant tokens.
                Image options: those of `QilinImageProcessor` (`high_res_size`, `return_high_res`, `frame`, ...).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(batch_size, sequence_length)`, and when images
            are given `pixel_values` `(num_images, 3, 336, 336)` and `high_res_pixel_values`
            `(num_images, 3, high_res_size, high_res_size)`.
        """
        if videos is not None or audio is not None:
            raise ValueError("Qilin-Med-VL reads text and images only: pass video frames or DICOM frames as images")
        if text is None:
            raise ValueError("QilinProcessor needs text: a prompt with one <image> placeholder per image")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        output_kwargs = self._merge_kwargs(
            QilinProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        if text_kwargs.pop("truncation", None) not in (None, False, "do_not_truncate"):
            raise ValueError(
                "QilinProcessor never truncates (a cut could fall inside an image): a prompt over max_length raises"
            )
        # Offsets stay in the coordinates of the given text (placeholders are expanded in token space only), so no
        # text-replacement bookkeeping is needed for assistant masks.
        text_kwargs.pop("return_text_replacement_offsets", None)
        padding, padding_side = text_kwargs.pop("padding", True), text_kwargs.pop("padding_side", None)
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)
        return_offsets_mapping = text_kwargs.pop("return_offsets_mapping", False)
        max_length = text_kwargs.pop("max_length", None)
        unsupported = {
            key: value for key, value in text_kwargs.items()
            if value not in (None, False) and (key not in NO_EFFECT_TEXT_KWARGS or NO_EFFECT_TEXT_KWARGS[key] != value)
        }
        if unsupported:
            raise ValueError(f"QilinProcessor does not support these text options: {sorted(unsupported)}")

        images_per_sample = self._match_images_to_text(images, texts)
        data = {}
        flat_images = [image for sample in images_per_sample for image in sample]
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=return_tensors, **images_kwargs))

        limit = max_length or self.tokenizer.model_max_length
        input_ids, offsets = [], []
        for index, sample_text in enumerate(texts):
            ids, sample_offsets = self._tokenize_with_image_tokens(sample_text, add_special_tokens)
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"Prompt {index} is {len(ids)} tokens long after expanding its {len(images_per_sample[index])} "
                    f"image(s) to {self.image_seq_length} tokens each, over the limit of {limit}; shorten the text "
                    "or use fewer images (prompts are never truncated inside an image)"
                )
            input_ids.append(ids)
            offsets.append(sample_offsets)
        padded = self.tokenizer.pad(
            {"input_ids": input_ids},
            padding=padding,
            max_length=max_length,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_attention_mask=True,
        )
        data.update(padded)
        if return_offsets_mapping:
            left = (padding_side or self.tokenizer.padding_side) == "left"
            # Each sample's offsets are padded to its own padded length (unchanged when padding is off).
            data["offset_mapping"] = [
                [(0, 0)] * (len(ids) - len(o)) + o if left else o + [(0, 0)] * (len(ids) - len(o))
                for ids, o in zip(padded["input_ids"], offsets)
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _match_images_to_text(self, images, texts) -> list[list]:
        """Split `images` into one list per sample, checking the placeholder counts."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"Got {len(texts)} prompts but {len(images)} lists of images")
            for index, (count, sample_images) in enumerate(zip(counts, images)):
                if count != len(sample_images):
                    raise ValueError(
                        f"Prompt {index} has {count} {self.image_token} placeholder(s) but {len(sample_images)} "
                        "image(s) were given for it"
                    )
            return [list(sample_images) for sample_images in images]
        if sum(counts) != len(images):
            raise ValueError(
                f"The text has {sum(counts)} {self.image_token} placeholder(s) but {len(images)} image(s) were given"
            )
        split, start = [], 0
        for count in counts:
            split.append(list(images[start : start + count]))
            start += count
        return split

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` (a rendered prompt, placeholders included) becomes after image expansion; needs no
        images, so a dataset can be length-checked before any image is processed."""
        return len(self._tokenize_with_image_tokens(text)[0])

    def _tokenize_with_image_tokens(self, text: str, add_special_tokens: bool = True):
        """Token ids of one prompt with each placeholder expanded to `image_seq_length` image tokens, and each
        token's `(start, end)` character span in `text`."""
        ids, offsets = [], []
        if add_special_tokens and self.tokenizer.bos_token_id is not None:
            ids, offsets = [self.tokenizer.bos_token_id], [(0, 0)]
        start = 0
        for index, chunk in enumerate(text.split(self.image_token)):
            if index > 0:
                ids.extend([self.image_token_id] * self.image_seq_length)
                offsets.extend([(start, start)] * self.image_seq_length)
                start += len(self.image_token)
            if chunk:
                encoded = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(encoded["input_ids"])
                offsets.extend((start + a, start + b) for a, b in encoded["offset_mapping"])
            start += len(chunk)
        return ids, offsets

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids (the prompt part already removed by the caller) to text."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


CHAT_ROLES = ("system", "user", "assistant")
CHAT_BLOCK_TYPES = ("text", "image")


def check_chat_messages(conversation) -> None:
    """Raise `ValueError` naming the conversation, message and block when `conversation` (a list of messages, or a
    batch: a list of such lists) is not what the chat template renders: each message a dict with a `role` in
    `CHAT_ROLES` and a `content` that is a string or a list of `{"type": "text", "text": str}` and
    `{"type": "image", ...}` blocks. Video and audio are refused rather than silently dropped."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("The chat messages must be a non-empty list of {'role', 'content'} messages")
    batch = conversation if isinstance(conversation[0], (list, tuple)) else [conversation]
    for number, messages in enumerate(batch):
        where = f"conversation {number}, " if len(batch) > 1 else ""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{where.rstrip(', ') or 'The conversation'} has no messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(
                    f"{where}message {index}: a {type(message).__name__}, not a {{'role', 'content'}} dict")
            if message.get("role") not in CHAT_ROLES:
                raise ValueError(f"{where}message {index}: role {message.get('role')!r} is not one of {CHAT_ROLES}")
            if message["role"] == "system" and index > 0:
                raise ValueError(f"{where}message {index}: a system message can only come first")
            content = message.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, (list, tuple)):
                raise ValueError(f"{where}message {index}: content must be a string or a list of blocks, got "
                                 f"{type(content).__name__}")
            for block_index, block in enumerate(content):
                name = f"{where}message {index}, block {block_index}"
                if not isinstance(block, dict) or "type" not in block:
                    raise ValueError(f"{name}: a block must be a dict with a 'type' ('text' or 'image'), got "
                                     f"{block!r:.80}")
                if block["type"] not in CHAT_BLOCK_TYPES:
                    raise ValueError(f"{name}: blocks of type {block['type']!r} are not supported: Qilin-Med-VL "
                                     "reads text and images (for a video or a multi-frame DICOM, pass one frame as "
                                     "an image)")
                if block["type"] == "text" and not isinstance(block.get("text"), str):
                    raise ValueError(f"{name}: a text block needs a string 'text', got {block.get('text')!r:.80}")


__all__ = ["IMAGE_TOKEN", "QilinProcessor", "check_chat_messages"]
