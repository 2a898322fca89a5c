"""Small networks shared by test modules in different folders."""

import torch
from torch import nn


class Tied(nn.Module):
    """A language-model shape in miniature: the head shares the token embedding's weight."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(300, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 300, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mid(self.wte(tokens))))


def small_cnn() -> nn.Module:
    """A conv, batch norm and linear layer on 8 x 8 x 8 inputs, seeded (the same weights every call), in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)
    ).eval()
