"""Text generation shared by the commands that show samples."""

from __future__ import annotations

from llmkit.settings import GenerateSettings


def continue_prompts(model, tokenizer, prompts: list[str], settings: GenerateSettings, seed: int) -> list[str]:
    """Sample one continuation per prompt, leaving the caller's random state untouched (so that
    showing samples during training does not change the training run)."""
    import torch

    was_training = model.training
    model.eval()
    texts = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            inputs.pop("token_type_ids", None)
            output = model.generate(
                **inputs, max_new_tokens=settings.max_new_tokens, do_sample=settings.temperature > 0,
                temperature=settings.temperature or None, top_k=settings.top_k, top_p=settings.top_p,
                repetition_penalty=settings.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            texts.append(prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return texts
