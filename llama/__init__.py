"""A from-scratch, readable Llama 3 inference reference with the public API of Meta's llama3 package."""

from llama.completion import Completion
from llama.config import GenerationConfig
from llama.generation import ChatPrediction, CompletionPrediction, Llama, PromptError
from llama.model import ModelArgs, Transformer
from llama.streaming import StreamEvent
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = [
    "ChatFormat",
    "ChatPrediction",
    "Completion",
    "CompletionPrediction",
    "Dialog",
    "GenerationConfig",
    "Llama",
    "Message",
    "ModelArgs",
    "PromptError",
    "StreamEvent",
    "Tokenizer",
    "Transformer",
]
