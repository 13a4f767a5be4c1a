# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl convert {original,llava-hf,export-llava}`: checkpoints to or from the HF-native layout."""

from ..conversion.checkpoint_io import DEFAULT_MAX_SHARD_SIZE
from ..conversion.llava_hf import convert_llava_hf, export_llava_hf
from ..conversion.original import DEFAULT_CLIP, ConversionReport, convert_original


def _finish(report: ConversionReport, args) -> int:
    print(report.summary())
    if args.report:
        report.save(args.report)
    return 0


def run_original(args) -> int:
    return _finish(convert_original(args.source, args.output, clip=args.clip, base_model=args.base_model,
                                    dtype=args.dtype, force=args.force, max_shard_size=args.max_shard_size,
                                    progress=args.progress), args)


def run_llava_hf(args) -> int:
    return _finish(convert_llava_hf(args.source, args.output, dtype=args.dtype, force=args.force,
                                    max_shard_size=args.max_shard_size, progress=args.progress), args)


def run_export_llava(args) -> int:
    return _finish(export_llava_hf(args.source, args.output, force=args.force, max_shard_size=args.max_shard_size,
                                   progress=args.progress), args)


def _add_output_arguments(parser) -> None:
    parser.add_argument("output", help="folder to create")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="output shard limit (default 5GB)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--report", help="also write the conversion report (every source tensor) to this JSON file")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints to or from the HF-native Qilin-Med-VL layout")
    modes = parser.add_subparsers(dest="convert_mode", required=True, metavar="{original,llava-hf,export-llava}")

    original = modes.add_parser(
        "original",
        help="the original Qilin-Med-VL release (LLaVA-fork .bin shards / mm_projector.bin) -> HF-native folder",
        description=convert_original.__doc__.split("\n\n")[0],
    )
    original.add_argument("source", help="folder or Hub repo id of the original release")
    _add_output_arguments(original)
    original.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP checkpoint, folder or repo id ({DEFAULT_CLIP})")
    original.add_argument("--base-model", help="LLaMA checkpoint for a projector-only release (mm_projector.bin only)")
    original.add_argument("--dtype", default="auto", help="auto (the release's: bf16), bfloat16, float16 or float32")
    original.set_defaults(handler=run_original)

    llava_hf = modes.add_parser(
        "llava-hf",
        help="a transformers llava-hf checkpoint (LLaVA-1.5 and medical variants) -> Qilin-Med-VL, to train HiA on",
    )
    llava_hf.add_argument("source", help="llava-hf folder or Hub repo id, e.g. llava-hf/llava-1.5-7b-hf")
    _add_output_arguments(llava_hf)
    llava_hf.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    llava_hf.set_defaults(handler=run_llava_hf)

    export = modes.add_parser(
        "export-llava",
        help="a Qilin-Med-VL folder (base model) -> transformers' LlavaForConditionalGeneration, for vLLM / SGLang",
    )
    export.add_argument("source", help="Qilin-Med-VL folder or Hub repo id")
    _add_output_arguments(export)
    export.set_defaults(handler=run_export_llava)
