"""Config mapping between Qilin-Med-VL and transformers' native Llava.

The two models share one module tree and weight names, so a state dict moves between them unchanged; only the
config differs. transformers' Llava has no `linear` projector, so only `mlp2x_gelu` models map to it.
"""

from transformers import LlavaConfig

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig


def llava_config_from_qilin(config: QilinMedVLConfig) -> LlavaConfig:
    """The `LlavaConfig` of the same architecture (served by vLLM and SGLang as `LlavaForConditionalGeneration`)."""
    if config.projector_type != "mlp2x_gelu":
        raise ValueError(
            f"transformers' Llava has only the mlp2x_gelu projector, this model uses {config.projector_type!r}"
        )
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def qilin_config_from_llava(config: LlavaConfig) -> QilinMedVLConfig:
    """The `QilinMedVLConfig` of a llava-hf checkpoint (LLaVA-1.5 and its medical variants)."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"Only a single vision_feature_layer is supported, got {config.vision_feature_layer!r}")
    return QilinMedVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        projector_type="mlp2x_gelu",
        image_token_id=config.image_token_index,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )
