#!/usr/bin/env python
"""Speed and memory of ``transformer_b2t`` (``--connection b2t``) against fairseq's stock ``transformer``.

Both models are built through fairseq's own API (``options.get_training_parser`` +
``parse_args_and_arch``, a ``TranslationTask`` over a synthetic ``Dictionary``, ``task.build_model``) with
identical sizes, so the only difference is the residual wiring of each layer. Measured, in one process:

* training throughput: forward + backward + ``torch.optim.Adam`` step of fairseq's label-smoothed
  cross-entropy (eps 0.1) on synthetic batches with a fixed number of target tokens (no padding). Reported as
  target tokens per second, median over ``--repeats`` rounds;
* peak training memory of one such step, after warm-up (Adam state allocated, gradients set to None):
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
  - CPU: every allocation and free of PyTorch's CPU allocator during the step is recorded with
    ``torch.profiler`` (``profile_memory=True``, raw allocator events); the running sum gives the peak of
    bytes allocated during the step, to which the bytes already live (parameters + Adam state) are added.
    This is the CPU analogue of ``max_memory_allocated``: exact tensor bytes, independent of glibc's
    malloc caching and of the other model living in the same process. (If that profiler API is missing,
    the script falls back to the process's peak-RSS delta, VmHWM after ``/proc/self/clear_refs``, and says so.)
* generation throughput: ``fairseq.sequence_generator.SequenceGenerator``, beam 4, eval mode, no_grad,
  on synthetic source batches. Random-weight models would stop at different lengths, so the work is FORCED
  to be equal: ``max_len_a=0, max_len_b=L, min_len=L`` makes every hypothesis exactly L tokens + EOS
  (L+1 decoder steps); the script checks this on every batch. Reported as source sentences per second.

Timed work ALTERNATES between the models (round r: A, B[, C ...]; round r+1: A, B ...), so drift in machine
speed (other jobs, thermal or VM-neighbour noise) hits all models alike. Ratios are computed per round
(B_r / A_r) and summarised by their median and min-max; the min-max of each model's own rounds shows the noise.
For every timed round the share of the machine's CPU used by OTHER processes is read from /proc/stat; the
ratios are also reported over the "quiet" rounds (others < 10%), since OpenMP threads slow down several times
as soon as another process holds one of the cores.

Threads: ``torch.set_num_threads(--threads)``, default = number of usable CPU cores.

Run ``python benchmarks/bench_b2t_vs_transformer.py --help``; see benchmarks/README.md.
"""
import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BASELINE = "transformer"
QUIET = 0.10  # a round is "quiet" when other processes used < 10% of the machine's CPU time during it
MiB = 2**20


