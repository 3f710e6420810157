"""A small module to try completions on: `stablelm-lsp complete examples/example.py --line 17 --character 19`."""
import os


def read_lines(path):
    """Return the lines of a text file, without their line endings."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class Stack:
    """A last-in, first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.

    def __len__(self):
        return len(self.items)
