# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl train --stage {align,instruct,hia}`: the Qilin-Med-VL stages and HiA on `transformers.Trainer`.

- align: projector only, `plain` template (image + caption), as Qilin-Med-VL stage 1.
- instruct: projector + language model (vision frozen), full fine-tuning, `--lora`, or `--load-in-4bit` QLoRA.
- hia: the model frozen; the HiA high-resolution encoder and blocks train (the paper's defaults).

Every `TrainingArguments` flag can be given on the command line or in a `--config` YAML/JSON file.
"""

import argparse
import json
import logging

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from ..modeling.configuration_hia import HiAConfig
from .data import ConversationCollator, ConversationDataset

logger = logging.getLogger(__name__)

# Defaults per stage, from the papers (originals.md): one epoch, warm-up 3 %, cosine, no weight decay.
STAGE_DEFAULTS = {
    "align": {"learning_rate": 1e-3},
    "instruct": {"learning_rate": 2e-5},
    "hia": {"learning_rate": 2e-5},
}
COMMON_DEFAULTS = {
    "num_train_epochs": 1,
    "warmup_steps": 0.03,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "report_to": "none",
    # Records and extra model inputs (high_res_pixel_values) must reach the collator / model untouched.
    "remove_unused_columns": False,
}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stage", choices=sorted(STAGE_DEFAULTS), required=True)
    parser.add_argument("--model", required=True, help="folder or Hub id of the starting Qilin-Med-VL model")
    parser.add_argument("--data", required=True, nargs="+", help="training JSON/JSONL file(s)")
    parser.add_argument("--eval-data", nargs="+", help="validation JSON/JSONL file(s) for evaluation during training")
    parser.add_argument("--image-root", default=".", help="folder the records' image paths are relative to")
    parser.add_argument("--max-length", type=int, help="token limit after image expansion (default: the tokenizer's)")
    parser.add_argument("--on-overflow", choices=["drop", "error"], default="drop",
                        help="what to do with records over --max-length: drop them with a warning, or stop")
    parser.add_argument("--validate-only", action="store_true", help="check the data, print a summary and stop")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--config", help="YAML or JSON file of TrainingArguments (flags given here win)")
    parser.add_argument("--train-vision", action="store_true",
                        help="instruct stage: also train the vision tower (frozen by default, as Qilin-Med-VL did; "
                             "useful when it was not pretrained, as in the synthetic demo)")
    parser.add_argument("--lora", action="store_true", help="instruct stage: train LoRA adapters instead")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--load-in-4bit", action="store_true", help="instruct stage: QLoRA on a 4-bit base")
    # HiA knobs: defaults and help come from `HiAConfig` (the paper's), the one place they are written.
    def hia_flag(flag, field_name, **kwargs):
        field = HiAConfig.__dataclass_fields__[field_name]
        default = field.default_factory() if callable(field.default_factory) else field.default
        parser.add_argument(flag, dest=field_name, default=default, help=field.metadata.get("help"), **kwargs)

    hia_flag("--hia-layers", "layers", type=int, nargs="+")
    hia_flag("--num-queries", "num_queries", type=int)
    hia_flag("--num-heads", "num_heads", type=int)
    hia_flag("--adapter-width", "hidden_size", type=int)
    hia_flag("--high-res-size", "high_res_size", type=int)
    hia_flag("--encoder-depths", "encoder_depths", type=int, nargs="+")
    hia_flag("--encoder-width", "encoder_width", type=int)
    parser.add_argument("--no-instruction-aware", action="store_true", help="the 'w/o IA' ablation")
    parser.add_argument("--resnet-weights", help="initialise the HiA encoder from a ResNet-50 state-dict file")
    return parser


def parse_args(argv):
    """Our flags, then every remaining flag as `TrainingArguments` (config file < stage defaults < command line)."""
    args, remaining = build_parser().parse_known_args(argv)
    values = {**COMMON_DEFAULTS, **STAGE_DEFAULTS[args.stage]}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            if args.config.endswith((".yaml", ".yml")):
                import yaml

                values.update(yaml.safe_load(handle) or {})
            else:
                values.update(json.load(handle))
    hf_parser = HfArgumentParser(TrainingArguments)
    for key, value in values.items():
        hf_parser.set_defaults(**{key: value})
    (training_args,) = hf_parser.parse_args_into_dataclasses(remaining)
    return args, training_args


def _freeze_for_stage(model, stage: str, train_vision: bool = False) -> None:
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == "instruct":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        model.model.vision_tower.requires_grad_(train_vision)


def build_model(args, training_args):
    """The model for the stage, with exactly the parameters that should train left trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    import qilin_med_vl  # noqa: F401  (registers the auto classes and the HiA PEFT type)
    load_kwargs = {}
    if args.load_in_4bit:
        if args.stage != "instruct":
            raise SystemExit("--load-in-4bit is for the instruct stage (QLoRA)")
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype
        )
    model = AutoModelForImageTextToText.from_pretrained(args.model, **load_kwargs)
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training_args.activation_checkpointing)
        )

    if args.stage == "hia":
        model.requires_grad_(False)
        config = HiAConfig(
            layers=args.layers,
            num_queries=args.num_queries,
            num_heads=args.num_heads,
            hidden_size=args.hidden_size,
            high_res_size=args.high_res_size,
            instruction_aware=not args.no_instruction_aware,
            encoder_depths=args.encoder_depths,
            encoder_width=args.encoder_width,
        )
        model = get_peft_model(model, config)
        if args.resnet_weights:
            from qilin_med_vl.modeling.high_resolution_encoder_hia import load_resnet_state_dict
            from qilin_med_vl.modeling.modeling_hia import HiABlock

            encoder = next(m.encoder for m in model.modules() if isinstance(m, HiABlock) and m.encoder is not None)
            report = load_resnet_state_dict(encoder, args.resnet_weights)
            logger.info("ResNet weights: %d loaded, unexpected %s, missing %s, mismatched %s", len(report["loaded"]),
                        report["unexpected"], report["missing"], report["mismatched"])
    elif args.lora or args.load_in_4bit:
        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.05,
                          target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
        model = get_peft_model(model, lora)
    else:
        _freeze_for_stage(model, args.stage, args.train_vision)
    return model


