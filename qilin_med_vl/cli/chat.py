# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl chat`: ask about one or more images, in one question or a multi-turn chat."""

import sys

from ..inference import generate_answers, user_message
from ..loading import DEMO_MODEL_DIR, check_images, default_adapter, demo_model_available
from ..processing.processing_qilin import IMAGE_TOKEN
from .model_arguments import add_model_arguments, load_from_arguments


def _answer(model, processor, messages, max_new_tokens, frame=None):
    """Generate one assistant turn, printing tokens as they come; returns the answer text."""
    from transformers import TextStreamer

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    (answer,) = generate_answers(model, processor, [messages], max_new_tokens, streamer=streamer,
                                 processor_kwargs={"frame": frame} if frame is not None else None)
    sys.stdout.flush()
    return answer


def run(args) -> int:
    adapter = args.adapter
    if not args.model:
        if not demo_model_available():
            print("error: no --model given and the embedded demo model is not installed", file=sys.stderr)
            return 2
        args.model = str(DEMO_MODEL_DIR)
        adapter = adapter or default_adapter(args.model)
    problem = check_images(args.image, args.frame)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.question and IMAGE_TOKEN in args.question:
        print("error: the question contains <image>: the --image files are placed before it automatically",
              file=sys.stderr)
        return 2
    model, processor = load_from_arguments(args, adapter)
    if args.question:
        _answer(model, processor, [user_message(args.image, args.question)], args.max_new_tokens, frame=args.frame)
        return 0
    # Multi-turn: the images belong to the first user turn; later turns talk about the same images.
    messages, images = [], list(args.image)
    print("Multi-turn chat; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            break
        if not question:
            break
        messages.append(user_message(images, question))
        images = []
        print("ASSISTANT: ", end="", flush=True)
        answer = _answer(model, processor, messages, args.max_new_tokens, frame=args.frame)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="ask about one or more images (PNG, JPEG, DICOM)")
    add_model_arguments(parser, "local folder or Hub repo id of a Qilin-Med-VL model "
                                "(default: the embedded demo model, with its HiA adapter)",
                        adapter_default="none; the embedded demo model's hia/ when --model is not given")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    parser.add_argument("--frame", type=int, help="frame of multi-frame DICOM images (0-based)")
    parser.add_argument("question", nargs="?", help="the question; omit it for a multi-turn chat")
    parser.set_defaults(handler=run)
