"""Models (DESIGN.md §3 layer 3): Stable Diffusion components, the book's mini models, tokenizers, placeholder tokens,
chat VLMs."""
from ctrlgen.models.mini import build_mini_components, count_parameters
from ctrlgen.models.registry import check_models, load_base_model, mini_model_dir, models_root
from ctrlgen.models.sd import (
    ModelNotFoundError,
    SDComponents,
    build_from_published_config,
    diffusion_target,
    encode_latents,
    load_components,
    load_vae,
    make_scheduler,
    published_config,
    schedule_kwargs,
)
from ctrlgen.models.tokenizer import build_caption_tokenizer, load_tokenizer, save_tokenizer
from ctrlgen.models.tokens import (
    PlaceholderTokens,
    TokenLocation,
    add_placeholder_tokens,
    end_position,
    locate_tokens,
    token_id,
    token_positions,
)
from ctrlgen.models.vlm import HFChatVLM, load_chat_vlm

__all__ = [
    "SDComponents", "ModelNotFoundError", "build_from_published_config", "load_components", "make_scheduler", "schedule_kwargs",
    "diffusion_target", "encode_latents", "load_vae",
    "published_config", "build_mini_components", "count_parameters", "check_models", "load_base_model",
    "mini_model_dir", "models_root", "build_caption_tokenizer", "load_tokenizer", "save_tokenizer",
    "PlaceholderTokens", "add_placeholder_tokens", "end_position", "token_positions", "locate_tokens",
    "TokenLocation", "token_id", "HFChatVLM", "load_chat_vlm",
]
