"""Compare another engine's records with a golden file's, prompt by prompt, and say where and why they part.

Two engines can only be compared where they saw the same context: positions of the teacher-forced
sequences up to the first id on which they differ, and greedy steps up to the first step where their
choices part (at that step the context is still shared, so the choice itself is compared: a near-tie when
the reference found the two tokens nearly equally likely, a disagreement otherwise). The cause a failure
points at follows from where it starts:
- prompt ids differ: the tokenizer (or the chat format);
- logprobs differ with a one-token context (position 1): something that does not depend on position
  (embeddings, RMSNorm, MLP, output layer, the dtype);
- they agree at first and differ from a later position: something position-dependent (RoPE, attention);
- teacher-forced positions agree but greedy steps after the first do not: the decode path (KV cache,
  positions of generated tokens);
- one engine stops where the other goes on: the stop tokens.
"""

from typing import Callable, Dict, List, Optional, Set, Tuple

from llama.golden.report import PromptResult, Report
from llama.golden.schema import Golden, Record
from llama.golden.tolerances import Tolerances, for_dtypes

TokenText = Callable[[int], str]


def _first_difference(a: List[int], b: List[int]) -> Optional[int]:
    """Index of the first element where a and b differ (len of the shorter if one extends the other), or
    None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _overlap(a: List[int], b: List[int]) -> Optional[float]:
    k = min(len(a), len(b))
    if k == 0:
        return None
    return len(set(a[:k]) & set(b[:k])) / k


def _token(token_text: Optional[TokenText], t: int) -> str:
    if token_text is None:
        return str(t)
    try:
        return f"{t} {token_text(t)!r}"
    except Exception:  # an id the tokenizer does not know: the id alone says enough
        return str(t)


def compare_records(ref: Record, other: Record, tol: Tolerances, stop_ids: Set[int],
                    token_text: Optional[TokenText] = None) -> PromptResult:
    """Compare one prompt's records; the reference is `ref` (the golden file's)."""
    res = PromptResult(id=ref.id)
    failures: List[str] = []
    # (where, index, absolute position, |Δ logprob|) at every position both engines scored in one context.
    deltas: List[Tuple[str, int, int, float]] = []
    overlaps: List[float] = []
    at_1: Optional[float] = None  # the largest |Δ logprob| at position 1, over its token and alternatives

    prompt_ok = True
    if ref.prompt_ids is not None and other.prompt_ids is not None:
        i = _first_difference(ref.prompt_ids, other.prompt_ids)
        res.prompt_ids_match = i is None
        if i is not None:
            prompt_ok = False
            res.prompt_ids_part_at = i
            ours = ref.prompt_ids[i : i + 4]
            theirs = other.prompt_ids[i : i + 4]
            failures.append(
                f"tokenizer: prompt ids differ from position {i} of {len(ref.prompt_ids)}: reference "
                f"{[_token(token_text, t) for t in ours]}, other {[_token(token_text, t) for t in theirs]}"
            )

    if ref.scored is not None and other.scored is not None:
        at_1 = _compare_scored(ref, other, deltas, overlaps)

    greedy_failures: List[str] = []
    if ref.greedy is not None and other.greedy is not None and prompt_ok:
        greedy_failures = _compare_greedy(ref, other, tol, stop_ids, token_text, res, deltas, overlaps)
    elif ref.greedy is not None and other.greedy is None and prompt_ok:
        res.notes.append("note: the other engine gave no greedy generation")

    res.positions = len(deltas)
    if deltas:
        worst = max(deltas, key=lambda d: d[3])
        res.max_dlogprob = worst[3]
        res.max_at = f"{worst[0]} {worst[1]}"
        res.mean_dlogprob = sum(d[3] for d in deltas) / len(deltas)
        over = [d for d in deltas if d[3] > tol.logprob]
        if over:
            first = min(over, key=lambda d: (d[0] != "scored", d[1]))  # teacher forcing first: no decode path
            res.first_over = f"{first[0]} {first[1]}"
            cause = _logprob_cause(first, at_1, tol, [d for d in deltas if d[0] == "scored"])
            # The cause listed first is the most telling: teacher forcing, then the greedy run's parting.
            # (a greedy step's logprobs going off before the greedy ids part is the earlier sign)
            earlier = first[0] == "scored" or res.greedy_parts_at is None or first[1] < res.greedy_parts_at
            failures += [cause] + greedy_failures if earlier else greedy_failures + [cause]
            greedy_failures = []
        elif res.mean_dlogprob > tol.mean_logprob:
            greedy_failures.append(
                f"logprobs: mean |Δ| {res.mean_dlogprob:.3g} over {len(deltas)} positions is above "
                f"{tol.mean_logprob:g} (no single position above {tol.logprob:g}): a small bias everywhere, "
                f"e.g. a dtype or a norm epsilon")
    failures += greedy_failures
    if overlaps:
        res.topk_overlap = sum(overlaps) / len(overlaps)
    if not deltas and res.greedy_parts_at is None and not failures and (ref.scored or ref.greedy):
        if not (other.greedy and other.greedy.ids):
            failures.append("nothing to compare: the other record has no scored positions and no greedy ids")
        else:
            res.notes.append("note: no logprobs to compare: greedy ids only")

    if failures:
        res.verdict = "FAIL"
        res.cause = failures[0]
        res.notes = [f"also: {f}" for f in failures[1:]] + res.notes
    elif res.parting == "near-tie":
        res.verdict = "near-tie"
        res.cause = (f"greedy parts at step {res.greedy_parts_at} on a near-tie: the reference's top two differ by "
                     f"{res.ref_gap:.3g} <= tie tolerance {tol.tie:g}; the steps after it are not compared")
    return res


def _compare_scored(ref: Record, other: Record, deltas: List[Tuple[str, int, int, float]],
                    overlaps: List[float]) -> Optional[float]:
    """Teacher-forced positions, up to the first id the two sequences differ on (entry t - 1 scores ids[t]
    in the context ids[:t]). Returns the largest |Δ logprob| at position 1 over its token and every
    alternative both engines list, which _logprob_cause reads."""
    a, b = ref.scored, other.scored
    part = _first_difference(a.ids, b.ids)
    shared = len(a.ids) if part is None else part  # positions 0 .. shared - 1 hold the same ids
    at_1 = None
    for k in range(max(min(shared - 1, len(a.logprobs), len(b.logprobs)), 0)):
        deltas.append(("scored", k + 1, k + 1, abs(a.logprobs[k] - b.logprobs[k])))
        if k == 0:
            ta, tb = a.top(0), b.top(0)
            at_1 = max([deltas[-1][3]] + [abs(ta[t] - tb[t]) for t in set(ta) & set(tb)])
        o = _overlap(a.top_ids[k] if k < len(a.top_ids) else [], b.top_ids[k] if k < len(b.top_ids) else [])
        if o is not None:
            overlaps.append(o)
    return at_1


def _compare_greedy(ref: Record, other: Record, tol: Tolerances, stop_ids: Set[int],
                    token_text: Optional[TokenText], res: PromptResult,
                    deltas: List[Tuple[str, int, int, float]], overlaps: List[float]) -> List[str]:
    """Walk the greedy steps while both engines chose the same ids; classify where they part."""
    g, o = ref.greedy, other.greedy
    base = len(ref.prompt_ids or [])
    res.greedy_len = (len(g.ids), len(o.ids))
    for j in range(min(len(g.ids), len(o.ids))):
        if g.ids[j] == o.ids[j]:
            if j < len(g.logprobs) and j < len(o.logprobs):
                deltas.append(("greedy", j, base + j, abs(g.logprobs[j] - o.logprobs[j])))
            ov = _overlap(g.top_ids[j] if j < len(g.top_ids) else [], o.top_ids[j] if j < len(o.top_ids) else [])
            if ov is not None:
                overlaps.append(ov)
            continue
        # The two engines chose differently in the same context.
        res.greedy_parts_at, res.greedy_position = j, base + j
        res.ref_token, res.other_token = g.ids[j], o.ids[j]
        ref_top = g.top(j)
        top1 = g.logprobs[j] if j < len(g.logprobs) else None
        theirs_under_ref = ref_top.get(o.ids[j])
        if top1 is not None and theirs_under_ref is not None:
            res.ref_gap = top1 - theirs_under_ref
        other_top = o.top(j)
        if g.ids[j] in other_top and top1 is not None:  # the reference's token, scored by both here
            deltas.append(("greedy", j, base + j, abs(top1 - other_top[g.ids[j]])))
        if res.ref_gap is not None and res.ref_gap <= tol.tie:
            res.parting = "near-tie"
            return []
        res.parting = "disagreement"
        gap = (f"the reference prefers {_token(token_text, g.ids[j])} by {res.ref_gap:.3g}"
               if res.ref_gap is not None else
               f"the other's choice is not in the reference's top {len(ref_top)}" if ref_top else
               "the reference recorded no alternatives")
        stop = ""
        if g.ids[j] in stop_ids or o.ids[j] in stop_ids:
            stop = "stop tokens: "
        return [f"{stop}greedy parts at step {j} (position {base + j}): reference {_token(token_text, g.ids[j])}, "
                f"other {_token(token_text, o.ids[j])}; {gap} > tie tolerance {tol.tie:g}"]
    n = min(len(g.ids), len(o.ids))
    if len(g.ids) > n:  # the other ended first
        if o.stop_reason == "stop_token" and not (len(g.ids) == n + 1 and g.ids[n] in stop_ids):
            res.parting = "stop"
            res.greedy_parts_at, res.greedy_position = n, base + n
            last = _token(token_text, o.ids[-1]) if o.ids else "(nothing)"
            return [f"stop tokens: the other engine stopped after step {n - 1} (last id {last}) where the "
                    f"reference went on with {_token(token_text, g.ids[n])}"]
        if o.stop_reason != "stop_token":
            res.notes.append(f"note: the other engine generated fewer tokens ({len(o.ids)} vs {len(g.ids)})")
    elif len(o.ids) > n:  # the reference ended first
        if g.stop_reason == "stop_token":
            res.parting = "stop"
            res.greedy_parts_at, res.greedy_position = n, base + n
            return [f"stop tokens: the reference stops at step {n - 1} with {_token(token_text, g.ids[-1])} (a stop "
                    f"token); the other engine went on for {len(o.ids) - n} more tokens"]
        res.notes.append(f"note: the reference generated fewer tokens ({len(g.ids)} vs {len(o.ids)})")
    return []


def _logprob_cause(first: Tuple[str, int, int, float], at_1: Optional[float], tol: Tolerances,
                   scored: List[Tuple[str, int, int, float]]) -> str:
    """Name the likely cause from where the logprobs go off. Position 1 is the telling one: predicted from a
    single token at position 0, where RoPE rotates nothing and attention has one key to look at, so a
    position-dependent bug leaves it exact (to rounding), while any other difference already shows there."""
    where, index, position, delta = first
    head = f"logprobs: |Δ| {delta:.3g} > {tol.logprob:g} at {where} {index}"
    floor = tol.logprob / 10  # what correct engines stay below (llama.golden.tolerances)
    independent = (where == "scored" and index == 1) or (at_1 is not None and at_1 > floor)
    if independent:
        seen = f"position 1 already differs by {at_1:.3g}" if at_1 is not None else "position 1 differs"
        return (f"{head} ({seen}, with a one-token context): a difference that does not depend on position: "
                f"embeddings, RMSNorm (weights, epsilon), MLP, output layer or dtype")
    exact_1 = f"position 1 agrees to {at_1:.2g}" if at_1 is not None else "position 1 was not scored"
    if where == "scored":
        return (f"{head} ({exact_1}): a position-dependent difference: RoPE (base, scaling, pairing of q/k "
                f"rows), the attention or its mask")
    clean = all(d[3] <= tol.logprob for d in scored)
    if index == 0 and clean:
        return f"{head} (position {position}, the first generated token; {exact_1}): the prefill of the greedy run"
    if clean and scored:
        return (f"{head} (position {position}) while every teacher-forced position agrees: the decode path "
                f"(KV cache, positions of generated tokens)")
    return f"{head} (position {position})"


def compare(reference: Golden, other: Golden, tolerances: Optional[Tolerances] = None,
            token_text: Optional[TokenText] = None, other_name: str = "other") -> Report:
    """Compare every prompt of `reference` with the record of the same id in `other`.

    Tolerances default to the looser of the two files' dtypes (llama.golden.tolerances). A prompt missing
    from `other` fails; records of `other` for prompts the reference lacks are noted.
    """
    source = "given"
    if tolerances is None:
        tolerances = for_dtypes(reference.header.get("dtype"), other.header.get("dtype"))
        source = "defaults for " + " vs ".join(
            str(d) for d in dict.fromkeys([reference.header.get("dtype"), other.header.get("dtype")]) if d)
    stop_ids = set(reference.header.get("stop_ids") or [])
    theirs: Dict[str, Record] = other.by_id()
    results = []
    for ref in reference.records:
        if ref.id not in theirs:
            results.append(PromptResult(id=ref.id, verdict="FAIL", cause="missing: no record with this id"))
            continue
        results.append(compare_records(ref, theirs[ref.id], tolerances, stop_ids, token_text))
    notes = []
    extra = sorted(set(theirs) - {r.id for r in reference.records})
    if extra:
        notes.append(f"{len(extra)} records of the other file have no golden prompt: {extra[:5]}")
    for key in ("dtype", "device"):
        if other.header.get(key) and other.header.get(key) != reference.header.get(key):
            notes.append(f"{key}: reference {reference.header.get(key)}, other {other.header.get(key)}")
    return Report(prompts=results, tolerances=tolerances, tolerance_source=source,
                  reference=reference.path or "reference", other=other.path or other_name, notes=notes)
