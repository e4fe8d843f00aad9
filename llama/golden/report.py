"""A comparison's result: per prompt and overall, as a readable table and as JSON."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from llama.golden.tolerances import Tolerances


@dataclass
class PromptResult:
    """One prompt's comparison. Steps count generated tokens from 0; positions count from the prompt's
    first token (teacher-forced position t is the prediction of ids[t] from ids[:t])."""

    id: str
    verdict: str = "pass"  # "pass", "near-tie" (passes) or "FAIL"
    cause: str = ""  # why it failed, or which near-tie it passed on
    prompt_ids_match: Optional[bool] = None  # None: the other engine gave no prompt ids
    prompt_ids_part_at: Optional[int] = None
    greedy_len: Optional[Tuple[int, int]] = None  # (reference, other)
    greedy_parts_at: Optional[int] = None  # first step where the greedy ids differ
    greedy_position: Optional[int] = None  # the same, as a position in prompt + generation
    parting: Optional[str] = None  # "near-tie", "disagreement" or "stop"
    ref_token: Optional[int] = None  # the ids chosen at the parting step
    other_token: Optional[int] = None
    ref_gap: Optional[float] = None  # reference logprob of its token minus of the other's, there
    positions: int = 0  # positions both scored in one context
    max_dlogprob: Optional[float] = None
    max_at: Optional[str] = None  # "scored 12" or "greedy 3"
    mean_dlogprob: Optional[float] = None
    first_over: Optional[str] = None  # first position above the logprob tolerance
    topk_overlap: Optional[float] = None  # mean share of the top-k ids both engines list
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict != "FAIL"


@dataclass
class Report:
    prompts: List[PromptResult]
    tolerances: Tolerances
    tolerance_source: str
    reference: str
    other: str
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts) and bool(self.prompts)

    @property
    def failed(self) -> List[PromptResult]:
        return [p for p in self.prompts if not p.passed]

    def summary(self) -> str:
        ties = sum(p.verdict == "near-tie" for p in self.prompts)
        tie_note = f", {ties} on a near-tie" if ties else ""
        t = self.tolerances
        tolerances = (f"|Δ logprob| <= {t.logprob:g}, mean <= {t.mean_logprob:g}, tie <= {t.tie:g} "
                      f"({self.tolerance_source})")
        if self.passed:
            return f"PASS: {len(self.prompts)} prompts agree{tie_note}; {tolerances}"
        return f"FAIL: {len(self.failed)} of {len(self.prompts)} prompts differ{tie_note}; {tolerances}"

    def table(self) -> str:
        """The readable report: one row per prompt, then the cause of each failure and near-tie."""
        header = ("prompt", "verdict", "ids", "greedy parts at", "ref gap", "max |Δlp| (at)", "mean |Δlp|",
                  "top-k", "positions")
        rows = [header]
        for p in self.prompts:
            ids = {True: "same", False: f"differ@{p.prompt_ids_part_at}", None: "-"}[p.prompt_ids_match]
            parts = "-" if p.greedy_parts_at is None else f"step {p.greedy_parts_at} ({p.parting})"
            rows.append((
                p.id, p.verdict, ids, parts, _num(p.ref_gap),
                "-" if p.max_dlogprob is None else f"{p.max_dlogprob:.2e} ({p.max_at})",
                "-" if p.mean_dlogprob is None else f"{p.mean_dlogprob:.2e}",
                "-" if p.topk_overlap is None else f"{p.topk_overlap:.2f}", str(p.positions),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"reference: {self.reference}", f"other:     {self.other}", ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        details = [f"  {p.id}: {p.verdict}: {p.cause}" for p in self.prompts if p.cause]
        details += [f"  {p.id}: {n}" for p in self.prompts for n in p.notes]
        if details:
            lines += [""] + details
        lines += [f"  note: {n}" for n in self.notes]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return {
            "verdict": "PASS" if self.passed else "FAIL",
            "summary": self.summary(),
            "reference": self.reference,
            "other": self.other,
            "tolerances": asdict(self.tolerances),
            "tolerance_source": self.tolerance_source,
            "notes": self.notes,
            "prompts": [asdict(p) for p in self.prompts],
        }


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"
