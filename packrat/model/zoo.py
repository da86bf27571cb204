"""Ready-made models to profile and serve, built from code with random weights (no downloads).

Each entry holds the text of a standalone `model.py` with one wrapper class, `Model`, whose
forward() takes the spec's inputs as keyword arguments and returns one small tensor per
example (logits for classifiers, the next token's top-5 ids for gpt2), so responses stay
small. The transformers-based entries need the optional extra: pip install -e '.[models]'.
Importing this module never imports transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from dataclasses import dataclass

import torch

from packrat.errors import ArchiveError
from packrat.model.spec import InputSpec, ModelSpec

logger = logging.getLogger(__name__)

MODEL_CLASS = "Model"
SEQ_LEN = 128


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: the `model.py` source shipped in its archive and its input spec."""

    name: str
    description: str
    source: str
    spec: ModelSpec
    needs_transformers: bool


_SMALL_CNN = '''\
"""Packrat zoo model small-cnn: a small CNN for 3x32x32 images, 10 classes (pure torch)."""
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixel_values))
'''

# The transformers models are built from their configs; the weights come from the archive's
# state_dict. HF_HUB_OFFLINE guards against any code path that would try the network.
_HF_PRELUDE = '''\
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
'''

_RESNET50 = (
    '"""Packrat zoo model resnet50: ResNet-50, 3x224x224 images, 1000 classes."""\n'
    + _HF_PRELUDE
    + '''from transformers import ResNetConfig, ResNetForImageClassification


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = ResNetForImageClassification(ResNetConfig(num_labels=1000))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixel_values).logits
'''
)

_BERT_BASE = (
    '"""Packrat zoo model bert-base: BERT-base sequence classifier, 128 token ids, 2 classes."""\n'
    + _HF_PRELUDE
    + '''from transformers import BertConfig, BertForSequenceClassification


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = BertForSequenceClassification(BertConfig())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids).logits
'''
)

_GPT2 = (
    '"""Packrat zoo model gpt2: GPT-2 (124M); returns the top-5 next-token ids."""\n'
    + _HF_PRELUDE
    + '''from transformers import GPT2Config, GPT2LMHeadModel


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = GPT2LMHeadModel(GPT2Config())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Only the last position's logits: the LM head over all 128 positions would cost
        # more than the transformer itself, and the response only needs the next token.
        hidden = self.net.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        logits = self.net.lm_head(hidden[:, -1])
        return logits.topk(5, dim=-1).indices
'''
)

# Vocabulary sizes of BertConfig() and GPT2Config(), written out so that this module does not
# import transformers; tests check them against the configs.
BERT_VOCAB = 30522
GPT2_VOCAB = 50257

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="small-cnn",
            description="small pure-torch CNN, 3x32x32 input, 10 classes",
            source=_SMALL_CNN,
            spec=ModelSpec(MODEL_CLASS, (InputSpec("pixel_values", (3, 32, 32), "float32"),)),
            needs_transformers=False,
        ),
        ZooModel(
            name="resnet50",
            description="ResNet-50 (transformers), 3x224x224 input, 1000 classes",
            source=_RESNET50,
            spec=ModelSpec(MODEL_CLASS, (InputSpec("pixel_values", (3, 224, 224), "float32"),)),
            needs_transformers=True,
        ),
        ZooModel(
            name="bert-base",
            description="BERT-base classifier (transformers), 128 token ids, 2 classes",
            source=_BERT_BASE,
            spec=ModelSpec(
                MODEL_CLASS, (InputSpec("input_ids", (SEQ_LEN,), "int64", high=BERT_VOCAB),)
            ),
            needs_transformers=True,
        ),
        ZooModel(
            name="gpt2",
            description="GPT-2 124M (transformers), 128 token ids, top-5 next-token ids",
            source=_GPT2,
            spec=ModelSpec(
                MODEL_CLASS, (InputSpec("input_ids", (SEQ_LEN,), "int64", high=GPT2_VOCAB),)
            ),
            needs_transformers=True,
        ),
    )
}


def get_zoo_model(name: str) -> ZooModel:
    """The zoo entry called `name`; ArchiveError listing the known names otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise ArchiveError(
            f"unknown zoo model {name!r}; known models: {', '.join(sorted(ZOO))}"
        ) from None


def require_dependencies(entry: ZooModel) -> None:
    """Raise ArchiveError with the install command if the entry needs a missing package."""
    if entry.needs_transformers and importlib.util.find_spec("transformers") is None:
        raise ArchiveError(
            f"zoo model {entry.name!r} needs the transformers package: "
            "pip install -e '.[models]'"
        )


def build_model(entry: ZooModel, seed: int = 0) -> torch.nn.Module:
    """Run the entry's model.py source and instantiate its class with seeded random weights.

    The global torch RNG is left as it was.
    """
    require_dependencies(entry)
    module = types.ModuleType(f"packrat_zoo_{entry.name.replace('-', '_')}")
    module.__file__ = f"<packrat zoo {entry.name}/model.py>"
    exec(compile(entry.source, module.__file__, "exec"), module.__dict__)
    cls = getattr(module, entry.spec.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls()
    return model.eval()
