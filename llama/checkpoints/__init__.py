"""Reading and writing weights: Meta's consolidated.NN.pth shards (meta.py), resharding them for any number of
ranks (reshard.py), Hugging Face safetensors directories (hf.py), GGUF files for llama.cpp (gguf.py), int8
checkpoints (quantized.py)."""
