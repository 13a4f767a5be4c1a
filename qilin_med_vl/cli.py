# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The `qilin-med-vl` command line."""

import argparse
import os
import sys


def _load(args):
    from .loading import load_model_and_processor

    return load_model_and_processor(args.model, args.adapter, args.device, args.dtype, args.load_in_4bit,
                                    args.load_in_8bit, allow_missing_weights=args.allow_missing_weights)


def _answer(model, processor, messages, max_new_tokens, stream=sys.stdout, frame=None):
    """Generate one assistant turn, printing tokens as they come; returns the answer text."""
    from transformers import TextStreamer

    from .inference import generate_answers

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    (answer,) = generate_answers(model, processor, [messages], max_new_tokens, streamer=streamer,
                                 processor_kwargs={"frame": frame} if frame is not None else None)
    stream.flush()
    return answer


def chat(args) -> int:
    from .inference import user_message
    from .loading import check_images, default_adapter
    from .processing.processing_qilin import IMAGE_TOKEN

    if not args.model:
        from .loading import DEMO_MODEL_DIR, demo_model_available

        if not demo_model_available():
            print("error: no --model given and the embedded demo model is not installed", file=sys.stderr)
            return 2
        args.model = str(DEMO_MODEL_DIR)
        args.adapter = args.adapter or default_adapter(args.model)
    problem = check_images(args.image, args.frame)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.question and IMAGE_TOKEN in args.question:
        print("error: the question contains <image>: the --image files are placed before it automatically",
              file=sys.stderr)
        return 2
    model, processor = _load(args)
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


def _add_model_arguments(parser):
    parser.add_argument("--model", help="local folder or Hub repo id of a Qilin-Med-VL model "
                        "(default: the embedded demo model, with its HiA adapter)")
    parser.add_argument("--adapter", help='adapter to load: "hia" (the model repo\'s hia/ subfolder) or a folder')
    parser.add_argument("--device", help='device or device_map, e.g. "cpu", "cuda:0", "auto"')
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (language model only)")
    quantization.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit (language model only)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--allow-missing-weights", action="store_true",
                        help="load a checkpoint whose weights do not match its config (missing ones are random)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qilin-med-vl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    chat_parser = commands.add_parser("chat", help="ask about one or more images (PNG, JPEG, DICOM)")
    _add_model_arguments(chat_parser)
    chat_parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    chat_parser.add_argument("--frame", type=int, help="frame of multi-frame DICOM images (0-based)")
    chat_parser.add_argument("question", nargs="?", help="the question; omit it for a multi-turn chat")
    chat_parser.set_defaults(handler=chat)
    # `train` takes every TrainingArguments flag too, so it parses its own arguments (see main).
    commands.add_parser("train", help="train a stage (align, instruct, hia) with the HF Trainer; --help for flags",
                        add_help=False)
    from .app.server import add_cli as add_app
    from .demo import add_cli as add_demo
    from .evaluation.run import add_cli as add_evaluate
    from .synthetic.dataset import add_cli as add_synth_data

    add_evaluate(commands)
    add_demo(commands)
    add_app(commands)
    add_synth_data(commands)
    from .data.chimed_vl import add_cli as add_convert_chimed_vl

    add_convert_chimed_vl(commands)
    from .conversion import add_cli as add_convert
    from .hub import add_cli as add_push

    add_convert(commands)
    add_push(commands)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .training.data import DataValidationError
        from .training.train import build_parser as build_train_parser
        from .training.train import main as train

        if "-h" in argv or "--help" in argv:
            build_train_parser().print_help()
            print("\nEvery transformers.TrainingArguments flag is accepted too "
                  "(--output-dir, --per-device-train-batch-size, ...).")
            return 0
        try:
            return train(argv[1:])
        except DataValidationError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        # The package's errors (ConversionError, ImageLoadingError, DataValidationError, ... are ValueErrors; a
        # refused or missing file is an OSError) name the file and the problem: one line, not a traceback.
        if os.environ.get("QILIN_MED_VL_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
