"""The benchmark's report (bench/run.py): a line per result, the README's table, and a chart."""

from typing import Any, Dict

from bench.llamacpp import NAME as LLAMACPP, NAME_Q8_0 as LLAMACPP_Q8_0


def summary_line(res: Dict[str, Any]) -> str:
    """One (dtype, batch) result in a line of prose."""
    o = res["ours"]
    line = (f"{res['dtype']} batch {res['batch']}: ours {o['decode_tok_s']:.1f} tok/s decode "
            f"({o['fraction_of_read_bandwidth']:.0%} of the best read bandwidth seen, "
            f"{o['median_round_fraction_of_read_bandwidth']:.0%} in the median round, "
            f"{o['median_fraction_of_bracketing_read_bandwidth']:.0%} of the reads just before and after its runs), "
            f"first token "
            f"{o['time_to_first_token_s'] * 1e3:.1f} ms, KV cache {res['kv_cache_bytes'] / 2**20:.1f} MiB")
    if "transformers" in res:
        h = res["transformers"]
        line += (f"; transformers {h['decode_tok_s']:.1f} tok/s; ratio {res['ratio_decode']:.2f}x; "
                 f"same tokens in {res['rows_matching_transformers']}/{res['batch']} rows; at the read bandwidth "
                 f"(roofline, {res['roofline_decode_tok_s']:.1f} tok/s) the ratio would be "
                 f"{res['largest_possible_ratio']:.2f}x")
    for bits in ("int8", "int4"):
        if f"ours-{bits}" in res:
            q = res[f"ours-{bits}"]
            line += (f"; ours {bits} {q['decode_tok_s']:.1f} tok/s ({q['fraction_of_read_bandwidth']:.0%} of the "
                     f"read bandwidth, {q['median_fraction_of_bracketing_read_bandwidth']:.0%} of the reads "
                     f"beside its runs), same greedy tokens in {res[f'rows_matching_{bits}']}/{res['batch']} rows "
                     f"(the first {res[f'leading_tokens_matching_{bits}']} tokens)")
    if LLAMACPP in res:
        line += (f"; llama.cpp {res[LLAMACPP]['decode_tok_s']:.1f} tok/s, ratio {res['ratio_llamacpp']:.2f}x "
                 f"({res['median_round_ratio_llamacpp']:.2f}x in the median round), "
                 f"same tokens in {res['rows_matching_llamacpp']}/{res['batch']} rows "
                 f"(the first {res['leading_tokens_matching_llamacpp']} tokens)")
    if LLAMACPP_Q8_0 in res:
        q = res[LLAMACPP_Q8_0]
        line += (f"; llama.cpp Q8_0 {q['decode_tok_s']:.1f} tok/s ({q['fraction_of_read_bandwidth']:.0%} of the read "
                 f"bandwidth), ours int8 / it {res['ratio_llamacpp_q8_0']:.2f}x "
                 f"({res['median_round_ratio_llamacpp_q8_0']:.2f}x in the median round)")
    return line


def markdown_table(report: Dict[str, Any]) -> str:
    """The README's table: one line per (dtype, batch); a llama.cpp column when it ran."""
    m = report["machine"]
    where = m.get("gpu") or f"{m.get('cpu')}, {m['threads']} threads"
    with_llamacpp = any(LLAMACPP in r for r in report["results"])
    lines = ["| machine | model | dtype | batch | ours tok/s | transformers tok/s | ratio "
             "| % of read bandwidth (median round) | roofline tok/s (largest possible ratio) |",
             "|---|---|---|---|---|---|---|---|---|"]
    with_q8_0 = any(LLAMACPP_Q8_0 in r for r in report["results"])
    if with_llamacpp:
        lines[0] += " llama.cpp tok/s (ours / llama.cpp) |"
        lines[1] += "---|"
    if with_q8_0:
        lines[0] += " ours int8 tok/s (% of read bandwidth) | llama.cpp Q8_0 tok/s (ours int8 / Q8_0) |"
        lines[1] += "---|---|"
    for r in report["results"]:
        hf = r.get("transformers", {}).get("decode_tok_s")
        hf_cell = "-" if hf is None else f"{hf:.1f}"
        ratio_cell = "-" if hf is None else f"{r['ratio_decode']:.2f}x"
        roofline_cell = f"{r['roofline_decode_tok_s']:.0f}"
        if hf is not None:
            roofline_cell += f" ({r['largest_possible_ratio']:.2f}x)"
        lines.append(
            f"| {where} | {report['model']} | {r['dtype']} | {r['batch']} | {r['ours']['decode_tok_s']:.1f} | "
            f"{hf_cell} | {ratio_cell} | {r['ours']['fraction_of_read_bandwidth']:.0%} "
            f"({r['ours']['median_round_fraction_of_read_bandwidth']:.0%}) | "
            f"{roofline_cell} |"
        )
        if with_llamacpp:
            lines[-1] += (f" {r[LLAMACPP]['decode_tok_s']:.1f} ({r['ratio_llamacpp']:.2f}x; median round "
                          f"{r['median_round_ratio_llamacpp']:.2f}x) |" if LLAMACPP in r
                          else " - |")
        if with_q8_0:
            q, c = r.get("ours-int8"), r.get(LLAMACPP_Q8_0)
            lines[-1] += (f" {q['decode_tok_s']:.1f} ({q['fraction_of_read_bandwidth']:.0%}) |" if q else " - |")
            lines[-1] += (f" {c['decode_tok_s']:.1f} ({r['ratio_llamacpp_q8_0']:.2f}x; median round "
                          f"{r['median_round_ratio_llamacpp_q8_0']:.2f}x) |" if c else " - |")
    return "\n".join(lines)


def chart(report: Dict[str, Any], path: str) -> bool:
    """Decode tokens/s of each system per (dtype, batch), and the fraction of read bandwidth reached, as a PNG
    at `path`; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    names = [n for n in ("ours", "ours-simple", "ours-int8", "ours-int4", "transformers", LLAMACPP, LLAMACPP_Q8_0)
             if any(n in r for r in results)]
    labels = [f"{r['dtype']}\nbatch {r['batch']}" for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(results), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(results))]
        ax1.bar(xs, [r[name]["decode_tok_s"] if name in r else 0 for r in results], width, label=name)
        ax2.bar(xs, [100 * r[name]["fraction_of_read_bandwidth"] if name in r else 0 for r in results], width,
                label=name)
    for i, r in enumerate(results):
        if "ratio_decode" in r:
            top = max(r[n]["decode_tok_s"] for n in names if n in r)
            ax1.annotate(f"{r['ratio_decode']:.2f}x", (i, top), ha="center", va="bottom")
    ax1.set_ylabel("decode tokens/s")
    ax2.set_ylabel("% of measured read bandwidth")
    ax2.axhline(100, color="grey", linewidth=0.8)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(labels)
        ax.legend()
    m = report["machine"]
    fig.suptitle(f"{report['model']} on {m.get('gpu') or m.get('cpu')} ({m['threads']} threads), "
                 f"prompt {report['prompt_len']}, {report['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
