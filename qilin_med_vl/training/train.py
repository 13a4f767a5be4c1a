# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl train --stage {align,instruct,hia}`: the Qilin-Med-VL stages and HiA on `transformers.Trainer`.

- align: projector only, `plain` template (image + caption), as Qilin-Med-VL stage 1.
- instruct: projector + language model (vision frozen), full fine-tuning, `--lora`, or `--load-in-4bit` QLoRA.
- hia: the model frozen; the HiA high-resolution encoder and blocks train (the paper's defaults).

Every `TrainingArguments` flag can be given on the command line or in a `--config` YAML/JSON file.
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import Trainer, TrainingArguments, set_seed

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


@dataclass
class StageArguments:
    """What to train and on which data; the HiA knobs are `HiAConfig`'s, the optimisation ones `TrainingArguments`'."""

    stage: Literal["align", "instruct", "hia"] = field(metadata={"help": "the stage to train"})
    model: str = field(metadata={"help": "folder or Hub id of the starting Qilin-Med-VL model"})
    data: list[str] = field(metadata={"help": "training JSON/JSONL file(s)"})
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "validation JSON/JSONL file(s) for evaluation during training"})
    image_root: str = field(default=".", metadata={"help": "folder the records' image paths are relative to"})
    max_length: int | None = field(
        default=None, metadata={"help": "token limit after image expansion (default: the tokenizer's)"})
    on_overflow: Literal["drop", "error"] = field(
        default="drop", metadata={"help": "records over --max-length: drop them with a warning, or stop"})
    validate_only: bool = field(default=False, metadata={"help": "check the data, print a summary and stop"})
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in --output-dir"})
    config: str | None = field(
        default=None, metadata={"help": "YAML or JSON file of TrainingArguments (flags given here win)"})
    train_vision: bool = field(default=False, metadata={
        "help": "instruct stage: also train the vision tower (frozen by default, as Qilin-Med-VL did; useful when it "
                "was not pretrained, as in the synthetic demo)"})
    lora: bool = field(default=False, metadata={"help": "instruct stage: train LoRA adapters instead"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (alpha is twice the rank)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "instruct stage: QLoRA on a 4-bit base"})
    resnet_weights: str | None = field(
        default=None, metadata={"help": "hia stage: initialise the HiA encoder from a ResNet-50 state-dict file"})


def training_defaults(stage: str, config_file: str | None = None) -> dict:
    """TrainingArguments defaults for `stage`: the papers' settings, then the `--config` file's values."""
    values = {**COMMON_DEFAULTS, **STAGE_DEFAULTS[stage]}
    if config_file:
        with open(config_file, encoding="utf-8") as handle:
            if config_file.endswith((".yaml", ".yml")):
                import yaml

                values.update(yaml.safe_load(handle) or {})
            else:
                values.update(json.load(handle))
    return values


def _freeze_for_stage(model, stage: str, train_vision: bool = False) -> None:
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == "instruct":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        model.model.vision_tower.requires_grad_(train_vision)


def build_model(args: StageArguments, training_args: TrainingArguments, hia_config: HiAConfig | None = None):
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
        model = get_peft_model(model, hia_config or HiAConfig())
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


def _init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Give DeepSpeed the process group before the model is loaded. Under ZeRO-3, `from_pretrained` builds the model
    inside `deepspeed.zero.Init`, which reads the world size from `deepspeed.comm`. accelerate initialises
    `deepspeed.comm` for accelerator processes, but on CPU processes (`--use-cpu`, gloo) it only starts
    `torch.distributed`: zero.Init then sees one process and refuses the batch size the Trainer computed for all of
    them ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 1 * 1 * 1").
    Where accelerate has started it (GPUs), this does nothing."""
    if not training_args.deepspeed or not torch.distributed.is_initialized():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def train(args: StageArguments, hia_config: HiAConfig, training_args: TrainingArguments) -> int:
    """Run one stage: validate the data, build the model for the stage, train with `Trainer`, save the result (the
    adapter for HiA and LoRA, the whole model otherwise) and the processor in `training_args.output_dir`."""
    logging.basicConfig(level=logging.INFO if training_args.local_rank in (-1, 0) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    from transformers import AutoProcessor

    import qilin_med_vl  # noqa: F401

    processor = AutoProcessor.from_pretrained(args.model)
    if args.stage == "hia":
        processor.image_processor.high_res_size = hia_config.high_res_size
    template = "plain" if args.stage == "align" else None

    # HiA reads one instruction per forward pass: a multi-turn record is learned answer by answer, each with its own
    # question last, as generation sees it (h_last: the end of the latest question).
    per_answer = args.stage == "hia"
    data_options = dict(image_root=args.image_root, max_length=args.max_length, on_overflow=args.on_overflow,
                        require_images=args.stage in ("align", "hia"), chat_template=template,
                        one_sample_per_answer=per_answer)
    dataset = ConversationDataset(args.data, processor, **data_options)
    eval_dataset = ConversationDataset(args.eval_data, processor, **data_options) if args.eval_data else None
    if args.validate_only:
        unit = "samples (one per answer)" if per_answer else "records"
        print(f"{len(dataset)} training {unit} are valid")
        return 0

    _init_deepspeed_comm(training_args)
    model = build_model(args, training_args, hia_config)
    # Under ZeRO-3 the base model's parameters are partitioned at load time: `numel()` is this process's share (0),
    # `ds_numel` the whole parameter's.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger.info("stage %s: %d of %d parameters train (%.2f%%)", args.stage, trainable, total, 100 * trainable / total)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=ConversationCollator(processor, args.image_root, template, args.max_length,
                                           return_high_res=args.stage == "hia",
                                           supervise="last" if per_answer else "all"),
    )
    _check_fsdp_is_active(trainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # Adapter-only for HiA and LoRA (a PeftModel saves its adapter); the whole model otherwise.
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    return 0
