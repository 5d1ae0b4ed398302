"""Generation engines: transformers ("hf") or CTranslate2 ("ct2", `pip install 'llmkit[fast]'`), behind the
interface of llmkit.generation, so that every caller (generate, eval, a server) generates the same way:

    from llmkit.engines import load_generator
    from llmkit.generation import generate_text
    from llmkit.settings import GenerateSettings

    model, tokenizer = load_generator("runs/pretrain-zh-tiny", engine="auto", threads=1)
    print(generate_text(model, tokenizer, "昨天天气很", GenerateSettings(greedy=True)).text)

load_generator returns a transformers model, or a Ct2Model: a CTranslate2 export that answers the calls
llmkit.generation makes of a model (`generate(**inputs, **kwargs)` with transformers' arguments,
streamers and stopping criteria; `model(input_ids=...).logits` for perplexity), so generate_text,
generate_batch, ChatSession and generation_speed take either. Greedy output and beam search are
deterministic, greedy the same token for token as transformers' in float32; sampling draws from
CTranslate2's own random generator, which a seed does not repeat (CTranslate2 issue #1757). The export of a model lives in `<model>/ct2/` (EXPORT_DIR), made by `llmkit export --format
ct2` (export_ct2); engine "auto" uses it when it is there and still matches the model's weights, else
transformers. An export folder can also be loaded by its own path.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from llmkit.errors import LlmkitError, first_line
from llmkit.loading import load_model, resolve_model

ENGINES = ("auto", "hf", "ct2")
EXPORT_DIR = "ct2"  # <model>/ct2: the CTranslate2 export that engine "auto" finds
EXPORT_FILE = "llmkit-export.json"  # in an export: its source, quantization, and the source weights it was made from
QUANTIZATIONS = ("float32", "int8", "int16", "float16", "bfloat16")  # float16/bfloat16 run on GPUs only
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INSTALL = "pip install 'llmkit[fast]'"


def ctranslate2_module():
    try:
        import ctranslate2
    except ImportError:
        return None
    return ctranslate2


def require_ctranslate2():
    module = ctranslate2_module()
    if module is None:
        raise LlmkitError(f"the ct2 engine needs CTranslate2: {INSTALL}")
    return module


# ---------------------------------------------------------------- finding and loading


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / EXPORT_FILE).is_file()


def source_fingerprint(source: Path) -> dict:
    """Size and modification time of the model's weight files: an export made from other weights is stale."""
    return {name: [(source / name).stat().st_size, (source / name).stat().st_mtime_ns]
            for name in WEIGHT_FILES if (source / name).is_file()}


def export_of(source: str) -> Path | None:
    """The CTranslate2 export of a local model, when there is one made from its current weights."""
    folder = Path(source) / EXPORT_DIR
    if not is_export(folder):
        return None
    made_from = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8")).get("weights")
    return folder if made_from == source_fingerprint(Path(source)) else None


def pick_engine(engine: str, source: str) -> tuple[str, Path | None]:
    """("hf" or "ct2", the export folder for ct2) for a model resolved by llmkit.loading.resolve_model."""
    if engine not in ENGINES:
        raise LlmkitError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if is_export(source):
        if engine == "hf":
            origin = json.loads((Path(source) / EXPORT_FILE).read_text(encoding="utf-8")).get("source")
            raise LlmkitError(f"{source} is a CTranslate2 export: use --engine ct2 (or auto), or pass the model "
                              f"it was made from ({origin}) for --engine hf")
        require_ctranslate2()
        return "ct2", Path(source)
    if engine == "hf":
        return "hf", None
    export = export_of(source)
    if engine == "ct2":
        if export is None:
            stale = " (the one there was made from other weights)" if is_export(Path(source) / EXPORT_DIR) else ""
            raise LlmkitError(f"--engine ct2: {source} has no CTranslate2 export{stale}; make it with "
                              f"`llmkit export --format ct2 {source} --overwrite`, or pass an export folder as --model")
        require_ctranslate2()
        return "ct2", export
    return ("ct2", export) if export is not None and ctranslate2_module() is not None else ("hf", None)


