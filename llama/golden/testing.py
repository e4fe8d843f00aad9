"""For another project's test suite: check an engine against a golden file in three lines.

    from llama.golden import load_golden, assert_matches

    def test_my_engine_matches_the_reference():
        assert_matches(load_golden("demo-fp32.jsonl.gz"), "my_engine_outputs.jsonl")
"""

from pathlib import Path
from typing import Optional, Union

from llama.golden.compare import TokenText, compare
from llama.golden.engines import Engine
from llama.golden.formats import load_outputs
from llama.golden.record import run_engine
from llama.golden.report import Report
from llama.golden.schema import Golden, load_golden
from llama.golden.tolerances import Tolerances

Other = Union[Golden, str, Path, Engine]


def check(golden: Union[Golden, str, Path], other: Other, tolerances: Optional[Tolerances] = None,
          token_text: Optional[TokenText] = None) -> Report:
    """Compare `other` with `golden` and return the report. `other` is a loaded Golden, a path to outputs
    (golden file or minimal schema), or an engine (llama.golden.engines / adapters), which is run on the
    golden's prompts with its settings."""
    if not isinstance(golden, Golden):
        golden = load_golden(golden)
    if isinstance(other, (str, Path)):
        other = load_outputs(other)
    elif not isinstance(other, Golden):
        name = getattr(other, "name", type(other).__name__)
        other = run_engine(other, golden)
        other.path = f"engine {name!r}"  # what the report calls it
    return compare(golden, other, tolerances, token_text)


def assert_matches(golden: Union[Golden, str, Path], other: Other, tolerances: Optional[Tolerances] = None,
                   token_text: Optional[TokenText] = None) -> Report:
    """As `check`, raising AssertionError with the readable report when a prompt fails; returns the report
    (near-ties pass and are listed in it)."""
    report = check(golden, other, tolerances, token_text)
    if not report.passed:
        raise AssertionError("engine does not match the golden outputs\n" + report.table())
    return report
