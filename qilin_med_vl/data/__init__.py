# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Readers of published data into the training record format of `qilin_med_vl.training.data`: ChiMed-VL (the
Qilin-Med-VL training set) and Hugging Face `datasets` datasets."""

from .chimed_vl import (
    ConversionReport,
    RejectReason,
    convert_chimed_vl,
    iter_chimed_vl_records,
    iter_source_records,
    load_local_dataset,
    normalize_record,
    records_from_hf_dataset,
    save_dataset_image,
)

__all__ = [
    "ConversionReport",
    "RejectReason",
    "convert_chimed_vl",
    "iter_chimed_vl_records",
    "iter_source_records",
    "load_local_dataset",
    "normalize_record",
    "records_from_hf_dataset",
    "save_dataset_image",
]
