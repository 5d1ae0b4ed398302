"""Images as prompts: a small vision-language model built from config, that plain transformers loads
(LlavaForConditionalGeneration: a CLIP vision encoder, a projector, a Llama language model), its
processor (LlavaProcessor: the image processor and llmkit's tokenizer with the image token), pictures
read with one-line errors, generation from pictures, and where the generated words look in the picture.

    from llmkit.loading import load_model
    from llmkit.vision import describe

    model, processor = load_model("runs/caption", head="image-text-to-text")
    print(describe(model, processor, ["cat.png"], ["描述这张图片："]))

A prompt is the image token (expanded by the processor to one token per patch, plus CLS) followed by the
text; the model writes the answer after it.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import LlmkitError, first_line
from llmkit.settings import GenerateSettings, VisionSettings

IMAGE_TOKEN = "<image>"
LARGE_FACTOR = 4  # a picture this many times larger than the encoder's side is worth a notice: it is shrunk


# ---------------------------------------------------------------- building


def add_image_token(tokenizer) -> None:
    """The special token that stands for the picture's patches in the text."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})


def vlm_config(vision: VisionSettings, text, tokenizer):
    """A LlavaConfig: [vision] as a CLIP vision encoder, `text` (the config [model] makes) as the language model."""
    from transformers import CLIPVisionConfig, LlavaConfig

    encoder = CLIPVisionConfig(image_size=vision.image_size, patch_size=vision.patch_size,
                               hidden_size=vision.d_model, intermediate_size=4 * vision.d_model,
                               num_hidden_layers=vision.n_layer, num_attention_heads=vision.n_head,
                               projection_dim=vision.d_model)
    # "full": every patch feature and CLS reach the language model, from the encoder's last layer
    return LlavaConfig(vision_config=encoder, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2 + 1,
                       tie_word_embeddings=text.tie_word_embeddings)


def build_processor(vision: VisionSettings, tokenizer):
    """LlavaProcessor: pictures resized to the encoder's side (no crop), the tokenizer with the image token."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = {"height": vision.image_size, "width": vision.image_size}
    images = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def load_processor(source: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise LlmkitError(f"{source}: cannot load its processor (image processor and tokenizer): "
                          f"{first_line(error)}") from None
    if not hasattr(processor, "image_processor"):
        raise LlmkitError(f"{source}: its processor reads no images (a text-only model?)")
    return processor


def check_vision_model(source: str, config) -> None:
    """A vision task needs a model that reads pictures: one line naming the model otherwise."""
    if getattr(config, "vision_config", None) is None:
        raise LlmkitError(f"{source} is a text-only {config.model_type} model: captioning and visual questions "
                          f"need a vision-language model (leave model.path empty to build one from [model] and "
                          f"[vision], or name a model trained by `llmkit finetune caption`)")


def freeze_tower(model) -> None:
    """vision.freeze_tower: the encoder keeps its weights; the projector and the language model learn."""
    for parameter in model.model.vision_tower.parameters():
        parameter.requires_grad_(False)


# LoRA on the language model only: a PEFT regex over its linear layers (not the encoder's, not the projector,
# which trains in full beside the adapter)
LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"


# ---------------------------------------------------------------- pictures


def open_image(path: str | Path, where: str = "", side: int = 0):
    """A picture as an RGB PIL image; a missing, unreadable or non-image file is a one-line error naming
    it. `side`: the encoder's; a much larger picture is shrunk to it (said once)."""
    from PIL import Image, UnidentifiedImageError

    from llmkit.report import warn_once

    if not isinstance(path, (str, Path)):  # a hub data set's Image feature: a PIL image already
        return path.convert("RGB")
    label = f"{where}: " if where else ""
    file = Path(path)
    if not file.is_file():
        raise LlmkitError(f"{label}image not found: {path}")
    try:
        with Image.open(file) as image:
            picture = image.convert("RGB")
    except UnidentifiedImageError:
        raise LlmkitError(f"{label}{path} is not an image (expected PNG, JPEG, ...)") from None
    except OSError as error:
        raise LlmkitError(f"{label}cannot read the image {path}: {first_line(error)}") from None
    if side and max(picture.size) > LARGE_FACTOR * side:
        warn_once(f"images larger than the encoder's {side}x{side} pixels (such as {path}, "
                  f"{picture.size[0]}x{picture.size[1]}) are resized to it")
    return picture


