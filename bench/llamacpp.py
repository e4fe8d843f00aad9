"""llama.cpp as a contender in the benchmark (`python -m llama.bench --llamacpp`), through llama-cpp-python.

The bench's weights are written once per dtype as a GGUF file (llama.checkpoints.gguf) in a temporary folder, and
llama.cpp generates greedily from the same prompt token ids, exactly as many tokens as the others (its
model has no vocabulary, so no token stops it). Every run starts from an empty cache: llama-cpp-python
would otherwise reuse the previous run's prompt and skip the prefill being timed.

llama-cpp-python is not a dependency of this project (installing it compiles llama.cpp): install it by hand,
`pip install llama-cpp-python==0.3.36` (and `pip install gguf==0.19.0`). Its high-level API decodes one
sequence, so the bench runs it at batch 1 only. With `--quantize int8` it also runs on the same weights
quantized to its Q8_0 (blocks of 32 weights of a row with a float16 scale each), beside our int8.
"""

import tempfile
from typing import Callable, Dict, Optional

import torch

from llama.checkpoints.gguf import write_gguf
from llama.model import ModelArgs

NAME = "llama.cpp"
NAME_Q8_0 = "llama.cpp-q8_0"  # on Q8_0 weights: beside our int8 (--quantize int8)
INSTALL = "pip install llama-cpp-python==0.3.36 gguf==0.19.0"
# ggml's type ids for the KV cache: llama.cpp keeps it in the weights' dtype, as our model does.
GGML_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}


def import_llama_cpp():
    """The llama_cpp module, or an ImportError that names the pip command."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"--llamacpp needs llama-cpp-python (not a project dependency): {INSTALL}") from e
    return llama_cpp


def build_llamacpp(args: ModelArgs, sd: Dict[str, torch.Tensor], dtype: torch.dtype, threads: int,
                   gpu: bool = False, quantize: Optional[str] = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """llama.cpp on `sd` in `dtype`: returns `generate(prompts (1, len) tensor, n) -> (1, n) token ids`.

    Args:
        args: the model's shape; args.max_seq_len becomes llama.cpp's context size.
        sd: the weights in Meta's layout.
        dtype: the weights' and the KV cache's dtype in llama.cpp (float32, bfloat16 or float16).
        threads: CPU threads for prefill and decode.
        gpu: offload every layer (needs a llama-cpp-python built with a GPU backend).
        quantize: "q8_0": the linear weights as llama.cpp's Q8_0 (llama.checkpoints.gguf), the KV cache
            still in `dtype`: the contender for our int8 weights.

    Raises:
        ImportError: llama-cpp-python or gguf is missing.
        ValueError: `gpu` with a llama-cpp-python that cannot offload; a batch of more than one prompt.
    """
    llama_cpp = import_llama_cpp()
    if gpu and not llama_cpp.llama_supports_gpu_offload():
        raise ValueError("this llama-cpp-python was built for the CPU only: run the bench with --device cpu, "
                         "or install a GPU build of llama-cpp-python")
    folder = tempfile.TemporaryDirectory(prefix="llama-bench-gguf-")
    path = write_gguf(f"{folder.name}/model.gguf", args, sd, dtype, quantize=quantize)
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=args.max_seq_len, n_batch=args.max_seq_len, n_ubatch=args.max_seq_len,
        n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1 if gpu else 0,
        type_k=GGML_TYPES[dtype], type_v=GGML_TYPES[dtype], verbose=False,
    )

    def generate(prompts: torch.Tensor, n: int) -> torch.Tensor:
        if prompts.shape[0] != 1:
            raise ValueError(f"llama.cpp (llama-cpp-python) runs one prompt at a time, got a batch of "
                             f"{prompts.shape[0]}")
        llm.reset()  # an empty cache: the prompt is prefilled again, as the other systems do every run
        out = []
        for token in llm.generate(prompts[0].tolist(), temp=0.0, reset=True):  # temp 0: greedy (argmax)
            out.append(token)
            if len(out) == n:
                break
        return torch.tensor([out])

    generate.gguf_folder = folder  # type: ignore[attr-defined]  # the file lives as long as `generate`
    return generate