def load_generator(model: str | None = None, *, engine: str = "auto", threads: int = 0,
                   output_dir: str | Path = "runs", device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) to generate with: a transformers model (llmkit.loading.load_model) or a Ct2Model.

    `model`: a run, model, adapter or export folder, or a hub id (None: runs/latest). `engine`: "hf",
    "ct2" (its export must exist) or "auto" (the export when there is one). `threads`: intra-op threads
    of either engine (0: the library's default). `dtype` "auto" runs an export in the type it was saved in."""
    folder = Path(model).expanduser() if model else None
    source = str(folder) if folder is not None and is_export(folder) else resolve_model(model, output_dir)
    chosen, export = pick_engine(engine, source)
    if chosen == "ct2":
        return Ct2Model.load(export, device=device, dtype=dtype, threads=threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return load_model(source, device=device, dtype=dtype)


# ---------------------------------------------------------------- the CTranslate2 model


class Ct2Model:
    """A CTranslate2 export in the place of a transformers causal LM, for llmkit.generation."""

    def __init__(self, generator, folder: Path, vocabulary: list[str], config, generation_config) -> None:
        import torch

        self.generator, self.folder, self.vocabulary = generator, folder, vocabulary
        self.config, self.generation_config = config, generation_config
        self.device = torch.device("cpu")  # where inputs are built; CTranslate2 takes them as lists

    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto", threads: int = 0):
        """(Ct2Model, tokenizer) from an export folder."""
        from transformers import AutoConfig, GenerationConfig

        from llmkit.loading import prepare_tokenizer
        from llmkit.tokenizer import load_tokenizer

        ctranslate2 = require_ctranslate2()
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() else "cpu"
        if device not in ("cpu", "cuda"):
            raise LlmkitError(f"--device {device}: the ct2 engine runs on cpu or cuda")
        compute_type = "default" if dtype == "auto" else dtype
        try:
            generator = ctranslate2.Generator(str(folder), device=device, compute_type=compute_type,
                                              intra_threads=threads)
        except (RuntimeError, ValueError) as error:
            raise LlmkitError(f"cannot load the CTranslate2 export {folder} (--device {device}, --dtype {dtype}): "
                              f"{first_line(error)}") from None
        vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        record = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
        settings = dict(record["config"])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        model = cls(generator, folder, vocabulary, config, GenerationConfig.from_pretrained(folder))
        return model, prepare_tokenizer(load_tokenizer(str(folder)))

    def __call__(self, input_ids, **unsupported):
        """Logits of whole sequences, as `model(input_ids=...)` (no padding, no cache): what perplexity needs."""
        import numpy
        import torch

        if unsupported:
            raise LlmkitError(f"the ct2 engine computes logits of unpadded input_ids only, not {sorted(unsupported)}")
        logits = self.generator.forward_batch(input_ids.tolist())
        return SimpleNamespace(logits=torch.as_tensor(numpy.asarray(logits)))

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, num_beams: int = 1, num_return_sequences: int = 1,
                 repetition_penalty: float | None = 1.0, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 stopping_criteria=None, streamer=None, use_cache: bool = True):
        """transformers' `generate` for a decoder-only model: the (left-padded) prompts followed by the new
        ids, padded on the right with pad_token_id; each prompt's num_return_sequences rows together."""
        import torch

        mask = attention_mask.tolist() if attention_mask is not None else [[1] * input_ids.shape[1]] * len(input_ids)
        prompts = [[token for token, keep in zip(row, kept) if keep] for row, kept in zip(input_ids.tolist(), mask)]
        if do_sample and num_beams == 1:  # one sample per row
            prompts = [prompt for prompt in prompts for _ in range(num_return_sequences)]
        penalty = repetition_penalty or 1.0
        # transformers' repetition penalty covers the prompt's tokens too; CTranslate2's only what it decodes,
        # so then the prompt is decoded again (its first token is the start token, not returned)
        offsets = [len(prompt) - 1 if penalty != 1.0 else 0 for prompt in prompts]
        ends = eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id]
        new: list[list[int]] = [[] for _ in prompts]
        watch = Watcher(prompts, offsets, new, max_new_tokens, stopping_criteria, streamer)
        if streamer is not None:
            streamer.put(input_ids[:1].cpu())
        options = dict(include_prompt_in_result=penalty != 1.0, return_end_token=True, end_token=ends or None,
                       repetition_penalty=penalty, beam_size=num_beams,
                       num_hypotheses=num_return_sequences if num_beams > 1 else 1)
        if do_sample:
            options.update(sampling_topk=top_k or 0, sampling_topp=top_p or 1.0, sampling_temperature=temperature or 1.0)
        if watch.needed and num_beams == 1:
            options["callback"] = watch
        # The lengths count the prompt decoded again; beam search takes no callback to end a row at its own
        # max_new_tokens, so then each prompt length gets a call of its own.
        groups = [range(len(prompts))]
        if num_beams > 1 and len(set(offsets)) > 1:
            groups = [[i for i, offset in enumerate(offsets) if offset == length] for length in sorted(set(offsets))]
        results: list = [None] * len(prompts)
        for group in groups:
            longest = max(offsets[i] for i in group)
            found = self.generator.generate_batch([[self.vocabulary[token] for token in prompts[i]] for i in group],
                                                  max_length=max_new_tokens + longest,
                                                  min_length=min_new_tokens + longest, **options)
            for i, result in zip(group, found):
                results[i] = result
        if streamer is not None:
            streamer.end()
        rows = []
        for index, result in enumerate(results):
            for sequence in result.sequences_ids:
                rows.append(sequence[offsets[index]:][:max_new_tokens])
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)  # each prompt before its n rows
        width = max(len(row) for row in rows)
        pad = pad_token_id if pad_token_id is not None else 0
        generated = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids.cpu(), generated], dim=1)


