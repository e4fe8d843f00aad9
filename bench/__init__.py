"""The benchmark: ours beside transformers (and llama.cpp) on the same weights; results and their history in
bench/results/ and bench/README.md."""
