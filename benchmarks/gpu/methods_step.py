"""Training steps of every method of the plugin in fp16 and bf16 (torch.autocast) on one device: does each method
train in half precision, at what speed and peak memory? Part of benchmarks/gpu/run.sh; --device cpu --smoke
checks the script itself on a machine without a GPU (fp32 only there).

Prints one JSON line per (method, precision): finite losses, target tokens/s over the timed steps, peak memory.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=6, help="timed steps after 2 warm-up steps")
    p.add_argument("--smoke", action="store_true", help="tiny model, fp32 only: check the script on a CPU")
    args = p.parse_args(argv)

    import bench_b2t_vs_transformer as bench

    import b2t_fairseq  # noqa: F401
    from b2t_fairseq.modules import CONNECTIONS
    from fairseq.data import Dictionary

    size = (["--embed-dim", "32", "--ffn-dim", "64", "--heads", "2", "--vocab", "200", "--batch-tokens", "256"]
            if args.smoke else ["--embed-dim", "512", "--ffn-dim", "2048", "--heads", "8", "--vocab", "32000",
                                "--batch-tokens", "8192"])  # fmt: skip
    precisions = ["fp32"] if args.smoke else ["fp16", "bf16"]
    device = torch.device(args.device)
    for precision in precisions:
        flags = [] if precision == "fp32" else [f"--{precision}"]
        cli = bench.parse_cli(["--device", args.device, "--layers", str(args.layers), *size, *flags])
        dictionary = Dictionary()
        for i in range(cli.vocab - len(dictionary)):
            dictionary.add_symbol(f"w{i}")
        train_batches, _ = bench.synthetic_batches(cli, dictionary, device)
        for method in ["transformer (stock)", *CONNECTIONS]:
            arch, extra = (("transformer_wmt_en_de", []) if method.startswith("transformer")
                           else ("transformer_b2t_wmt_en_de", ["--connection", method]))  # fmt: skip
            record = {"method": method, "precision": precision, "layers": args.layers, "device": str(device)}
            try:
                b = bench.Bench(cli, method, arch, extra, dictionary, device)
                losses = [float(b.train_step(train_batches[i % len(train_batches)])) for i in range(2)]
                bench.sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for i in range(args.steps):
                    losses.append(float(b.train_step(train_batches[i % len(train_batches)])))
                bench.sync(device)
                wall = time.perf_counter() - t0
                tokens = args.steps * (cli.batch_tokens // cli.tgt_len) * cli.tgt_len
                record.update(
                    finite=all(torch.isfinite(torch.tensor(losses)).tolist()), first_loss=losses[0],
                    last_loss=losses[-1], tgt_tokens_per_s=round(tokens / wall),
                    peak_mib=round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
                )  # fmt: skip
                del b
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # a method that fails in one precision must not hide the others
                record.update(finite=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
