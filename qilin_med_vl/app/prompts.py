# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Task presets and prompt building for the web demo. No Gradio and no torch here: plain strings and lists.

The images of a conversation belong to its first user turn, in upload order; the chat template renders each as an
`<image>` placeholder before the question, and every text refers to them by the same labels the page shows under the
thumbnails: 第一张, 第二张, ... (image 1, image 2, ...).
"""

MAX_IMAGES = 4
# Questions are checked in characters before tokenization: a cheap, readable limit for pasted text. The token limit
# of the model (after each image is expanded to its image tokens) is checked again when the inputs are built.
MAX_QUESTION_CHARS = 2000

ORDINALS_ZH = ("第一张", "第二张", "第三张", "第四张")
LANGUAGES = ("zh", "en")
FREE_TEXT = "free"
# (key, label shown in the page). The page lists them in this order.
TASKS = (
    ("description", "影像描述 · Description"),
    ("disease", "疾病判断 · Disease"),
    ("location", "病变定位 · Location"),
    ("comparison", "前后对比 · Before/after comparison"),
    (FREE_TEXT, "自由提问 · Free text"),
)


class AppInputError(ValueError):
    """Bad input from the page (too many images, unreadable file, prompt too long...): the message is shown to the
    user as it is, in Chinese and English."""


def image_label(index: int, language: str = "zh") -> str:
    """How the prompt refers to image `index` (0-based): 第一张 / image 1."""
    _check_index(index)
    return ORDINALS_ZH[index] if language == "zh" else f"image {index + 1}"


def image_caption(index: int, name: str | None = None) -> str:
    """Caption under a thumbnail (and its heatmap): both languages' label, then the file name when given."""
    caption = f"{image_label(index, 'zh')} · Image {index + 1}"
    return f"{caption} · {name}" if name else caption


def _join(labels: list[str], language: str) -> str:
    if len(labels) == 1:
        return labels[0]
    if language == "zh":
        return "、".join(labels[:-1]) + "和" + labels[-1]
    return (", ".join(labels[:-1]) + (", and " if len(labels) > 2 else " and ") + labels[-1])


def preset_prompt(task: str, num_images: int, language: str = "zh") -> str:
    """The question of a task preset for `num_images` images, in `language` ("zh" or "en").

    Raises `AppInputError` when the images do not fit the task (no image, more than `MAX_IMAGES`, or a comparison
    with fewer than two). `FREE_TEXT` gives an empty string (the user writes the question).
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if task == FREE_TEXT:
        return ""
    if task not in dict(TASKS):
        raise ValueError(f"unknown task preset {task!r}; choose one of {[key for key, _ in TASKS]}")
    check_num_images(num_images)
    labels = _join([image_label(i, language) for i in range(num_images)], language)
    zh = language == "zh"
    if task == "comparison":
        if num_images < 2:
            raise AppInputError("对比需要至少两张图片。 (A comparison needs at least two images.)")
        if num_images == 2:
            return ("第一张和第二张分别是患者治疗前后的影像，请对比两张图片。" if zh else
                    "Image 1 and image 2 were taken before and after treatment. Compare the two images.")
        return (f"{labels}是患者按时间先后拍摄的影像，请对比这些图片，描述病变的变化。" if zh else
                f"{labels[0].upper()}{labels[1:]} were taken in chronological order. Compare them and describe "
                "how the lesion changed.")
    if num_images == 1:
        return {
            ("description", True): "请描述这张图片的影像表现。",
            ("disease", True): "这张图片提示什么疾病？",
            ("location", True): "图中的病变位于哪个部位？",
            ("description", False): "Describe the imaging findings in this image.",
            ("disease", False): "What disease does this image suggest?",
            ("location", False): "Where is the lesion in this image?",
        }[task, zh]
    return {
        ("description", True): f"请分别描述{labels}图片的影像表现。",
        ("disease", True): f"{labels}图片分别提示什么疾病？",
        ("location", True): f"请分别指出{labels}图片中病变的位置。",
        ("description", False): f"Describe the imaging findings in {labels}, one by one.",
        ("disease", False): f"What disease does each of {labels} suggest?",
        ("location", False): f"Locate the lesion in each of {labels}.",
    }[task, zh]


def check_num_images(num_images: int) -> None:
    if num_images < 1:
        raise AppInputError("请先上传 1 到 4 张图片。 (Upload 1 to 4 images first.)")
    if num_images > MAX_IMAGES:
        raise AppInputError(
            f"最多 {MAX_IMAGES} 张图片，当前 {num_images} 张。 (At most {MAX_IMAGES} images; {num_images} were given.)"
        )


def check_question(question: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """The question stripped; `AppInputError` when it is empty or longer than `max_chars` characters."""
    question = (question or "").strip()
    if not question:
        raise AppInputError("请输入问题或选择一个任务。 (Type a question or choose a task preset.)")
    if len(question) > max_chars:
        raise AppInputError(
            f"问题过长：{len(question)} 个字符，上限 {max_chars}。 "
            f"(Prompt too long: {len(question)} characters, the limit is {max_chars}.)"
        )
    if "<image>" in question:
        # The processor reads "<image>" as a placeholder for one more image than were uploaded. The page places the
        # images itself, in upload order, so typed placeholders are never needed.
        raise AppInputError(
            "问题中请不要输入 <image>：图片会按上传顺序自动放在问题前面，可用“第一张”“第二张”指代。 "
            "(Please remove <image> from the question: the uploaded images are placed before it automatically, in "
            "upload order; refer to them as the first, second, ... image.)"
        )
    return question


def build_messages(images: list, history: list[tuple[str, str]], question: str) -> list[dict]:
    """Chat messages for `processor.apply_chat_template`: the images in the first user turn (in order, before its
    text), then the earlier turns `history` (`(question, answer)` pairs), then `question`.

    `images` are whatever the processor accepts (PIL images here); their number is checked.
    """
    check_num_images(len(images))
    turns = [*history, (question, None)]
    messages = []
    for index, (user_text, answer) in enumerate(turns):
        content = [{"type": "image", "image": image} for image in images] if index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": user_text}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_IMAGES:
        raise AppInputError(f"图片序号超出范围 (image index {index} out of range 0..{MAX_IMAGES - 1})")


__all__ = [
    "AppInputError", "FREE_TEXT", "LANGUAGES", "MAX_IMAGES", "MAX_QUESTION_CHARS", "ORDINALS_ZH", "TASKS",
    "build_messages", "check_num_images", "check_question", "image_caption", "image_label", "preset_prompt",
]