def parse_cli(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("model size (both models get the same)")
    g.add_argument("--layers", type=int, default=6, help="encoder and decoder layers")
    g.add_argument("--embed-dim", type=int, default=256)
    g.add_argument("--ffn-dim", type=int, default=1024)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--vocab", type=int, default=8000, help="synthetic shared vocabulary size, specials included")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument(
        "--also-connections",
        default="",
        help="comma list of extra transformer_b2t connections to time, e.g. post-ln,pre-ln "
        "(post-ln through our code isolates the cost of our layer code from the cost of the B2T addition)",
    )
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--fp16", action="store_true", help="torch.autocast float16 (+GradScaler); cuda only")
    g.add_argument("--bf16", action="store_true", help="torch.autocast bfloat16; cuda only")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: usable CPU cores")
    g = p.add_argument_group("training measurement")
    g.add_argument("--batch-tokens", type=int, default=2048, help="target tokens per training batch")
    g.add_argument("--src-len", type=int, default=32, help="source length (tokens, EOS included)")
    g.add_argument("--tgt-len", type=int, default=32, help="target length; sentences = batch-tokens // tgt-len")
    g.add_argument("--repeats", type=int, default=15, help="alternating rounds for training and for generation")
    g.add_argument("--steps-per-repeat", type=int, default=1, help="training steps timed together per round")
    g.add_argument("--warmup", type=int, default=2, help="untimed training steps / generation batches per model")
    g = p.add_argument_group("generation measurement")
    g.add_argument("--int8", choices=["none", "decoder", "all"], default="decoder",
                   help="CPU: also time the b2t model's generation with --int8-decoding of this scope (a "
                   "generation-only row: same weights as the b2t row, quantized after its training rounds)")
    g.add_argument("--unpacked-row", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: also time the b2t model's generation with exact mode's packed Linear layers switched "
                   "off (B2T_PACKED_LINEARS=0; a generation-only row), which separates their gain from the rest")
    g.add_argument("--beam", type=int, default=4)
    g.add_argument("--gen-len", type=int, default=30, help="L: every hypothesis is forced to L tokens + EOS")
    g.add_argument("--gen-batch", type=int, default=16, help="source sentences per generation batch")
    g.add_argument("--gen-src-len", type=int, default=24)
    g.add_argument("--gen-batches-per-repeat", type=int, default=2)
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write all numbers (raw per-round values too) as JSON")
    g.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="Markdown log to append to")
    g.add_argument("--no-record", action="store_true", help="do not append to --results")
    g.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.fp16 and args.bf16:
        p.error("choose one of --fp16 and --bf16")
    if args.device != "cpu":
        args.int8 = "none"  # torch's dynamic int8 kernels are CPU kernels
        args.unpacked_row = False  # the packed kernels are CPU kernels too
    if (args.fp16 or args.bf16) and args.device != "cuda":
        p.error("--fp16/--bf16 are autocast modes for --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.batch_tokens < args.tgt_len:
        p.error("--batch-tokens must be at least --tgt-len")
    args.also_connections = [c for c in args.also_connections.split(",") if c]
    return args


# ----------------------------------------------------------------------------------------------- models


def fairseq_args(cli, arch, extra):
    from fairseq import options

    n, d, f, h = str(cli.layers), str(cli.embed_dim), str(cli.ffn_dim), str(cli.heads)
    argv = [
        "/nonexistent-data-dir",  # TranslationTask's positional data dir; never read
        "--task", "translation", "--arch", arch, "--share-all-embeddings",
        "--encoder-layers", n, "--decoder-layers", n,
        "--encoder-embed-dim", d, "--decoder-embed-dim", d,
        "--encoder-ffn-embed-dim", f, "--decoder-ffn-embed-dim", f,
        "--encoder-attention-heads", h, "--decoder-attention-heads", h,
        "--dropout", str(cli.dropout),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--seed", str(cli.seed),
    ] + (["--cpu"] if cli.device == "cpu" else []) + extra  # fmt: skip
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def model_specs(cli):
    specs = [
        (BASELINE, "transformer_wmt_en_de", []),
        ("b2t", "transformer_b2t_wmt_en_de", ["--connection", "b2t"]),
    ]
    for conn in cli.also_connections:
        specs.append((f"b2t-code {conn}", "transformer_b2t_wmt_en_de", ["--connection", conn]))
    return specs


class Bench:
    """One model with its task, criterion and optimizer."""

    def __init__(self, cli, name, arch, extra, dictionary, device):
        from fairseq.tasks.translation import TranslationTask

        self.name, self.arch, self.extra = name, arch, extra
        self.fs_args = fairseq_args(cli, arch, extra)
        self.task = TranslationTask(self.fs_args, dictionary, dictionary)
        torch.manual_seed(cli.seed)
        self.model = self.task.build_model(self.fs_args).to(device)
        self.criterion = self.task.build_criterion(self.fs_args).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.device = device
        self.dtype = torch.float16 if cli.fp16 else torch.bfloat16 if cli.bf16 else None
        self.scaler = torch.amp.GradScaler("cuda") if cli.fp16 else None
        self.generator = None
        self.gen_only = False
        self.packed = True  # False: generate with B2T_PACKED_LINEARS=0

    def prepare_for_generation(self, cli):
        """After the training rounds: the model as fairseq-generate prepares it (``prepare_for_inference_``:
        fairseq's make_generation_fast_; for our models also --int8-decoding and the packed CPU Linear layers)."""
        from types import SimpleNamespace

        self.optimizer.zero_grad(set_to_none=True)
        self.model.prepare_for_inference_(SimpleNamespace(generation=SimpleNamespace(beam=cli.beam)))

    def generation_copy(self, suffix, extra, int8="none", packed=True):
        """A generation-only copy of this (not yet prepared) model, named ``<name> <suffix>``, with
        --int8-decoding ``int8`` and, unless ``packed``, B2T_PACKED_LINEARS=0 while it generates."""
        import copy

        other = copy.copy(self)
        other.name, other.extra, other.gen_only, other.generator = f"{self.name} {suffix}", [*self.extra, *extra], True, None
        other.model = copy.deepcopy(self.model)
        other.model.b2t_int8_decoding = int8
        other.packed = packed
        return other

    def autocast(self):
        if self.dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, sample):
        self.model.train()
        with self.autocast():
            loss, sample_size, _ = self.criterion(self.model, sample)
            loss = loss / sample_size
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def generate(self, sample, cli):
        from fairseq.sequence_generator import SequenceGenerator

        self.model.eval()
        if self.generator is None:
            L = cli.gen_len
            self.generator = SequenceGenerator(
                [self.model], self.task.target_dictionary, beam_size=cli.beam, max_len_a=0, max_len_b=L, min_len=L
            )
        with torch.no_grad(), self.autocast(), packed_linears(self.packed):
            hypos = self.generator.generate([self.model], sample)
        lengths = {len(h["tokens"]) for sent in hypos for h in sent}
        if lengths != {cli.gen_len + 1} or len(hypos) != sample["nsentences"]:
            raise RuntimeError(f"{self.name}: expected every hypothesis to have {cli.gen_len}+EOS tokens, got {lengths}")
        return hypos


