"""Text generation shared by the commands that show samples (pretrain) and `llmkit generate`."""

from __future__ import annotations

from llmkit.settings import GenerateSettings


def generation_kwargs(settings: GenerateSettings, tokenizer) -> dict:
    """GenerateSettings -> keyword arguments of `model.generate` (KV cache on, stop strings included)."""
    sampling = settings.sampling
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling,
                  num_beams=settings.num_beams, num_return_sequences=settings.num_return_sequences,
                  repetition_penalty=settings.repetition_penalty, use_cache=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if sampling:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:  # neutral values, so that a model's own generation_config does not warn about unused ones
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if settings.stop:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([stop_criterion(tokenizer, settings.stop)])
    return kwargs


def stop_criterion(tokenizer, stops: list[str]):
    """Ends each sequence once its generated text holds a stop string. Works on the decoded text, so it
    fits any tokenizer (transformers' stop_strings needs a vocabulary it can take apart)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        def __init__(self) -> None:
            self.start: int | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.start is None:  # first call: the prompt plus one new token
                self.start = input_ids.shape[1] - 1
            texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
            return torch.tensor([any(stop in text for stop in stops) for text in texts], device=input_ids.device)

    return StopOnStrings()


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((index for index in (text.find(stop) for stop in stops if stop) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def continue_prompts(model, tokenizer, prompts: list[str], settings: GenerateSettings, seed: int) -> list[str]:
    """Sample one continuation per prompt, leaving the caller's random state untouched (so that
    showing samples during training does not change the training run)."""
    import torch

    was_training = model.training
    model.eval()
    texts = []
    kwargs = generation_kwargs(settings, tokenizer) | {"num_return_sequences": 1, "num_beams": 1}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            inputs.pop("token_type_ids", None)
            output = model.generate(**inputs, **kwargs)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            texts.append(prompt + cut_at_stop(tokenizer.decode(new_tokens, skip_special_tokens=True), settings.stop)[0])
    model.train(was_training)
    return texts
