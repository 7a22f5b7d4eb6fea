#!/usr/bin/env python
"""The operator-level facts the CPU decoding fast paths rest on, measured in one process (microseconds per call,
median of alternating rounds):

1. int8 products: torch's dynamic int8 Linear operator called from Python (``torch.ops.quantized.linear_dynamic``,
   what torch's own module does) against the same operator called through our TorchScript function
   (``b2t_fairseq.fast_paths.int8.int8_product``): the packed weights handed over from Python cost a fixed amount
   per call, which the function avoids. Same operator, same numbers (the script checks equality).
2. attention over saved keys: the decoder self-attention's two batched products (scores, then the weighted sum)
   over keys and values held contiguously (fairseq's layout), as a view of a step-major buffer
   (``kv_cache._one_step_longer``'s layout) and as a view of a rows x heads x capacity x head_dim buffer (the
   layout tried before). Same numbers in every layout (checked).
3. a beam reordering's copy of saved rows (``kv_cache.move_rows``): the history of a third of the rows replaced by
   other rows', with torch's index_select and index_copy_ on float32 elements and on the same bytes viewed as
   16-byte elements (what move_rows does). Same bytes (checked).

    .venv/bin/python benchmarks/bench_decoding_ops.py --threads 1
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from bench_b2t_vs_transformer import cpu_model, git_commit, log, usable_cores  # noqa: E402
from bench_cpu_decoding import record  # noqa: E402


def per_call_us(fn, calls):
    for _ in range(max(calls // 10, 5)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def alternate(variants, rounds, calls):
    """{name: median µs per call} over ``rounds`` rounds that run the variants in turn (order reversed every other)."""
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            times[name].append(per_call_us(variants[name], calls))
    return {name: statistics.median(v) for name, v in times.items()}


def int8_rows(cli):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from b2t_fairseq.fast_paths.int8 import int8_product

    rows = []
    for width in (64, 512):
        for tokens in (16, 64):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation notice of its quantized tensors
                linear = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(width, width)),
                                          {torch.nn.Linear: per_channel_dynamic_qconfig})[0]  # fmt: skip
            packed = linear._packed_params._packed_params
            x = torch.randn(1, tokens, width)
            python = torch.ops.quantized.linear_dynamic(x, packed, False)
            if not torch.equal(int8_product(x, packed, False), python):
                raise RuntimeError("int8_product gave other numbers than torch's operator")
            t = alternate({"from Python": lambda: torch.ops.quantized.linear_dynamic(x, packed, False),
                           "through int8_product": lambda: int8_product(x, packed, False)},
                          cli.rounds, cli.calls)  # fmt: skip
            rows.append((f"{tokens} x {width} -> {width}", t["from Python"], t["through int8_product"]))
    return rows


def attention_rows(cli):
    """Each call attends over the next of ``LAYERS`` layers' saved keys and values, so that, as in a decoder step,
    the keys come from memory rather than from the cache of the previous call."""
    rows = []
    heads, head_dim, capacity = 8, 64, 32
    for batch in (16, 64):
        for steps in (8, 24):
            layouts = {"contiguous": [], "step-major": [], "rows-major": []}
            for _ in range(LAYERS):
                keys, values = torch.randn(batch, heads, steps, head_dim), torch.randn(batch, heads, steps, head_dim)
                layouts["contiguous"].append((keys, values))
                step_major = [torch.empty(capacity, batch, heads, head_dim) for _ in range(2)]
                rows_major = [torch.empty(batch, heads, capacity, head_dim) for _ in range(2)]
                for room, saved in zip(step_major, (keys, values)):
                    room[:steps] = saved.permute(2, 0, 1, 3)
                for room, saved in zip(rows_major, (keys, values)):
                    room[:, :, :steps] = saved
                layouts["step-major"].append(tuple(room[:steps].permute(1, 2, 0, 3) for room in step_major))
                layouts["rows-major"].append(tuple(room[:, :, :steps] for room in rows_major))
            q = torch.randn(batch * heads, 1, head_dim)

            def attend(k, v):
                k, v = k.view(batch * heads, steps, head_dim), v.view(batch * heads, steps, head_dim)  # views only
                return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)

            for name, saved in layouts.items():
                if not all(torch.equal(attend(*kv), attend(*ref)) for kv, ref in zip(saved, layouts["contiguous"])):
                    raise RuntimeError(f"{name}: other numbers than contiguous keys")

            def cycling(saved):
                turn = iter(range(10**9))
                return lambda: attend(*saved[next(turn) % LAYERS])

            t = alternate({name: cycling(saved) for name, saved in layouts.items()}, cli.rounds, cli.calls)
            rows.append((f"{batch} rows, {steps} steps", t["contiguous"], t["step-major"], t["rows-major"]))
    return rows


LAYERS = 12


def reorder_rows(cli):
    """Each call reorders the next of ``LAYERS`` layers' step-major buffers, as a decoder step does."""
    from b2t_fairseq.fast_paths.kv_cache import move_rows

    rows = []
    heads, head_dim, capacity = 8, 64, 32
    for batch in (16, 64):
        moved = torch.arange(0, batch, 3)
        taken = moved.flip(0)
        for steps in (8, 24):
            rooms = {name: [torch.randn(capacity, batch, heads, head_dim, generator=torch.Generator().manual_seed(i))
                            for i in range(LAYERS)] for name in ("float32", "16-byte")}  # fmt: skip

            def plain(front):
                front.index_copy_(1, moved, front.index_select(1, taken))

            plain(rooms["float32"][0][:steps]), move_rows(rooms["16-byte"][0][:steps], moved, taken)
            if not torch.equal(rooms["float32"][0], rooms["16-byte"][0]):
                raise RuntimeError("move_rows moved other bytes than index_select and index_copy_")

            def cycling(name, fn):
                turn = iter(range(10**9))
                return lambda: fn(rooms[name][next(turn) % LAYERS][:steps])

            t = alternate({"float32": cycling("float32", plain), "16-byte": cycling("16-byte",
                          lambda f: move_rows(f, moved, taken))}, cli.rounds, cli.calls)  # fmt: skip
            rows.append((f"{len(moved)} of {batch} rows, {steps} steps", t["float32"], t["16-byte"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads; default usable cores")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=500, help="calls per variant and round")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--no-record", action="store_true")
    cli = p.parse_args(argv)
    cli.threads = cli.threads or usable_cores()
    torch.set_num_threads(cli.threads)
    log("int8 products")
    int8 = int8_rows(cli)
    log("attention over saved keys")
    attention = attention_rows(cli)
    log("a beam reordering's copy of saved rows")
    reorder = reorder_rows(cli)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n## Decoding operators — {date} — commit {git_commit()}\n",
             f"- machine: {cpu_model()}, {usable_cores()} usable cores; torch {torch.__version__}; {cli.threads} threads",
             f"- command: `python benchmarks/bench_decoding_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f"; {cli.rounds} alternating rounds of {cli.calls} calls, medians", "",
             "int8 product, µs per call (same operator, same numbers):", "",
             "| tokens x in -> out | called from Python | through int8_product |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {n} | {a:.1f} | {b:.1f} |" for n, a, b in int8]
    lines += ["", f"Decoder self-attention's two batched products, µs per call (8 heads of 64, cycling over {LAYERS} layers' "
              "keys and values; same numbers):", "",
              "| keys | contiguous | step-major buffer view | rows-major buffer view |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {a:.1f} | {b:.1f} | {c:.1f} |" for n, a, b, c in attention]
    lines += ["", f"A beam reordering's copy of saved rows (kv_cache.move_rows), µs per call (8 heads of 64, cycling over "
              f"{LAYERS} layers' buffers; same bytes):", "",
              "| rows moved | float32 elements | 16-byte elements (move_rows) |", "|---|---:|---:|"]
    lines += [f"| {n} | {a:.1f} | {b:.1f} |" for n, a, b in reorder]
    text = "\n".join(lines) + "\n"
    print(text)
    if not cli.no_record:
        record(text, cli.results)
        log(f"added to {cli.results}")


if __name__ == "__main__":
    main()
