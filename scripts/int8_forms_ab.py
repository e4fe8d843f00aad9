"""The int8 model of the bench's small shape (float32 activations, batch 1) with its decode products in three
settings, timed side by side in one process, alternating round by round (a measurement, not a test; figures
in docs/cpu-forms.md):

- "compiled": every int8 product in the compiled form (what the probe picked on main in a quiet moment);
- "blocked": every int8 product in the blocked form (llama.fast.blocked);
- "probe": whatever llama.fast.cpu_forms' probe picks at load (the blocked form among the candidates).

    python scripts/int8_forms_ab.py THREADS OUT.json
"""

import os
import statistics
import sys
import json
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.run as b  # noqa: E402
from llama.distributed import init_distributed  # noqa: E402
from llama.fast.cpu_forms import pick_cpu_forms, picked_forms  # noqa: E402


def main() -> None:
    threads, out_path = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    opts = b.parse_args(["--batch", "1", "--dtype", "float32", "--no-hf"])
    device = torch.device("cpu")
    init_distributed(device)
    args, sd = b.load_weights(opts, device, torch.float32, opts.prompt_len + opts.new_tokens, 1)
    systems, forms = [], {}
    for name in ("compiled", "blocked", "probe"):
        os.environ["LLAMA_CPU_FORMS"] = "auto" if name == "probe" else "off"
        q = b.build_ours(args, sd, device, torch.float32, True, False, "int8")
        if name != "probe":
            pick_cpu_forms(q.model, force=name)
        forms[name] = picked_forms(q.model)
        systems.append(b.ours_system(name, q))
    print(forms)
    prompts = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(0))
    bandwidths = b.measure(systems, prompts, opts.new_tokens, 7, 1, device, "ab")
    decode = {s.name: [(opts.new_tokens - 1) / max(f - t, 1e-9) for f, t in zip(s.full, s.ttft)] for s in systems}
    step = b.bytes_per_decode_step(sd, args, torch.float32, 1, opts.prompt_len, opts.new_tokens, int8=True)
    report = {"threads": threads, "forms": forms, "decode_tok_s_per_round": decode, "round_read_bandwidths": bandwidths,
              "bytes_per_decode_step": step, "load_average_end": os.getloadavg()}
    for name, runs in decode.items():
        ratio = statistics.median(x / y for x, y in zip(runs, decode["compiled"]))
        print(f"{name}: best {max(runs):.1f} tok/s, median {statistics.median(runs):.1f}, median round ratio to "
              f"compiled {ratio:.2f}x; best run {max(runs) * step['total_bytes'] / max(bandwidths):.0%} of the best "
              "read bandwidth")
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
