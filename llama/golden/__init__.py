"""Golden outputs: record what this reference does with a set of prompts, and compare another engine with it.

    python -m llama.golden record --ckpt_dir models/demo --prompts prompts.jsonl --out golden.jsonl.gz
    python -m llama.golden compare golden.jsonl.gz OTHER      # OTHER: outputs file, hf:DIR, llamacpp:FILE.gguf

From Python (docs/golden.md has the walk-through and the schemas):

    from llama.golden import load_golden, assert_matches
    assert_matches(load_golden("golden.jsonl.gz"), "my_engine.jsonl")
"""

from llama.golden.compare import compare
from llama.golden.engines import Engine, OursEngine
from llama.golden.formats import load_outputs
from llama.golden.prompts import Prompt, read_prompts
from llama.golden.record import record, run_engine
from llama.golden.report import PromptResult, Report
from llama.golden.schema import Golden, Record, Sequence, load_golden
from llama.golden.testing import assert_matches, check
from llama.golden.tolerances import Tolerances

__all__ = [
    "Engine", "Golden", "OursEngine", "Prompt", "PromptResult", "Record", "Report", "Sequence", "Tolerances",
    "assert_matches", "check", "compare", "load_golden", "load_outputs", "read_prompts", "record", "run_engine",
]
