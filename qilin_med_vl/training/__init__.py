"""Training on transformers' Trainer: data records, validation, the collator, and the three stages."""

from .data import ConversationCollator, ConversationDataset, DataValidationError, read_records, validate_records

__all__ = ["ConversationCollator", "ConversationDataset", "DataValidationError", "read_records", "validate_records"]
