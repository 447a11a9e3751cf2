"""DermPrompt (thesis §4.3.2): attribute-rich prompts for dermoscopic images.

The thesis asks a vision-language model (Llama-3.2 Vision) for the lesion's shape, colour, size and
position and the skin's colour, hair and artificial marks, then has it rephrase them into one
structured sentence under CLIP's 77-token limit; the training prompt is
``"An image of <lesion> on <skin>"`` followed by that sentence (§4.3.3).

One module per job:

* ``vocabulary`` — the words the offline captioner writes (``dermprompt_vocabulary`` for mini tokenizers);
* ``prompt`` — ``DermAttributes`` → sentence → prompt fitted to the text encoder's token limit; ``Caption``;
* ``cache`` — ``CaptionCache``, one JSON file per image and captioner fingerprint;
* ``captioner`` — the interface ``DermPromptCaptioner`` (``caption``, cached ``caption_many``);
* ``attribute_captioner`` — ``AttributeCaptioner`` (mini and smoke profiles): the same attributes
  *measured* from the image and its lesion mask, deterministically;
* ``vlm_captioner`` — ``VLMCaptioner`` (full profile): extraction prompt answered in JSON, then a
  rephrasing prompt; the chat VLM itself is loaded by ``ctrlgen.models.vlm``;
* ``from_profile`` — ``captioner_from_profile``: the captioner the profile names;
* ``prompt_sampler`` — ``PromptSampler``: new inference prompts recombining attribute values observed in
  training captions (each value seen in training; combinations new or, with ``mode="joint"``, only
  observed ones).

Every public name is importable from this package (``ctrlgen.methods.didgen.dermprompt``).
"""
from ctrlgen.methods.didgen.dermprompt.attribute_captioner import (
    AttributeCaptioner,
    CaptionerConfig,
    name_lesion_colour,
    position_name,
    skin_colour_name,
)
from ctrlgen.methods.didgen.dermprompt.cache import CaptionCache
from ctrlgen.methods.didgen.dermprompt.captioner import DermPromptCaptioner
from ctrlgen.methods.didgen.dermprompt.from_profile import captioner_from_profile
from ctrlgen.methods.didgen.dermprompt.prompt import (
    DROP_ORDER,
    Caption,
    CaptionError,
    DermAttributes,
    PromptTooLongError,
    compose_prompt,
    count_tokens,
    fit_prompt,
    sentence,
)
from ctrlgen.methods.didgen.dermprompt.prompt_sampler import PromptSampler
from ctrlgen.methods.didgen.dermprompt.vlm_captioner import (
    EXTRACTION_PROMPT,
    REPHRASE_PROMPT,
    GenerateFn,
    VLMCaptioner,
    clean_sentence,
    parse_attribute_answer,
)
from ctrlgen.methods.didgen.dermprompt.vocabulary import (
    LESION_COLOURS,
    MARKS,
    POSITIONS,
    PREFIX,
    SHAPES,
    SIZES,
    SKIN_COLOURS,
    dermprompt_vocabulary,
)
from ctrlgen.models.vlm import HFChatVLM  # the loader lives in the models layer; re-exported for old imports

__all__ = [
    "PREFIX", "SIZES", "SHAPES", "LESION_COLOURS", "SKIN_COLOURS", "POSITIONS", "MARKS", "DROP_ORDER",
    "PromptTooLongError", "CaptionError", "DermAttributes", "Caption", "CaptionCache", "DermPromptCaptioner",
    "CaptionerConfig", "AttributeCaptioner", "VLMCaptioner", "HFChatVLM", "PromptSampler", "sentence",
    "captioner_from_profile",
    "compose_prompt", "count_tokens", "fit_prompt", "dermprompt_vocabulary", "name_lesion_colour",
    "skin_colour_name", "position_name", "parse_attribute_answer", "clean_sentence",
    "EXTRACTION_PROMPT", "REPHRASE_PROMPT", "GenerateFn",
]