def _check_fsdp_is_active(trainer: Trainer) -> None:
    """Refuse a run that asked for FSDP but would not shard: accelerate enables FSDP only for multi-accelerator
    runs (GPU, NPU, XPU, HPU...), so on CPU processes (`--use-cpu`, gloo) the same flags train with plain DDP, every
    process holding the whole model."""
    from accelerate.utils import DistributedType

    if trainer.args.fsdp and trainer.accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit(
            f"FSDP was requested (--fsdp / --config with fsdp) but accelerate set up "
            f"{trainer.accelerator.distributed_type.value}: FSDP needs several GPUs (or NPUs, XPUs, HPUs) under "
            "torchrun or accelerate launch; on CPU processes it would silently run as DDP. Drop the FSDP settings "
            "to train with DDP."
        )


def main(argv=None) -> int:
    args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.local_rank in (-1, 0) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    from transformers import AutoProcessor

    import qilin_med_vl  # noqa: F401

    processor = AutoProcessor.from_pretrained(args.model)
    if args.stage == "hia":
        processor.image_processor.high_res_size = args.high_res_size
    template = "plain" if args.stage == "align" else None

    require_images = args.stage in ("align", "hia")
    dataset = ConversationDataset(args.data, processor, args.image_root, args.max_length, args.on_overflow,
                                  require_images=require_images)
    eval_dataset = (
        ConversationDataset(args.eval_data, processor, args.image_root, args.max_length, args.on_overflow,
                            require_images=require_images)
        if args.eval_data
        else None
    )
    if args.validate_only:
        print(f"{len(dataset)} training records are valid")
        return 0

    model = build_model(args, training_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("stage %s: %d of %d parameters train (%.2f%%)", args.stage, trainable, total, 100 * trainable / total)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=ConversationCollator(processor, args.image_root, template, args.max_length,
                                           return_high_res=args.stage == "hia"),
    )
    _check_fsdp_is_active(trainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # Adapter-only for HiA and LoRA (a PeftModel saves its adapter); the whole model otherwise.
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    return 0
