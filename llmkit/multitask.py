"""Multi-task learning by hard parameter sharing: one encoder, a head per task, trained on batches drawn
from the tasks in turn.

Each task keeps a complete transformers model (its class's forward, loss, `save_pretrained`), and every one
of them reads the same backbone object, so a step on any task trains the shared encoder. Batches hold one
task each (tasks differ in inputs and targets); which task comes next is drawn with probability
∝ (its training examples)^(1/T) (T = finetune.task_temperature: 1 follows the data, larger evens the tasks
out, as in multilingual pretraining).

    model = SharedEncoderModel({"sentiment": classifier, "entities": tagger})  # tagger now uses classifier's encoder
    trainer = MultitaskTrainer(model=model, train_dataset=TaskRows({...}), ...)
"""

from __future__ import annotations

import math
import random

import torch

from llmkit.training import LlmkitTrainer

LENGTH_GROUP = 50  # batches whose examples are sorted by length together (as transformers' group_by_length)


def task_probabilities(sizes: list[int], temperature: float) -> list[float]:
    """P(next batch is of task i) ∝ sizes[i]^(1/temperature)."""
    weights = [size ** (1 / temperature) for size in sizes]
    return [weight / sum(weights) for weight in weights]


class SharedEncoderModel(torch.nn.Module):
    """One backbone and each task's own layers (its head), registered once each: `encoder.*` and
    `heads.<task>.*` in a checkpoint. `forward(task=name, **inputs)` is that task's model's forward.

    The backbone kept is the fullest one (BERT's classifier has a pooler that its tagger lacks); each task's
    model is saved with just the weights its class has, so that it loads as a plain transformers model."""

    accepts_loss_kwargs = False  # each task's model averages its own loss over its batch

    def __init__(self, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.own_keys = {name: set(model.state_dict()) for name, model in models.items()}
        self.encoder = max((model.base_model for model in models.values()), key=lambda m: len(m.state_dict()))
        self.heads = torch.nn.ModuleDict()
        for name, model in models.items():
            backbone = next(child for child, module in model.named_children() if module is model.base_model)
            setattr(model, backbone, self.encoder)
            self.heads[name] = torch.nn.ModuleDict(
                {child: module for child, module in model.named_children() if child != backbone})
        self.task_models = models  # a plain dict: the modules are registered above, once

    def forward(self, task: str, **inputs):
        return self.task_models[task](**inputs)

    def train(self, mode: bool = True):
        super().train(mode)
        for model in self.task_models.values():  # their own flag too (their layers are set above)
            model.training = mode
        return self

    def save(self, name: str, folder) -> None:
        """Task `name`'s model, as transformers saves it, with the weights of its class only."""
        model = self.task_models[name]
        model.save_pretrained(str(folder), state_dict={key: value for key, value in model.state_dict().items()
                                                       if key in self.own_keys[name]})


class TaskRows(torch.utils.data.Dataset):
    """The feature rows of several tasks, one index space; each row says its task ("task")."""

    def __init__(self, rows: dict[str, list[dict]]):
        self.names = list(rows)
        self.rows = [row | {"task": name} for name in self.names for row in rows[name]]
        self.lengths = [[len(row["input_ids"]) for row in rows[name]] for name in self.names]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class TaskCollator:
    """Pads a batch (all of one task) with that task's collator, and passes the task's name on."""

    def __init__(self, collators: dict):
        self.collators = collators

    def __call__(self, rows: list[dict]) -> dict:
        task = rows[0]["task"]
        batch = self.collators[task]([{k: v for k, v in row.items() if k != "task"} for row in rows])
        return dict(batch) | {"task": task}


class TaskBatches(torch.utils.data.Sampler):
    """Batches of TaskRows indices, one task each. Shuffled (training): an epoch has as many batches as the
    tasks fill, each one's task drawn by `probabilities`; a task's examples are shuffled, grouped by length
    (little padding) and start over, reshuffled, when used up; seeded by seed and epoch, so that a resumed
    run sees the batches an uninterrupted one would. Not shuffled (evaluation): every task's rows in order."""

    def __init__(self, lengths: list[list[int]], size: int, probabilities: list[float] | None = None,
                 seed: int = 0, shuffle: bool = True):
        self.lengths, self.size, self.probabilities = lengths, size, probabilities
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.offsets = [sum(map(len, lengths[:task])) for task in range(len(lengths))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(task) / self.size) for task in self.lengths)

    def __iter__(self):
        if not self.shuffle:
            for offset, task in zip(self.offsets, self.lengths):
                yield from ([offset + i for i in range(start, min(start + self.size, len(task)))]
                            for start in range(0, len(task), self.size))
            return
        rng = random.Random(self.seed * 100_003 + self.epoch)
        streams = [self.task_batches(task, rng) for task in range(len(self.lengths))]
        for task in rng.choices(range(len(self.lengths)), weights=self.probabilities, k=len(self)):
            yield next(streams[task])

    def task_batches(self, task: int, rng: random.Random):
        """One task's batches, without end: each pass shuffled, then similar lengths batched together."""
        lengths, offset = self.lengths[task], self.offsets[task]
        while True:
            order = rng.sample(range(len(lengths)), len(lengths))
            group = LENGTH_GROUP * self.size
            batches = []
            for start in range(0, len(order), group):
                chunk = sorted(order[start:start + group], key=lengths.__getitem__, reverse=True)
                batches += [chunk[i:i + self.size] for i in range(0, len(chunk), self.size)]
            rng.shuffle(batches)
            yield from ([offset + i for i in batch] for batch in batches)


class MultitaskTrainer(LlmkitTrainer):
    """The Trainer over TaskRows: batches of one task each (TaskBatches), the loss of each batch's task; the
    validation loss is over every task's validation rows, the scores per task come from `score_validation`."""

    def __init__(self, *args, probabilities: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.probabilities = probabilities

    def get_train_dataloader(self):
        return self.task_loader(self.train_dataset, TaskBatches(
            self.train_dataset.lengths, self.args.per_device_train_batch_size, self.probabilities,
            self.args.data_seed or self.args.seed))

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset or self.eval_dataset
        return self.task_loader(dataset, TaskBatches(dataset.lengths, self.args.per_device_eval_batch_size,
                                                     shuffle=False))

    def task_loader(self, dataset: TaskRows, batches: TaskBatches):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator,
                                             num_workers=self.args.dataloader_num_workers,
                                             pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None