def encoder_side(processor) -> int:
    return int(processor.image_processor.size["height"])  # a SizeDict


def image_tokens(processor) -> int:
    """How many tokens a picture takes in the text: one per patch, plus CLS (the processor's own count)."""
    side = encoder_side(processor)
    count = (side // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    return count - (processor.vision_feature_select_strategy == "default")


def prompt_ids(processor, prompt: str) -> list[int]:
    """The token ids of a picture and a prompt: <s>, the image tokens, the prompt."""
    return processor.tokenizer(IMAGE_TOKEN * image_tokens(processor) + prompt)["input_ids"]


def pixel_values(processor, images: list):
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------- generating


def model_inputs(model, processor, images: list, prompts: list[str]) -> dict:
    """A batch of pictures and prompts, padded on the left (each prompt ends where generation starts)."""
    import torch

    tokenizer = processor.tokenizer
    rows = [prompt_ids(processor, prompt) for prompt in prompts]
    width = max(map(len, rows))
    ids = [[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return {"input_ids": torch.tensor(ids, device=model.device), "attention_mask": torch.tensor(mask, device=model.device),
            "pixel_values": pixel_values(processor, images).to(model.device, model.dtype)}


def describe(model, processor, images: list, prompts: list[str], settings: GenerateSettings | None = None,
             batch_size: int = 32, seed: int | None = None) -> list[str]:
    """One generated text per (picture, prompt); pictures are paths or PIL images."""
    from llmkit.generation import decode_new, run_generate, seed_everything

    settings = settings or GenerateSettings(greedy=True, repetition_penalty=1.0)
    side = encoder_side(processor)
    seed_everything(seed)
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        pictures = [open_image(image, side=side) for image in images[start:start + batch_size]]
        inputs = model_inputs(model, processor, pictures, prompts[start:start + batch_size])
        new_ids, _, _ = run_generate(model, processor.tokenizer, inputs, settings)
        texts.extend(decode_new(new_ids, processor.tokenizer, settings.stop))
    return texts


# ---------------------------------------------------------------- what it looks at


def plot_image_attention(model, processor, image, prompt: str, generated: str, path: str | Path) -> Path:
    """For each generated token, the attention it pays to each patch (the last layer of the language model,
    heads averaged, renormalised over the patches), drawn over the picture: a panel per token."""
    import math
    import warnings

    import numpy as np
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from llmkit.report import attention_weights_of, label_font, token_label

    picture = open_image(image, side=encoder_side(processor))
    start = prompt_ids(processor, prompt)
    new = processor.tokenizer(generated, add_special_tokens=False)["input_ids"]
    inputs = model_inputs(model, processor, [picture], [prompt])
    inputs["input_ids"] = torch.tensor([start + new], device=model.device)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    weights = attention_weights_of(model, inputs)[-1].mean(0)  # last layer, heads averaged: [tokens, tokens]
    image_id = model.config.image_token_id
    patches = [i for i, token in enumerate(start) if token == image_id][-(image_tokens(processor) - 1):]  # not CLS
    grid = int(math.isqrt(len(patches)))
    figure = Figure(figsize=(2.0 * min(len(new), 8), 2.3 * math.ceil(len(new) / 8)), layout="constrained")
    FigureCanvasAgg(figure)
    labels = [token_label(processor.tokenizer, token) for token in new]
    font = label_font(labels)
    shown = np.asarray(picture.resize((256, 256)))
    for number, token in enumerate(new):
        row = weights[len(start) + number - 1, patches]  # the position that predicts this token
        heat = (row / row.sum()).reshape(grid, grid).float().cpu().numpy()
        axes = figure.add_subplot(math.ceil(len(new) / 8), min(len(new), 8), number + 1)
        axes.imshow(shown)
        axes.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, 256, 256, 0), interpolation="nearest")
        axes.set_title(labels[number], fontproperties=font, fontsize=14)
        axes.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # said once by label_font
        figure.savefig(path, dpi=80)
    return path