@contextlib.contextmanager
def packed_linears(on):
    """B2T_PACKED_LINEARS as ``on`` says, for the duration (packed_linear.py reads it at every call)."""
    before = os.environ.get("B2T_PACKED_LINEARS")
    os.environ["B2T_PACKED_LINEARS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["B2T_PACKED_LINEARS"]
        else:
            os.environ["B2T_PACKED_LINEARS"] = before


def synthetic_batches(cli, dictionary, device, count=4):
    g = torch.Generator().manual_seed(cli.seed + 1)
    lo, hi, eos = dictionary.nspecial, len(dictionary), dictionary.eos()

    def tokens(n, length):
        t = torch.randint(lo, hi, (n, length), generator=g)
        t[:, -1] = eos
        return t

    train, gen = [], []
    bsz = cli.batch_tokens // cli.tgt_len
    for _ in range(count):
        src, tgt = tokens(bsz, cli.src_len), tokens(bsz, cli.tgt_len)
        prev = torch.cat([torch.full((bsz, 1), eos), tgt[:, :-1]], dim=1)
        sample = {
            "id": torch.arange(bsz),
            "net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), cli.src_len), "prev_output_tokens": prev},
            "target": tgt,
            "ntokens": bsz * cli.tgt_len,
            "nsentences": bsz,
        }
        train.append(to_device(sample, device))
        src = tokens(cli.gen_batch, cli.gen_src_len)
        sample = {
            "id": torch.arange(cli.gen_batch),
            "net_input": {"src_tokens": src, "src_lengths": torch.full((cli.gen_batch,), cli.gen_src_len)},
            "nsentences": cli.gen_batch,
        }
        gen.append(to_device(sample, device))
    return train, gen


def to_device(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- memory


def live_tensor_bytes(bench):
    """Bytes of the distinct storages of parameters, gradients and optimizer state."""
    seen, total = set(), 0
    tensors = list(bench.model.parameters()) + [p.grad for p in bench.model.parameters()]
    for state in bench.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        if t is None or t.device.type != bench.device.type:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _read_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++-level stderr (kineto prints profiler_start/stop lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_train_memory(bench, sample):
    """Peak bytes during one training step (after warm-up). Returns (bytes, method, details)."""
    bench.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if bench.device.type == "cuda":
        sync(bench.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
        bench.train_step(sample)
        sync(bench.device)
        return torch.cuda.max_memory_allocated(bench.device), "torch.cuda.max_memory_allocated", {}

    static = live_tensor_bytes(bench)
    try:
        from torch.profiler import ProfilerActivity, profile

        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            bench.train_step(sample)
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        if not events:
            raise RuntimeError("profiler recorded no allocator events")
    except Exception as exc:  # private profiler API moved: fall back to the peak-RSS delta
        logging.getLogger(__name__).warning("profiler memory failed (%s); falling back to peak RSS", exc)
        bench.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _read_status_kib("VmRSS")
        bench.train_step(sample)
        peak = _read_status_kib("VmHWM")
        return static + (peak - before) * 1024, "peak RSS delta (VmHWM after clear_refs) + live tensors", {}
    events.sort()
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    details = {"static_bytes": static, "step_peak_delta_bytes": peak, "step_end_delta_bytes": running}
    return static + peak, "torch.profiler allocator events (peak during step) + live params/Adam state", details


# ----------------------------------------------------------------------------------------------- stats


def summary(values):
    """Median, min, max, quartiles and coefficient of variation; ``per_round`` keeps the values in round order."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(values) >= 2 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q[0],
        "q3": q[2],
        "cv": statistics.stdev(values) / statistics.mean(values) if len(values) >= 2 else 0.0,
        "per_round": list(values),
    }


def ratio_summary(ratios, resamples=2000):
    """summary() plus the geometric mean and its 95% bootstrap interval (fixed seed, so reruns are comparable).
    An interval that contains 1 means the rounds cannot tell the models apart."""
    import random

    out = summary(ratios)
    out["geomean"] = statistics.geometric_mean(ratios)
    rng = random.Random(0)
    boot = sorted(statistics.geometric_mean(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    out["geomean_ci95"] = [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]]
    return out


# ----------------------------------------------------------------------------------------------- environment


def git_commit():
    """Short HEAD commit, read from .git directly (no git process); `git rev-parse` as a fallback."""
    try:
        git = REPO / ".git"
        if git.is_file():  # worktree: "gitdir: PATH"
            git = (REPO / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7]
        ref = head.split(None, 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:7]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:7]
    except OSError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(cli, device):
    import fairseq

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": f"{cpu_model()}, {usable_cores()} usable cores",
        "torch": torch.__version__,
        "fairseq": getattr(fairseq, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["precision"] = "fp16 autocast" if cli.fp16 else "bf16 autocast" if cli.bf16 else "fp32"
    else:
        env["precision"] = "fp32"
    return env


# ----------------------------------------------------------------------------------------------- main


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def machine_busy_s():
    """Non-idle CPU seconds of the whole machine so far (all CPUs, steal included), from /proc/stat; or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_cpu_share(wall, own_cpu, busy_before, busy_after):
    """Fraction of the machine's CPU capacity that other processes (or the hypervisor: steal) used during an
    interval of ``wall`` seconds in which this process used ``own_cpu`` CPU seconds."""
    if busy_before is None or busy_after is None or wall <= 0:
        return None
    share = (busy_after - busy_before - own_cpu) / (wall * (os.cpu_count() or 1))
    return round(min(max(share, 0.0), 1.0), 3)


def fmt_share(x):
    return "n/a" if x is None else f"{x:.0%}"


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(cli):
    t_start, cpu_start, load_start, busy_start = time.perf_counter(), time.process_time(), load_average(), machine_busy_s()
    torch.set_num_threads(cli.threads or usable_cores())
    device = torch.device(cli.device)

    import b2t_fairseq  # noqa: F401  (registers transformer_b2t)
    from fairseq.data import Dictionary

    for name in ("fairseq", "b2t_fairseq", "root"):
        logging.getLogger(None if name == "root" else name).setLevel(logging.WARNING)

    dictionary = Dictionary()
    for i in range(cli.vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")

    benches = [Bench(cli, *spec, dictionary, device) for spec in model_specs(cli)]
    if benches[0].params != benches[1].params:  # (pre-ln legitimately has one extra final LayerNorm per stack)
        log("WARNING: the models have different parameter counts: " + ", ".join(f"{b.name}={b.params}" for b in benches))
    train_batches, gen_batches = synthetic_batches(cli, dictionary, device)
    bsz = cli.batch_tokens // cli.tgt_len
    tgt_tokens = bsz * cli.tgt_len
    log(
        f"{len(benches)} models, {benches[0].params / 1e6:.1f}M params each; train batch {bsz}x{cli.tgt_len} "
        f"target tokens; {torch.get_num_threads()} threads on {device}"
    )

    # warm-up (also allocates Adam state), then one profiled step per model for memory
    for b in benches:
        for i in range(cli.warmup):
            b.train_step(train_batches[i % len(train_batches)])
        sync(device)
    memory = {}
    for b in benches:
        nbytes, method, details = peak_train_memory(b, train_batches[0])
        memory[b.name] = {"peak_bytes": nbytes, "method": method, **details}
        log(f"  peak training memory {b.name}: {nbytes / MiB:.1f} MiB")

    def alternate(kind, work, units, fmt, benches):
        """Alternating rounds: every round times ``work(bench, round)`` once per model, in a fixed order.
        Also records, per timing, the share of the machine's CPU time that OTHER processes used (see
        other_cpu_share): with OpenMP threads, even a little contention can slow a step down several times."""
        rates, other = {b.name: [] for b in benches}, {b.name: [] for b in benches}
        for r in range(cli.repeats):
            for b in benches:
                sync(device)
                t0, c0, m0 = time.perf_counter(), time.process_time(), machine_busy_s()
                work(b, r)
                sync(device)
                wall = time.perf_counter() - t0
                rates[b.name].append(units / wall)
                other[b.name].append(other_cpu_share(wall, time.process_time() - c0, m0, machine_busy_s()))
            log(
                f"  {kind} round {r + 1}/{cli.repeats}: "
                + ", ".join(f"{n} {rates[n][-1]:{fmt}} (others' CPU {fmt_share(other[n][-1])})" for n in rates)
            )
        return rates, other

    def train_work(b, r):
        for k in range(cli.steps_per_repeat):
            b.train_step(train_batches[(r * cli.steps_per_repeat + k) % len(train_batches)])

    def gen_work(b, r):
        for k in range(cli.gen_batches_per_repeat):
            b.generate(gen_batches[(r * cli.gen_batches_per_repeat + k) % len(gen_batches)], cli)

    train_rates, train_cpu = alternate("train", train_work, cli.steps_per_repeat * tgt_tokens, ".0f", benches)
    # generation-only rows: the b2t row's weights as trained above
    if cli.unpacked_row:
        benches.append(benches[1].generation_copy("unpacked", ["B2T_PACKED_LINEARS=0"], packed=False))
    if cli.int8 != "none":
        benches.append(benches[1].generation_copy("int8", ["--int8-decoding", cli.int8], int8=cli.int8))
    for b in benches:  # generation warm-up
        b.prepare_for_generation(cli)
        for i in range(cli.warmup):
            b.generate(gen_batches[i % len(gen_batches)], cli)
    gen_rates, gen_cpu = alternate("gen", gen_work, cli.gen_batches_per_repeat * cli.gen_batch, ".2f", benches)

    def clean_rounds(other):
        """Rounds in which other processes used < QUIET of the machine's CPU time while each model ran."""
        if any(x is None for v in other.values() for x in v):
            return None  # no /proc/stat
        return [r for r in range(cli.repeats) if all(other[n][r] < QUIET for n in other)]

    clean = {"train": clean_rounds(train_cpu), "gen": clean_rounds(gen_cpu)}

    def ratios(rates, rounds, name):
        return [rates[name][r] / rates[BASELINE][r] for r in rounds]

    base_mem = memory[BASELINE]["peak_bytes"]
    results = []
    for b in benches:
        trained = not b.gen_only
        results.append(
            {
                "model": b.name,
                "arch": b.arch,
                "extra_args": b.extra,
                "params": b.params,
                "train_tgt_tokens_per_s": summary(train_rates[b.name]) if trained else None,
                "train_ratio_per_round": summary([x / y for x, y in zip(train_rates[b.name], train_rates[BASELINE])])
                if trained
                else None,
                "peak_train_memory": memory[b.name] if trained else None,
                "peak_train_memory_ratio": memory[b.name]["peak_bytes"] / base_mem if trained else None,
                "gen_sentences_per_s": summary(gen_rates[b.name]),
                "gen_ratio_per_round": summary([x / y for x, y in zip(gen_rates[b.name], gen_rates[BASELINE])]),
                "train_ratio_clean_rounds": ratio_summary(ratios(train_rates, clean["train"], b.name))
                if clean["train"] and trained
                else None,
                "gen_ratio_clean_rounds": ratio_summary(ratios(gen_rates, clean["gen"], b.name)) if clean["gen"] else None,
                "train_others_cpu_share_per_round": train_cpu[b.name] if trained else None,
                "gen_others_cpu_share_per_round": gen_cpu[b.name],
            }
        )
    config = {k: v for k, v in vars(cli).items() if k not in ("json", "results", "no_record")}
    config.update(train_sentences_per_batch=bsz, train_tgt_tokens_per_batch=tgt_tokens)
    runtime = time.perf_counter() - t_start
    env = environment(cli, device)
    # contention indicators: other processes on the machine inflate the spread of the rounds
    env["load_average_1min"] = [round(load_start, 2), round(load_average(), 2)]
    env["process_cpu_per_wall"] = round((time.process_time() - cpu_start) / runtime, 2)
    env["others_cpu_share"] = other_cpu_share(runtime, time.process_time() - cpu_start, busy_start, machine_busy_s())
    return {"environment": env, "config": config, "results": results, "runtime_s": runtime, "clean_rounds": clean}


def markdown_table(report):
    cfg = report["config"]
    head = (
        "| model | params | train tgt tok/s (median) | own min–max | ×transformer per round: median [min–max] "
        "| peak train MiB | ×transformer | gen sent/s (median) | own min–max | ×transformer per round: median [min–max] |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for r in report["results"]:
        t, tr, g, gr = r["train_tgt_tokens_per_s"], r["train_ratio_per_round"], r["gen_sentences_per_s"], r["gen_ratio_per_round"]
        base = r["model"] == BASELINE
        if t is None:  # a generation-only row (unpacked, int8)
            train_cells = "— | — | — | — | —"
        else:
            train_cells = (
                f"{t['median']:.0f} | {t['min']:.0f}–{t['max']:.0f} | "
                + ("1" if base else f"**{tr['median']:.3f}** [{tr['min']:.3f}–{tr['max']:.3f}]")
                + f" | {r['peak_train_memory']['peak_bytes'] / MiB:.1f} | "
                + ("1" if base else f"**{r['peak_train_memory_ratio']:.3f}**")
            )
        rows.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {train_cells}"
            + f" | {g['median']:.2f} | {g['min']:.2f}–{g['max']:.2f} | "
            + ("1" if base else f"**{gr['median']:.3f}** [{gr['min']:.3f}–{gr['max']:.3f}]")
            + " |"
        )
    setup = (
        f"{cfg['layers']}L-{cfg['layers']}L, embed {cfg['embed_dim']}, ffn {cfg['ffn_dim']}, {cfg['heads']} heads, "
        f"vocab {cfg['vocab']} shared, dropout {cfg['dropout']}; train: {cfg['train_sentences_per_batch']}x"
        f"{cfg['tgt_len']} target tokens (src len {cfg['src_len']}), label-smoothed CE + Adam, "
        f"{cfg['repeats']} alternating rounds of {cfg['steps_per_repeat']} step(s) after {cfg['warmup']} warm-up; "
        f"generation: beam {cfg['beam']}, batches of {cfg['gen_batch']} sources of length {cfg['gen_src_len']}, "
        f"forced to exactly {cfg['gen_len']} tokens + EOS, {cfg['repeats']} rounds of {cfg['gen_batches_per_repeat']} batches."
    )
    notes = []
    clean = report.get("clean_rounds") or {}
    for phase, key, label in (("train", "train_ratio_clean_rounds", "training"), ("gen", "gen_ratio_clean_rounds", "generation")):
        if clean.get(phase) is None:
            continue
        parts = []
        for r in report["results"]:
            if r["model"] != BASELINE and r[key]:
                c = r[key]
                parts.append(
                    f"{r['model']} median {c['median']:.3f} [{c['min']:.3f}–{c['max']:.3f}], geometric mean "
                    f"{c['geomean']:.3f} (95% bootstrap CI {c['geomean_ci95'][0]:.3f}–{c['geomean_ci95'][1]:.3f})"
                )
        notes.append(
            f"{label}: {len(clean[phase])}/{cfg['repeats']} rounds quiet (other processes < {QUIET:.0%} of the "
            f"machine's CPU for every model)" + (f"; ×transformer over those: {', '.join(parts)}" if parts else "")
        )
    if notes:
        setup += "\nContention check: " + "; ".join(notes) + "."
    return head + "\n" + "\n".join(rows) + "\n\n" + setup + "\n"


RESULTS_INTRO = """# B2T vs. fairseq Transformer: speed and memory

Recorded by `benchmarks/bench_b2t_vs_transformer.py` (see `benchmarks/README.md`). Each run compares
`transformer_b2t --connection b2t` with fairseq's stock `transformer` at the same size, in one process:

- **train tgt tok/s**: forward + backward + Adam step of label-smoothed cross-entropy on synthetic batches
  with a fixed number of target tokens; median over alternating rounds (A B A B ...), after warm-up.
- **peak train MiB**: one training step after warm-up. CUDA: `torch.cuda.max_memory_allocated`. CPU: peak of
  PyTorch allocator bytes during the step (from `torch.profiler` allocator events) plus the bytes already
  live (parameters + Adam state), i.e. the CPU analogue of `max_memory_allocated`.
- **gen sent/s**: `SequenceGenerator`, beam 4, eval/no_grad; every hypothesis is forced to exactly L tokens +
  EOS (`max_len_a=0, max_len_b=L, min_len=L`) so both models do identical work whatever their random weights.
- **b2t unpacked**: the b2t row's model, prepared the same way, generating with `B2T_PACKED_LINEARS=0` (exact
  mode without its packed Linear layers, `b2t_fairseq/fast_paths/packed_linear.py`): generation only. b2t / b2t unpacked is
  what the packing gives; b2t unpacked / transformer is what the rest of our decoding path gives.
- **b2t int8**: the b2t row's model after its training rounds, with `--int8-decoding` (dynamic int8 Linear
  layers, `b2t_fairseq/fast_paths/int8.py`) applied as fairseq-generate applies it: generation only. Its hypotheses differ
  from the float model's (random weights make the forced-length work identical anyway); the BLEU cost is
  measured on trained models by `experiments/int8_decoding.py`.
- **×transformer**: ratio to the stock model, computed per round and summarised as median [min–max];
  "own min–max" is a model's spread over its rounds, i.e. the noise level of the machine.
- **Contention check**: for every timed round the script reads `/proc/stat` and computes how much of the
  machine's CPU time other processes used; rounds where that stayed under 10% for every model are "quiet",
  and the ratios are repeated over the quiet rounds only, with their geometric mean and its 95% bootstrap
  interval (an interval containing 1 means the rounds cannot tell the models apart). Threads default to
  all cores, and OpenMP threads collapse when another process holds a core (a step can get 5-10x slower),
  so rounds run under contention measure the machine, not the model.

Expectation: B2T adds one tensor addition per layer (the layer input, added before the last layer norm) and
no parameters, so throughput ratios should be ≥ 0.97 and memory about equal. Ratios within the spread of
the rounds are noise, not a difference.
"""


def record(report, path):
    path = Path(path)
    env = report["environment"]
    lines = [
        f"\n## {env['date']} — commit {env['commit']}\n",
        f"- machine: {env['cpu']}" + (f"; GPU {env['gpu']}" if "gpu" in env else ""),
        f"- torch {env['torch']}, fairseq {env['fairseq']}, Python {env['python']}; {env['threads']} torch threads; "
        f"device {report['config']['device']}, {env['precision']}",
        f"- command: `{env['command']}`",
        f"- runtime: {report['runtime_s']:.0f} s; 1-min load average at start/end "
        f"{env['load_average_1min'][0]}/{env['load_average_1min'][1]} on {usable_cores()} cores; "
        f"this process used {env['process_cpu_per_wall']} CPU-s per wall-s, other processes "
        f"{fmt_share(env['others_cpu_share'])} of the machine's CPU time",
        "",
        markdown_table(report),
    ]
    new = not path.exists() or not path.read_text().strip()
    with open(path, "a") as f:
        if new:
            f.write(RESULTS_INTRO)
        f.write("\n".join(lines))


def main(argv=None):
    cli = parse_cli(argv)
    report = run(cli)
    print(markdown_table(report))
    print(f"runtime {report['runtime_s']:.0f} s; memory method: {report['results'][0]['peak_train_memory']['method']}")
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(report, f, indent=2)
    if not cli.no_record:
        record(report, cli.results)
        log(f"appended to {cli.results}")


if __name__ == "__main__":
    main()
