"""A from-scratch, readable Llama 3 inference reference with the public API of Meta's llama3 package."""

from llama.generation import ChatPrediction, CompletionPrediction, Llama, PromptError
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = [
    "ChatFormat",
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "PromptError",
    "Tokenizer",
    "Transformer",
]
