#!/usr/bin/env python
"""CPU decoding speed: our fast paths against stock fairseq and CTranslate2, on identical weights and work.

One stock ``transformer`` is built through fairseq's API (seeded random weights, a synthetic shared vocabulary);
its state dict is loaded, unchanged, into our ``transformer_b2t`` as ``--connection post-ln`` (the same function:
its exact decoding must give the stock model's tokens, which the script checks) and as ``--connection b2t``
(another function of the same weights), and converted with CTranslate2's own fairseq converter. Every engine
then decodes the same source batches with beam search, every hypothesis forced to exactly L tokens + EOS (L+1
decoder steps; fairseq: ``min_len = max_len_b = L``, CTranslate2: ``min_decoding_length =
max_decoding_length = L + 1``, no end token); the script checks every hypothesis's length, so a row can only
be faster by doing the same work faster.

Rows: ``fairseq transformer`` (stock, prepared as fairseq-generate prepares it), ``ours <connection> exact`` (our
inference preparation: oneDNN-packed float32 Linear layers), ``ours b2t int8 <mode>`` (``--int8-decoding <mode>``),
``ctranslate2 float32`` and ``ctranslate2 int8`` (``compute_type``), and with ``--ctranslate2-threads`` CTranslate2
int8 at other thread counts (on this project's 2-core VM it decoded slower at two threads than at one). Engines
alternate within each round (A B C ... A B C ..., with ``--pause`` seconds between engines), ratios to the stock row
and to CTranslate2's int8 row are taken per round and summarised as median [min–max]. CTranslate2 runs in worker
processes of its own: it ships its own OpenMP runtime, which beside torch's in one process slowed every torch engine
at two threads (see CTranslate2Engine).

CTranslate2 is a benchmark-only dependency: ``make bench-setup`` installs it into the venv with ``--no-deps``
(it imports only numpy and pyyaml, which fairseq already needs); never ``make setup`` or ``make test``. Without
it the CTranslate2 rows are left out and the output says so.

    .venv/bin/python benchmarks/bench_cpu_decoding.py                       # 6L d512, beams 4 and 1
    .venv/bin/python benchmarks/bench_cpu_decoding.py --layers 18 --rounds 3
"""
import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from bench_b2t_vs_transformer import (  # noqa: E402
    QUIET, cpu_model, git_commit, load_average, log, machine_busy_s, other_cpu_share, summary, usable_cores,
)  # fmt: skip

