"""The built-in default of ``specfast stability``: all-MiniLM-L6-v2 as a sentence encoder on 16
paraphrase pairs, with the loss it was trained with (in-batch multiple-negatives ranking).

The differentiable input is the word-embedding output [B, T, 384] (token ids are not differentiable);
the output is the mean-pooled last hidden state [B, 384] (sentence-transformers' pooling, before its
L2 normalisation, which only projects). The encoder is written as explicit stages (embeddings
LayerNorm, six transformer layers, pooling) so the per-layer table and product bound apply; a test
checks that their composition equals transformers' BertModel.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Sixteen paraphrase pairs: sentence 2i and 2i+1 say the same thing in different words.
DEFAULT_SENTENCES = [
    "A man is playing a guitar on the street.", "Someone strums a guitar outside on the sidewalk.",
    "The cat is sleeping on the warm windowsill.", "A cat naps in the sun by the window.",
    "The stock market fell sharply this morning.", "Share prices dropped steeply early today.",
    "She is cooking pasta for dinner.", "She is making spaghetti for her evening meal.",
    "The train to Berlin was delayed by two hours.", "The Berlin train arrived two hours late.",
    "Children are playing football in the park.", "Kids kick a ball around on the park lawn.",
    "The new phone has a much better camera.", "The latest phone's camera is greatly improved.",
    "It has been raining all week in the city.", "The city has had rain every day this week.",
    "He forgot his keys at the office.", "He left his keys behind at work.",
    "The museum opens at nine in the morning.", "The museum's doors open at 9 am.",
    "A doctor examined the patient carefully.", "The physician gave the patient a thorough check-up.",
    "The river flooded the small village.", "The village was flooded when the river overflowed.",
    "They are learning to speak Japanese.", "They are taking Japanese language lessons.",
    "The concert was cancelled because of the storm.", "The storm forced the organisers to cancel the concert.",
    "My laptop battery drains very quickly.", "The battery on my laptop runs out fast.",
    "The team celebrated their championship win.", "The players partied after winning the title.",
]


class SentenceEncoder(nn.Module):
    """Mean-pooled BERT encoder on a fixed padded batch: forward(word_embeddings [B, T, H]) -> [B, H]."""

    def __init__(self, bert: nn.Module, attention_mask: Tensor):
        super().__init__()
        self.bert = bert
        self.register_buffer("mask", attention_mask.to(torch.float32), persistent=False)
        # additive mask for eager attention: 0 where attended, a large negative number at padding
        self.register_buffer("additive_mask", (1.0 - self.mask)[:, None, None, :] * torch.finfo(torch.float32).min,
                             persistent=False)

    def embed(self, e: Tensor) -> Tensor:
        return self.bert.embeddings(inputs_embeds=e)

    def pool(self, h: Tensor) -> Tensor:
        w = self.mask[..., None]
        return (h * w).sum(1) / w.sum(1)

    def stability_stages(self):
        layers = [(f"layer.{i}", lambda h, layer=layer: layer(h, attention_mask=self.additive_mask))
                  for i, layer in enumerate(self.bert.encoder.layer)]
        return [("embeddings", self.embed), *layers, ("mean_pool", self.pool)]

    def forward(self, e: Tensor) -> Tensor:
        for _, stage in self.stability_stages():
            e = stage(e)
        return e


def ranking_loss(embeddings: Tensor, partner: Tensor, scale: float = 20.0) -> Tensor:
    """Multiple-negatives ranking loss (all-MiniLM-L6-v2's training loss): cross-entropy of scaled
    cosine similarities of each sentence to every other sentence in the batch, the paraphrase partner
    being the correct class."""
    z = nn.functional.normalize(embeddings, dim=-1)
    sim = scale * z @ z.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, -1e4)
    return nn.functional.cross_entropy(sim, partner)


def load_default(model_dir=None, sentences=None, batch_size: int = 32):
    """(encoder, inputs, targets, loss_fn, sentences) for all-MiniLM-L6-v2 on the default sentences.

    The word-embedding matrix is frozen (the inputs are its output), every other parameter is θ."""
    try:
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("specfast stability's default model needs transformers: "
                           "pip install 'specfast[stability]'") from e
    from ..auditor import default_model_path

    path = str(model_dir) if model_dir is not None else str(default_model_path())
    sentences = list(sentences if sentences is not None else DEFAULT_SENTENCES)[:batch_size]
    if len(sentences) < 2:
        raise ValueError(f"specfast stability: need at least 2 sentences; got {len(sentences)}")
    if len(sentences) % 2:
        sentences = sentences[:-1]
    tok = AutoTokenizer.from_pretrained(path)
    bert = BertModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False).eval()
    bert.embeddings.word_embeddings.weight.requires_grad_(False)
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        inputs = bert.embeddings.word_embeddings(batch["input_ids"])
    enc = SentenceEncoder(bert, batch["attention_mask"]).eval()
    partner = torch.arange(len(sentences)) ^ 1
    return enc, inputs, partner, ranking_loss, sentences
