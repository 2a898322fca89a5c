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