BASELINE = "fairseq transformer"
REFERENCE = "ctranslate2 int8"  # the bar: each engine's sentences/s over this row's, paired per round


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    g = p.add_argument_group("model (every engine decodes the same weights)")
    g.add_argument("--layers", type=int, default=6, help="encoder and decoder layers (18: the 18L preset's depth)")
    g.add_argument("--embed-dim", type=int, default=512)
    g.add_argument("--ffn-dim", type=int, default=2048)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--vocab", type=int, default=8000, help="synthetic shared vocabulary, specials included")
    g.add_argument("--seed", type=int, default=1)
    g = p.add_argument_group("work")
    g.add_argument("--beams", type=int, nargs="+", default=[4, 1], help="beam sizes, each measured in its own rounds")
    g.add_argument("--gen-len", type=int, default=30, help="L: every hypothesis is forced to L tokens + EOS")
    g.add_argument("--batch", type=int, default=16, help="source sentences per batch")
    g.add_argument("--src-len", type=int, default=24, help="source length (tokens, EOS included)")
    g.add_argument("--batches-per-round", type=int, default=2)
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--warmup", type=int, default=1, help="untimed batches per engine and beam")
    g.add_argument("--threads", type=int, default=None, help="torch and CTranslate2 threads; default usable cores")
    g.add_argument("--pause", type=float, default=0.3,
                   help="seconds between two engines' timed batches, untimed, so that one engine's idle threads "
                        "(OpenMP's spinning wait) are asleep when the next one starts")  # fmt: skip
    g.add_argument("--breakdown", action="store_true",
                   help="also split each fairseq engine's time per decoder step into encoder, decoder and the rest "
                        "(the search), in rounds of their own after the timed ones")  # fmt: skip
    g = p.add_argument_group("rows")
    g.add_argument("--connections", nargs="+", default=["post-ln", "b2t"], help="our exact rows")
    g.add_argument("--int8-modes", nargs="*", default=["decoder", "all"], help="--int8-decoding rows")
    g.add_argument("--int8-connections", nargs="+", default=["b2t"], help="the methods with --int8-decoding rows")
    g.add_argument("--ctranslate2", action=argparse.BooleanOptionalAction, default=None,
                   help="the CTranslate2 rows (default: when ctranslate2 imports)")  # fmt: skip
    g.add_argument("--ctranslate2-threads", type=int, nargs="+", default=[], metavar="N",
                   help="also a CTranslate2 int8 row at each of these thread counts (say 1, where it decodes faster "
                        "at one thread than at --threads); the × CTranslate2 int8 column stays the row at --threads")  # fmt: skip
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write every number (per-round values too) as JSON")
    g.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="Markdown log to add to")
    g.add_argument("--no-record", action="store_true", help="do not add the run to --results")
    args = p.parse_args(argv)
    # looked up, not imported: CTranslate2 runs in worker processes of its own (CTranslate2Engine)
    installed = importlib.util.find_spec("ctranslate2") is not None
    if args.ctranslate2 is None:
        args.ctranslate2 = installed
        if not installed:
            log("ctranslate2 is not installed (`make bench-setup` installs it): no CTranslate2 rows")
    elif args.ctranslate2 and not installed:
        p.error("--ctranslate2: ctranslate2 is not installed; run `make bench-setup` first")
    if args.ctranslate2_threads and not args.ctranslate2:
        p.error("--ctranslate2-threads: there are no CTranslate2 rows in this run (ctranslate2 not installed, or "
                "--no-ctranslate2); run `make bench-setup` first, or leave the option out")  # fmt: skip
    if any(n < 1 for n in args.ctranslate2_threads):
        p.error(f"--ctranslate2-threads {args.ctranslate2_threads}: thread counts start at 1, e.g. "
                "--ctranslate2-threads 1")  # fmt: skip
    return args


# ----------------------------------------------------------------------------------------------- engines


def fairseq_args(cli, arch, extra):
    from fairseq import options

    n, d, f, h = str(cli.layers), str(cli.embed_dim), str(cli.ffn_dim), str(cli.heads)
    argv = ["/nonexistent-data-dir", "--task", "translation", "--arch", arch, "--share-all-embeddings",
            "--encoder-layers", n, "--decoder-layers", n, "--encoder-embed-dim", d, "--decoder-embed-dim", d,
            "--encoder-ffn-embed-dim", f, "--decoder-ffn-embed-dim", f, "--encoder-attention-heads", h,
            "--decoder-attention-heads", h, "--seed", str(cli.seed), "--cpu", *extra]  # fmt: skip
    return options.parse_args_and_arch(options.get_training_parser(), argv)