class Watcher:
    """CTranslate2's per-token callback: feeds a streamer, applies transformers stopping criteria (a copy
    per row) and the max_new_tokens of each row. Returning True stops that row."""

    def __init__(self, prompts, offsets, new, max_new_tokens, stopping_criteria, streamer) -> None:
        self.prompts, self.offsets, self.new, self.max_new_tokens = prompts, offsets, new, max_new_tokens
        self.criteria = [[copy.copy(criterion) for criterion in stopping_criteria or []] for _ in prompts]
        self.streamer = streamer
        self.seen = [0] * len(prompts)
        # rows of unequal offsets run past max_new_tokens unless stopped here
        self.needed = bool(stopping_criteria) or streamer is not None or len(set(offsets)) > 1

    def __call__(self, step) -> bool:
        import torch

        row = step.batch_id
        self.seen[row] += 1
        if self.seen[row] <= self.offsets[row]:  # the prompt, decoded again
            return False
        self.new[row].append(step.token_id)
        if self.streamer is not None:  # rows come one token at a time: a streamer of a batch is told which
            if hasattr(self.streamer, "put_row"):
                self.streamer.put_row(row, torch.tensor([step.token_id]))
            else:
                self.streamer.put(torch.tensor([step.token_id]))
        if len(self.new[row]) >= self.max_new_tokens:
            return True
        if self.criteria[row]:  # row=: the criteria of a batch that ends rows of their own (the server's)
            ids = torch.tensor([self.prompts[row] + self.new[row]])
            return any(bool(criterion(ids, None, row=row).any()) for criterion in self.criteria[row])
        return False


# ---------------------------------------------------------------- exporting


def exportable_config(source: str, target: str, quantized_hint: str):
    """The config of a full-precision decoder-only model at `source` (an adapter: of its base), which llmkit
    exports to `target` (a format's name); anything else is refused, naming why."""
    from transformers import AutoConfig

    from llmkit.compression import MARKER

    config_source = source
    adapter = Path(source) / "adapter_config.json"
    if adapter.is_file():  # exported merged onto its base: the base's architecture decides
        config_source = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path") or source
    if (Path(source) / "config.json").is_file():
        config_source = source
    try:
        config = AutoConfig.from_pretrained(config_source)
    except (OSError, ValueError) as error:
        raise LlmkitError(f"cannot read the config of {config_source}: {first_line(error)}") from None
    name = (config.architectures or [type(config).__name__])[0]
    if getattr(config, "quantization_config", None) is not None or getattr(config, MARKER, None):
        raise LlmkitError(f"{source} is quantized: export the full-precision model, with {quantized_hint}")
    if getattr(config, "is_encoder_decoder", False) or not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise LlmkitError(f"{source} is a {name}: llmkit exports decoder-only language models (a causal-lm "
                          f"head) to {target}")
    return config


def check_exportable(source: str) -> None:
    """Refuse, naming why, a model CTranslate2 cannot run as a decoder-only generator."""
    ctranslate2 = require_ctranslate2()
    from ctranslate2.converters.transformers import _MODEL_LOADERS

    config = exportable_config(source, "CTranslate2", "--quantization int8")
    if type(config).__name__ not in _MODEL_LOADERS:
        name = (config.architectures or [type(config).__name__])[0]
        raise LlmkitError(f"{source} is a {name} ({config.model_type}): CTranslate2 {ctranslate2.__version__} has "
                          f"no converter for it (it converts Llama, Mistral, Qwen2/3, Gemma, GPT-2, GPT-NeoX, "
                          f"Falcon, Phi and more)")


def export_ct2(source: str, folder: Path, quantization: str = "float32") -> dict:
    """Convert the model at `source` (an adapter merged onto its base) into CTranslate2 files in `folder`
    (made here), with its tokenizer, generation_config.json and EXPORT_FILE. Returns the EXPORT_FILE record."""
    from transformers import GenerationConfig

    from llmkit.rundir import write_json

    ctranslate2 = require_ctranslate2()
    from ctranslate2.converters import TransformersConverter

    if quantization not in QUANTIZATIONS:
        raise LlmkitError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    check_exportable(source)
    model, tokenizer = load_model(source, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as scratch:
        plain, converted = Path(scratch) / "model", Path(scratch) / "ct2"  # the converter reads a plain folder
        model.save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        try:
            TransformersConverter(str(plain)).convert(str(converted), quantization=quantization)
        except (ValueError, NotImplementedError, RuntimeError) as error:
            raise LlmkitError(f"{source}: CTranslate2 cannot convert it: {first_line(error)}") from None
        folder.mkdir(parents=True, exist_ok=True)
        for path in converted.iterdir():
            shutil.move(path, folder / path.name)
    tokenizer.save_pretrained(folder)
    own = Path(source) / "generation_config.json"  # the model's own file, as it is
    if own.is_file():
        shutil.copyfile(own, folder / own.name)
    else:
        (model.generation_config or GenerationConfig.from_model_config(model.config)).save_pretrained(folder)
    config = model.config.to_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    record = {"made_by": "llmkit export", "format": "ct2", "source": str(source), "quantization": quantization,
              "ctranslate2": ctranslate2.__version__, "weights": source_fingerprint(Path(source)), "config": config}
    write_json(folder / EXPORT_FILE, record)
    return record