class FairseqEngine:
    """A fairseq model (stock or ours) decoding through fairseq's SequenceGenerator, prepared for inference as
    fairseq-generate prepares a loaded model."""

    def __init__(self, name, cli, arch, extra, dictionary, state=None, int8="none"):
        from fairseq.tasks.translation import TranslationTask

        self.name = name
        self.args = fairseq_args(cli, arch, extra)
        self.task = TranslationTask(self.args, dictionary, dictionary)
        torch.manual_seed(cli.seed)
        self.model = self.task.build_model(self.args)
        self.stock_weights = state is not None
        if state is not None:
            self.model.load_state_dict(state, strict=True)
        if int8 != "none":
            self.model.b2t_int8_decoding = int8
        self.model.eval()
        from types import SimpleNamespace

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice of quantize_per_channel
            self.model.prepare_for_inference_(SimpleNamespace(generation=SimpleNamespace(beam=max(cli.beams))))
        self.generators = {}
        self.gen_len = cli.gen_len

    def decode(self, batch, beam):
        from fairseq.sequence_generator import SequenceGenerator

        if beam not in self.generators:
            L = self.gen_len
            self.generators[beam] = SequenceGenerator([self.model], self.task.target_dictionary, beam_size=beam,
                                                      max_len_a=0, max_len_b=L, min_len=L)  # fmt: skip
        src = batch["tokens"]
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((len(src),), src.size(1))}}
        with torch.no_grad():
            hypos = self.generators[beam].generate([self.model], sample)
        lengths = {len(h["tokens"]) for sent in hypos for h in sent}
        if lengths != {self.gen_len + 1} or len(hypos) != len(src):
            raise RuntimeError(f"{self.name}: expected {self.gen_len} tokens + EOS per hypothesis, got {lengths}")
        return [sent[0]["tokens"][:-1].tolist() for sent in hypos]

    def parts(self, batch, beam):
        """Seconds for the encoder on ``batch`` and for the decoder alone over the L + 1 steps of a search of
        ``beam`` (its rows: beam copies of each sentence's encoder output, as fairseq's search makes them; forced
        random tokens, no reordering between steps; logits, not log-probabilities)."""
        model, src = self.model, batch["tokens"]
        rows = torch.arange(len(src)).repeat_interleave(beam)
        tokens = torch.randint(4, len(self.task.target_dictionary), (len(rows), self.gen_len + 1),
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        tokens[:, 0] = self.task.target_dictionary.eos()  # fairseq's first decoder input
        if hasattr(model, "set_beam_size"):
            model.set_beam_size(beam)
        with torch.no_grad():
            t0 = time.perf_counter()
            encoder_out = model.encoder.forward_torchscript({"src_tokens": src,
                                                             "src_lengths": torch.full((len(src),), src.size(1))})
            t1 = time.perf_counter()
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, rows)
            state = {}
            t2 = time.perf_counter()
            for step in range(self.gen_len + 1):
                model.decoder(tokens[:, : step + 1], encoder_out, incremental_state=state)
            t3 = time.perf_counter()
        return t1 - t0, t3 - t2


class CTranslate2Engine:
    """CTranslate2's Translator in a worker process of its own (``--ctranslate2-worker``), fed batches through a
    pipe. Not in this process: ctranslate2 ships its own OpenMP runtime (its own libgomp), and with two runtimes'
    thread pools in one process every torch engine ran slower at two threads, ours most (RESULTS.md, 2026-12-07:
    the two-thread 6L run of 06:43 UTC, CTranslate2 loaded beside torch, against the ``--no-ctranslate2`` run of
    07:02 UTC: ours int8 `all` at beam 4 17.0 and 30.2 sentences/s, stock 7.0 and 8.6). The caller's wall time is
    measured (the pipe's milliseconds included); the worker reports its CPU time, so that it is not counted as
    another process's."""

    def __init__(self, name, model_dir, compute_type, cli, dictionary, threads=None):
        self.name, self.dictionary, self.gen_len = name, dictionary, cli.gen_len
        self.child_cpu_s = 0.0
        threads = threads or cli.threads
        self.worker = subprocess.Popen(
            [sys.executable, __file__, "--ctranslate2-worker", str(model_dir), compute_type, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def _ask(self, request):
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the CTranslate2 worker exited (code {self.worker.poll()})")
        answer = json.loads(line)
        self.child_cpu_s += answer["cpu_s"]
        return answer

    def decode(self, batch, beam):
        steps = self.gen_len + 1  # fairseq's L tokens + EOS are L + 1 decoder steps
        out = self._ask({"symbols": batch["symbols"], "beam": beam, "steps": steps})["hypotheses"]
        lengths = {len(h) for h in out}
        if lengths != {steps} or len(out) != len(batch["symbols"]):
            raise RuntimeError(f"{self.name}: expected {steps} tokens per hypothesis, got {lengths}")
        return [[self.dictionary.index(s) for s in h[: self.gen_len]] for h in out]

    def close(self):
        self.worker.stdin.close()
        self.worker.wait(timeout=60)


def ctranslate2_worker(model_dir, compute_type, threads):
    """``--ctranslate2-worker``: translate the batches read from stdin (one JSON request per line), answering each
    with the hypotheses and the CPU seconds it took, until stdin closes."""
    import ctranslate2

    translator = ctranslate2.Translator(model_dir, device="cpu", compute_type=compute_type, inter_threads=1,
                                        intra_threads=int(threads))  # fmt: skip
    for line in sys.stdin:
        request = json.loads(line)
        c0 = time.process_time()
        results = translator.translate_batch(request["symbols"], beam_size=request["beam"], num_hypotheses=1,
                                             min_decoding_length=request["steps"],
                                             max_decoding_length=request["steps"], return_end_token=False)  # fmt: skip
        answer = {"hypotheses": [r.hypotheses[0] for r in results], "cpu_s": time.process_time() - c0}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def convert_for_ctranslate2(stock, dictionary, work):
    """The stock model as a fairseq checkpoint plus dictionaries, converted by CTranslate2's fairseq converter in a
    process of its own (float32 weights; the int8 row quantizes them when it loads, as CTranslate2 users do)."""
    data = work / "data"
    data.mkdir()
    for lang in ("src", "tgt"):
        dictionary.save(str(data / f"dict.{lang}.txt"))
    args = stock.args
    args.source_lang, args.target_lang = "src", "tgt"
    torch.save({"args": args, "model": stock.model.state_dict()}, work / "checkpoint.pt")
    out = work / "ct2"
    subprocess.run([sys.executable, __file__, "--ctranslate2-convert", str(work / "checkpoint.pt"), str(data), str(out)],
                   check=True)  # fmt: skip
    return out


def ctranslate2_convert(checkpoint, data, out):
    from ctranslate2.converters.fairseq import FairseqConverter

    converter = FairseqConverter(checkpoint, data, source_lang="src", target_lang="tgt",
                                 unsafe_deserialization=True)  # our own checkpoint, written by convert_for_ctranslate2
    converter.convert(out)


def state_for(connection, cli, dictionary, stock_state):
    """The stock weights for a method whose parameters are exactly the stock model's (post-ln, b2t, pre-ln's
    final norms aside); None (its own seeded initialization) for a method with other parameters (Admin's ω,
    DLCL's weights, extra norms): the work is the same, the weights cannot be."""
    from fairseq.tasks.translation import TranslationTask

    args = fairseq_args(cli, "transformer_b2t_wmt_en_de", ["--connection", connection])
    keys = TranslationTask(args, dictionary, dictionary).build_model(args).state_dict().keys()
    return stock_state if keys == stock_state.keys() else None


def make_batches(cli, dictionary, count):
    g = torch.Generator().manual_seed(cli.seed + 1)
    lo, hi = dictionary.nspecial, len(dictionary)
    batches = []
    for _ in range(count):
        tokens = torch.randint(lo, hi, (cli.batch, cli.src_len), generator=g)
        tokens[:, -1] = dictionary.eos()
        # CTranslate2's fairseq models add the source EOS themselves (add_source_eos)
        symbols = [[dictionary[i] for i in row[:-1].tolist()] for row in tokens]
        batches.append({"tokens": tokens, "symbols": symbols})
    return batches


# ----------------------------------------------------------------------------------------------- run


def run(cli):
    t_start, busy_start, cpu_start, load_start = time.perf_counter(), machine_busy_s(), time.process_time(), load_average()
    cli.threads = cli.threads or usable_cores()
    torch.set_num_threads(cli.threads)
    import b2t_fairseq  # noqa: F401  (registers transformer_b2t)
    from fairseq.data import Dictionary

    for name in ("fairseq", "b2t_fairseq", "root"):
        logging.getLogger(None if name == "root" else name).setLevel(logging.WARNING)
    dictionary = Dictionary()
    for i in range(cli.vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    batches = make_batches(cli, dictionary, max(cli.batches_per_round, cli.warmup) * 2)

    stock = FairseqEngine(BASELINE, cli, "transformer_wmt_en_de", [], dictionary)
    state = stock.model.state_dict()
    engines = [stock]
    for conn in cli.connections:
        engines.append(FairseqEngine(f"ours {conn} exact", cli, "transformer_b2t_wmt_en_de", ["--connection", conn],
                                     dictionary, state_for(conn, cli, dictionary, state)))  # fmt: skip
    for conn in cli.int8_connections:
        for mode in cli.int8_modes:
            engines.append(FairseqEngine(f"ours {conn} int8 {mode}", cli, "transformer_b2t_wmt_en_de",
                                         ["--connection", conn], dictionary, state_for(conn, cli, dictionary, state), int8=mode))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if cli.ctranslate2:
            model_dir = convert_for_ctranslate2(stock, dictionary, Path(tmp))
            for compute_type in ("float32", "int8"):
                engines.append(CTranslate2Engine(f"ctranslate2 {compute_type}", model_dir, compute_type, cli, dictionary))
            for n in sorted(set(cli.ctranslate2_threads) - {cli.threads}):
                engines.append(CTranslate2Engine(f"ctranslate2 int8, {n} thread{'s' * (n > 1)}", model_dir, "int8", cli,
                                                 dictionary, threads=n))  # fmt: skip
        log(f"{len(engines)} engines, {cli.layers}L-{cli.layers}L d{cli.embed_dim}, {cli.threads} threads")

        # the same function of the same weights must give the same tokens
        checks = {}
        first = {e.name: e.decode(batches[0], max(cli.beams)) for e in engines}
        for e in engines[1:]:
            same = sum(a == b for a, b in zip(first[e.name], first[BASELINE]))
            checks[e.name] = f"{same}/{len(first[BASELINE])}" if getattr(e, "stock_weights", True) else "own weights"
        if "ours post-ln exact" in checks and checks["ours post-ln exact"] != f"{cli.batch}/{cli.batch}":
            raise RuntimeError(f"ours post-ln exact decoded other tokens than stock fairseq: {checks}")
        if "ctranslate2 float32" in checks:
            log(f"first-batch hypotheses equal to stock fairseq's: {checks}")

        rates, breakdowns = {}, {}
        for beam in cli.beams:
            for e in engines:
                for i in range(cli.warmup):
                    e.decode(batches[i], beam)
            per = {e.name: [] for e in engines}
            others = {e.name: [] for e in engines}
            for r in range(cli.rounds):
                for e in engines:
                    time.sleep(cli.pause)
                    t0, c0, m0 = time.perf_counter(), _cpu_s(e), machine_busy_s()
                    for k in range(cli.batches_per_round):
                        e.decode(batches[(r * cli.batches_per_round + k) % len(batches)], beam)
                    wall = time.perf_counter() - t0
                    per[e.name].append(cli.batches_per_round * cli.batch / wall)
                    others[e.name].append(other_cpu_share(wall, _cpu_s(e) - c0, m0, machine_busy_s()))
                log(f"  beam {beam} round {r + 1}/{cli.rounds}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in per.items()))
            if cli.breakdown:
                breakdowns[beam] = breakdown(cli, engines, batches, beam, per)
            rates[beam] = {
                e.name: {"sentences_per_s": summary(per[e.name]),
                         "ratio_per_round": summary([x / y for x, y in zip(per[e.name], per[BASELINE])]),
                         "others_cpu_share_per_round": others[e.name]}
                for e in engines
            }  # fmt: skip
            if REFERENCE in per:
                for e in engines:
                    rates[beam][e.name]["vs_ctranslate2_int8_per_round"] = summary(
                        [x / y for x, y in zip(per[e.name], per[REFERENCE])])
            int8_rows = [n for n in per if n.startswith(REFERENCE)]
            if len(int8_rows) > 1:  # --ctranslate2-threads: also against CTranslate2 int8 at its fastest, per round
                fastest = [max(values) for values in zip(*(per[n] for n in int8_rows))]
                for e in engines:
                    rates[beam][e.name]["vs_fastest_ctranslate2_int8_per_round"] = summary(
                        [x / y for x, y in zip(per[e.name], fastest)])
        for e in engines:
            if hasattr(e, "close"):
                e.close()
    import fairseq

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
        "cpu": f"{cpu_model()}, {usable_cores()} usable cores", "torch": torch.__version__,
        "fairseq": getattr(fairseq, "__version__", "?"), "threads": cli.threads,
        "ctranslate2": importlib.metadata.version("ctranslate2") if cli.ctranslate2 else None,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "load_average_1min": [round(load_start, 2), round(load_average(), 2)],
    }  # fmt: skip
    runtime = time.perf_counter() - t_start
    children = os.times().children_user + os.times().children_system  # the CTranslate2 workers and converter, ended
    env["others_cpu_share"] = other_cpu_share(runtime, time.process_time() - cpu_start + children, busy_start,
                                              machine_busy_s())  # fmt: skip
    config = {k: v for k, v in vars(cli).items() if k not in ("json", "results", "no_record")}
    return {"environment": env, "config": config, "rates": rates, "same_tokens_as_stock": checks, "runtime_s": runtime,
            "breakdown_ms_per_step": breakdowns}


def _cpu_s(engine):
    """CPU seconds of this process, plus those an engine's worker process reported."""
    return time.process_time() + getattr(engine, "child_cpu_s", 0.0)


def breakdown(cli, engines, batches, beam, per):
    """Milliseconds per decoder step of each engine: in all (from the timed rounds' median), and for the fairseq
    engines the encoder (its one call per batch spread over the steps), the decoder alone (``FairseqEngine.parts``)
    and the rest: the search (log-probabilities, beam selection, bookkeeping: fairseq's loop for the stock model,
    ours, fast_paths/search.py, for our models) and the reordering of the
    decoder's saved state between steps, which the decoder-alone loop does not do. Medians of ``cli.rounds``
    alternating rounds over the same batches as the timed rounds."""
    steps = cli.gen_len + 1
    parts = {e.name: [] for e in engines if isinstance(e, FairseqEngine)}
    for r in range(cli.rounds):
        for e in engines:
            if e.name in parts:
                parts[e.name].append(e.parts(batches[r % len(batches)], beam))
    out = {}
    for e in engines:
        total = 1e3 * cli.batch / summary(per[e.name])["median"] / steps
        row = {"all": total}
        if e.name in parts:
            encoder = 1e3 * summary([p[0] for p in parts[e.name]])["median"] / steps
            decoder = 1e3 * summary([p[1] for p in parts[e.name]])["median"] / steps
            row.update(encoder=encoder, decoder=decoder, rest=total - encoder - decoder)
        out[e.name] = row
    log(f"  beam {beam} ms per step: " + ", ".join(f"{n} {v['all']:.2f}" for n, v in out.items()))
    return out


def markdown(report):
    cfg, env = report["config"], report["environment"]
    lines = [f"\n## CPU decoding vs CTranslate2 — {env['date']} — commit {env['commit']}\n",
             f"- machine: {env['cpu']}; torch {env['torch']}, fairseq {env['fairseq']}, ctranslate2 "
             f"{env['ctranslate2'] or 'not installed'}; {env['threads']} threads",
             f"- command: `{env['command']}`; runtime {report['runtime_s']:.0f} s; load average at start/end "
             f"{env['load_average_1min'][0]}/{env['load_average_1min'][1]}; other processes used "
             f"{'n/a' if env['others_cpu_share'] is None else format(env['others_cpu_share'], '.0%')} of the CPU",
             f"- work: {cfg['layers']}L-{cfg['layers']}L, embed {cfg['embed_dim']}, ffn {cfg['ffn_dim']}, "
             f"{cfg['heads']} heads, vocab {cfg['vocab']}; {cfg['rounds']} alternating rounds of "
             f"{cfg['batches_per_round']} batches of {cfg['batch']} sources of {cfg['src_len']} tokens, every "
             f"hypothesis forced to {cfg['gen_len']} tokens + EOS", ""]  # fmt: skip
    for beam, rows in report["rates"].items():
        columns = [(key, head) for key, head in (("vs_ctranslate2_int8_per_round", "× CTranslate2 int8 per round"),
                                                 ("vs_fastest_ctranslate2_int8_per_round",
                                                  "× fastest CTranslate2 int8 per round"))
                   if key in rows.get(REFERENCE, {})]  # fmt: skip
        lines += [f"Beam {beam}:", "",
                  "| engine | sentences/s (median) | own min–max | × stock per round: median [min–max] | "
                  + "".join(f"{head} | " for _, head in columns)
                  + "first batch = stock's tokens |", "|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|"]  # fmt: skip
        for name, r in rows.items():
            s, q = r["sentences_per_s"], r["ratio_per_round"]
            ratio = "1" if name == BASELINE else f"**{q['median']:.2f}** [{q['min']:.2f}–{q['max']:.2f}]"
            same = report["same_tokens_as_stock"].get(name, "–")
            for key, _ in columns:
                c = r[key]
                ratio += " | 1" if (name, key) == (REFERENCE, columns[0][0]) else \
                    f" | {c['median']:.2f} [{c['min']:.2f}–{c['max']:.2f}]"
            lines.append(f"| {name} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | {ratio} | {same} |")
        lines.append("")
        parts = report.get("breakdown_ms_per_step", {}).get(beam)
        if parts:
            lines += [f"Beam {beam}, milliseconds per decoder step (`--breakdown`; rest: the search, ours for our models, "
                      "and the reordering between steps):", "", "| engine | all | encoder | decoder alone | rest |",
                      "|---|---:|---:|---:|---:|"]  # fmt: skip
            for name, r in parts.items():
                cells = [f"{r[k]:.2f}" if k in r else "–" for k in ("all", "encoder", "decoder", "rest")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    noisy = [n for rows in report["rates"].values() for n, r in rows.items()
             if any(x is not None and x >= QUIET for x in r["others_cpu_share_per_round"])]  # fmt: skip
    if noisy:
        lines.append(f"Rounds with other processes using ≥ {QUIET:.0%} of the CPU: {len(noisy)} engine-beam rows "
                     "(ratios under contention measure the machine as much as the engines).\n")  # fmt: skip
    return "\n".join(lines)


def record(text, path):
    from b2t_fairseq.safety import atomic

    path = Path(path)
    before = path.read_text() if path.exists() else ""
    atomic.write_text(path, before + text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ctranslate2-worker"]:
        return ctranslate2_worker(*argv[1:])
    if argv[:1] == ["--ctranslate2-convert"]:
        return ctranslate2_convert(*argv[1:])
    cli = parse_cli(argv)
    report = run(cli)
    text = markdown(report)
    print(text)
    if cli.json:
        from b2t_fairseq.safety import atomic

        atomic.write_text(Path(cli.json), json.dumps(report, indent=2) + "\n")
    if not cli.no_record:
        record(text, cli.results)
        log(f"added to {cli.results}")


if __name__ == "__main__":
    main()
