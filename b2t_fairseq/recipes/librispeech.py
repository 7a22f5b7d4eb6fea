"""LibriSpeech speech recognition with speech-to-text Transformers (fairseq's s2t_transformer, B2T's fourth task).

    python -m b2t_fairseq.recipes.librispeech prepare --data LibriSpeech --out data/librispeech
    python -m b2t_fairseq.recipes.librispeech train --method b2t --depth 12 --gpus 8 \\
        --data-bin data/librispeech/data --save-dir ckpt/b2t-12l
    python -m b2t_fairseq.recipes.librispeech evaluate --save-dir ckpt/b2t-12l --data-bin data/librispeech/data \\
        --out results/b2t-12l.json
    python -m b2t_fairseq.recipes.librispeech table --results results/

prepare: FLAC files of the standard layout (SPLIT/SPEAKER/CHAPTER/*.flac + *.trans.txt) -> 80-dim log-mel
filterbanks (kaldi-native-fbank, audio read with soundfile) in one stored zip of .npy per split, TSV manifests,
global CMVN statistics of the training features, a sentencepiece unigram vocabulary of the lower-cased training
transcripts, and config.yaml with CMVN and SpecAugment, as fairseq's speech_to_text task reads them.
train: fairseq-train --task speech_to_text with the configs/librispeech/ settings (frames per update fixed across
GPU counts); only --connection differs between methods. --depth is the number of encoder layers (the decoder
keeps its 6). evaluate: average the last checkpoints, beam search on dev-clean, dev-other, test-clean and
test-other, word error rate of the detokenized hypotheses against the manifest transcripts. table: Markdown.
Every stage skips the work already done (prepare redoes what a changed source feeds) and refuses to mix two runs.
"""
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import unicodedata
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from b2t_fairseq.safety import atomic
from b2t_fairseq.modules.connections import CONNECTIONS
from b2t_fairseq.recipes.common import (  # noqa: F401  (METHODS: for callers, as the other recipes)
    METHODS, PLUGIN_DIR, RESERVED_EXTRA, Recipe, RecipeError, fmt, run_fairseq,
)  # fmt: skip
from b2t_fairseq.tools.pipeline import as_flags

PROG = "librispeech"
SAMPLE_RATE = 16000  # every LibriSpeech file; features of other rates would not be comparable
TSV_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
CONFIG_YAML = "config.yaml"
PREPARED = "prepared.json"
NPY_MAGIC = b"\x93NUMPY"
# fairseq-generate ends its output with this line when --scoring wer is given (fairseq_cli/generate.py)
FAIRSEQ_WER = re.compile(r"^Generate (\S+) with beam=\d+: WER: ([\d.]+)\s*$", re.M)


# ------------------------------------------------------------------ prepare
class Utterance(NamedTuple):
    id: str
    flac: Path
    text: str  # the transcript's words, single-spaced
    speaker: str
    source: str  # TRANSCRIPT:LINE, for messages


def printable_line(path, number, line):
    """Refuse a transcript line holding a character fairseq's manifest cannot carry (its reader splits rows at line
    breaks and columns at tabs, with no escape) or that is not text at all."""
    bad = next((c for c in line if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        name = {"\t": "a tab", "\r": "a carriage return"}.get(bad, f"the control character U+{ord(bad):04X}")
        raise RecipeError(f"{path}:{number}: {name} in the transcript; fairseq's tab-separated manifest cannot hold "
                          "it: replace it with a space")  # fmt: skip


def read_transcript(path):
    """The lines of a transcript file, or one line naming the file (and line) that is not UTF-8 text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); restore the file from the "
                          "LibriSpeech archive or re-encode it as UTF-8") from None  # fmt: skip
    if not text.strip():
        raise RecipeError(f"{path} is empty; restore it from the LibriSpeech archive and rerun")
    return text.split("\n")


def read_split(root, split):
    """([Utterance] of one LibriSpeech split in id order, [files under it that are neither audio nor transcript]).
    Every audio file must have a transcript line and every line its audio file: a chapter that lost its transcript
    would otherwise vanish from the manifests without a word. `prepare` checks that no id repeats."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise RecipeError(f"{directory} does not exist (--data must hold the LibriSpeech splits, e.g. "
                          f"LibriSpeech/{split}/SPEAKER/CHAPTER/*.flac)")  # fmt: skip
    audio, transcripts, ignored = set(), [], []
    files = (Path(parent) / name for parent, _, names in os.walk(directory, followlinks=True) for name in names)
    for path in sorted(files):
        in_chapter = len(path.relative_to(directory).parts) == 3
        if in_chapter and path.name.endswith(".trans.txt"):
            transcripts.append(path)
        elif in_chapter and path.suffix == ".flac":
            audio.add(path)
        else:
            ignored.append(path)
    utterances = []
    for trans in transcripts:
        for number, line in enumerate(read_transcript(trans), 1):
            if not line.strip():
                continue
            printable_line(trans, number, line)
            utt, _, text = line.strip().partition(" ")
            flac = trans.parent / f"{utt}.flac"
            if not text.strip():
                raise RecipeError(f"{trans}:{number}: no transcript after the utterance id {utt}")
            if flac not in audio:
                raise RecipeError(f"{trans}:{number}: {flac} does not exist; restore it from the {split} archive (or "
                                  "delete the line to leave the utterance out)")  # fmt: skip
            utterances.append(Utterance(utt, flac, " ".join(text.split()), utt.split("-")[0], f"{trans}:{number}"))
    untranscribed = sorted(audio - {u.flac for u in utterances})
    if untranscribed:
        flac = untranscribed[0]
        chapter = [t for t in transcripts if t.parent == flac.parent]
        why = (f"has no line in {chapter[0]}" if chapter else
               f"has no transcript: {flac.parent} holds no {flac.parent.parent.name}-{flac.parent.name}.trans.txt")
        raise RecipeError(f"{flac} {why} ({len(untranscribed)} untranscribed .flac files in {split}); restore the "
                          f"transcript from the {split} archive (or delete the audio to leave it out) and rerun")
    if not utterances:
        raise RecipeError(f"{directory} holds no SPEAKER/CHAPTER/*.trans.txt transcripts")
    return sorted(utterances, key=lambda u: u.id), ignored  # stable: a repeated id stays in reading order


def normalize(text):
    """The target text: LibriSpeech transcripts are upper-case words and apostrophes; we lower-case them, as
    fairseq's LibriSpeech example does."""
    return " ".join(text.lower().split())


def fbank(path, num_bins):
    """(frames, num_bins) float32 log-mel filterbank of a 16 kHz mono file: Kaldi's fbank (25 ms windows every
    10 ms, povey window, no dither, so that a rerun writes the same numbers) on samples scaled to 16-bit range,
    as fairseq's own extraction does."""
    import kaldi_native_fbank as knf
    import soundfile as sf

    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise RecipeError(f"{path}: cannot read audio ({e}); restore it from the LibriSpeech archive") from None
    if rate != SAMPLE_RATE or samples.shape[1] != 1:
        raise RecipeError(f"{path}: {rate} Hz, {samples.shape[1]} channel(s); LibriSpeech audio is 16 kHz mono")
    broken = np.flatnonzero(~np.isfinite(samples[:, 0]))
    if len(broken):  # only a float file can hold them (FLAC cannot); the filterbank would be NaN or fail
        raise RecipeError(f"{path}: {len(broken)} NaN or infinite sample(s), the first at "
                          f"{broken[0] / SAMPLE_RATE:.3f} s; restore it from the LibriSpeech archive")  # fmt: skip
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.mel_opts.num_bins = num_bins
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(SAMPLE_RATE, (samples[:, 0] * 32768).tolist())
    computer.input_finished()
    if computer.num_frames_ready == 0:
        raise RecipeError(f"{path}: shorter than one 25 ms frame")
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)]).astype(np.float32)


def _write_features(job):
    utt, flac, path, num_bins = job
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, fbank(flac, num_bins))


def digest(*inputs):
    return hashlib.sha256(json.dumps(inputs, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def audio_listing(root, utterances):
    """{id: [path under --data, bytes, modification time in ns]}: what tells a split's features are still its
    audio's, without reading the audio again."""
    listing = {}
    for u in utterances:
        stat = u.flac.stat()
        listing[u.id] = [u.flac.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns]
    return listing


def _computed_since_audio_changed(npy, flac):
    # st_ctime: unlike the modification time, a copy or an archive extraction cannot set it back
    return npy.is_file() and npy.stat().st_mtime_ns > flac.stat().st_ctime_ns


def extract_split(utterances, listing, features_dir, split, num_bins, workers=1):
    """features_dir/SPLIT.zip: one stored (uncompressed) .npy per utterance, and beside it SPLIT.audio.json, the
    audio ``listing`` it was built from. A zip whose listing differs from the split's audio now is rebuilt, taking
    the features of the audio files that did not change from it. Each feature to compute is written on its own
    first (a rerun continues after the last one written), the zip once all exist; then the loose files go."""
    archive, record, loose = (features_dir / f"{split}{suffix}" for suffix in (".zip", ".audio.json", ""))
    built = json.loads(record.read_text(encoding="utf-8")) if record.is_file() and archive.is_file() else None
    if built != listing:
        keep = {utt for utt, audio in (built or {}).items() if listing.get(utt) == audio}
        if built is not None:
            print(f"{split}: {len(listing) - len(keep)} utterances new or changed, {len(set(built) - set(listing))} "
                  f"gone since {archive} was built; rebuilding it", flush=True)  # fmt: skip
        loose.mkdir(parents=True, exist_ok=True)
        todo = [u for u in utterances
                if u.id not in keep and not _computed_since_audio_changed(loose / f"{u.id}.npy", u.flac)]
        if todo:
            print(f"{split}: filterbanks of {len(todo)} of {len(utterances)} utterances", flush=True)
        jobs = [(u.id, u.flac, loose / f"{u.id}.npy", num_bins) for u in todo]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_features, jobs, chunksize=16):
                    pass
        else:
            for job in jobs:
                _write_features(job)
        with atomic.atomic_path(archive) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z, \
                 (zipfile.ZipFile(archive) if keep else contextlib.nullcontext()) as old:  # fmt: skip
                for u in utterances:  # fixed dates: the same features give the same bytes
                    member = zipfile.ZipInfo(f"{u.id}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    data = old.read(member.filename) if u.id in keep else (loose / member.filename).read_bytes()
                    z.writestr(member, data, compress_type=zipfile.ZIP_STORED)
            record.unlink(missing_ok=True)  # the old listing must not vouch for the new zip if we stop here
        atomic.write_text(record, json.dumps(listing, sort_keys=True) + "\n")
    if loose.is_dir():
        shutil.rmtree(loose)
    return archive


def zip_entries(archive, utterances):
    """{id: (zip:offset:length, frames)} of the .npy members of ``archive``, as fairseq's manifest names them."""
    entries = {}
    with zipfile.ZipFile(archive) as z, open(archive, "rb") as raw:
        for info in z.infolist():
            # the data of a stored member follows its local header: 30 bytes, the name and the extra field
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
            offset = info.header_offset + 30 + int(name_len) + int(extra_len)
            raw.seek(offset)
            header = io.BytesIO(raw.read(min(info.file_size, 4096)))
            if not header.getvalue().startswith(NPY_MAGIC):
                raise RecipeError(f"{archive}: {info.filename} is not a stored .npy; remove {archive} and rerun")
            version = np.lib.format.read_magic(header)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read_header(header)[0]
            entries[info.filename[: -len(".npy")]] = (f"{archive.resolve()}:{offset}:{info.file_size}", shape[0])
    missing = [u.id for u in utterances if u.id not in entries]
    if missing:
        raise RecipeError(f"{archive} lacks {len(missing)} utterances (e.g. {missing[0]}); remove it and rerun")
    return entries


def write_manifest(path, utterances, entries):
    """fairseq's TSV manifest: id, audio (zip:offset:length), n_frames, tgt_text, speaker. Written the way fairseq
    reads it, with neither quotes nor escapes: an escaped quote or backslash would be trained on escaped and scored
    unescaped. (`read_split` refused the tabs and line breaks this cannot hold.)"""
    with atomic.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for u in utterances:
            audio, frames = entries[u.id]
            writer.writerow((u.id, audio, frames, normalize(u.text), u.speaker))


def read_manifest(path):
    """The rows of a manifest as fairseq's speech_to_text task reads them: by its own reader (a private method of
    fairseq 0.12), so that what evaluate scores against is what the model trained on, whatever the text holds."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator

    path = Path(path)
    try:
        rows = SpeechToTextDatasetCreator._load_samples_from_tsv(str(path.parent), path.name[: -len(".tsv")])
    except ValueError:  # fairseq's word for a manifest without rows
        rows = []
    if not rows or set(TSV_COLUMNS) - set(rows[0]):
        raise RecipeError(f"{path} is not a {PROG} manifest (columns {', '.join(TSV_COLUMNS)})")
    return rows


def global_cmvn(manifests, out):
    """Mean and standard deviation of every training frame (float64 sums), as fairseq's GlobalCMVN reads them."""
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    total, squares, count = 0.0, 0.0, 0
    for manifest in manifests:
        for row in read_manifest(manifest):
            x = get_features_or_waveform(row["audio"]).astype(np.float64)
            total, squares, count = total + x.sum(0), squares + (x**2).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-8))
    with atomic.atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, mean=mean.astype(np.float32), std=std.astype(np.float32))
    return out


def train_sentencepiece(texts, prefix, settings):
    """prefix.model (ids: <s> 0, <pad> 1, </s> 2, <unk> 3, as fairseq's dictionary) and fairseq's dictionary
    prefix.txt of its other pieces."""
    import sentencepiece as spm

    model, vocab = Path(f"{prefix}.model"), Path(f"{prefix}.txt")
    scratch = Path(f"{prefix}.partial")
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "text.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(scratch / "text.txt"), model_prefix=str(scratch / "spm"), model_type=settings["model_type"],
        vocab_size=int(settings["vocab_size"]), character_coverage=float(settings.get("character_coverage", 1.0)),
        bos_id=0, pad_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(scratch / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(4, sp.get_piece_size())]
    atomic.write_text(vocab, "".join(f"{p} 1\n" for p in pieces))
    os.replace(scratch / "spm.model", model)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return model, vocab


def data_config(data, spm_model, vocab, cmvn, num_bins, specaugment):
    """config.yaml of fairseq's speech_to_text task: global CMVN for every split, SpecAugment after it in training."""
    import yaml

    config = {
        "input_channels": 1,
        "input_feat_per_channel": num_bins,
        "vocab_filename": vocab.name,
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": str(spm_model.resolve())},
        "global_cmvn": {"stats_npz_path": str(cmvn.resolve())},
        "specaugment": dict(specaugment),
        "transforms": {"*": ["global_cmvn"], "_train": ["global_cmvn", "specaugment"]},
    }
    atomic.write_text(data / CONFIG_YAML, yaml.safe_dump(config, sort_keys=False))


def needs(*modules):
    """One line naming the speech extra when a module the recipe needs is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RecipeError(f"{PROG} needs {', '.join(missing)}: pip install 'b2t-fairseq[speech]' "
                          "(kaldi-native-fbank, soundfile, editdistance)")  # fmt: skip


class Sources:
    """OUT/sources.json: for each output of `prepare`, the digest of the inputs it was made from. An output is
    redone when it is missing or its inputs changed, and so is everything made from it (their inputs include its
    own): a rerun after the corpus changed cannot keep a stale manifest, CMVN or vocabulary, nor redo what did not
    change."""

    def __init__(self, out):
        self.out, self.path = out, out / "sources.json"
        self.digests = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def stale(self, output, inputs, *companions):
        """Whether ``output`` (written together with ``companions``) must be made from ``inputs``."""
        if all(p.is_file() for p in (output, *companions)):
            if self.digests.get(self._key(output)) == inputs:
                return False
            print(f"{output}: made from other sources than the current ones (see {self.path}); redoing it", flush=True)
        return True

    def record(self, output, inputs):
        self.digests[self._key(output)] = inputs
        atomic.write_text(self.path, json.dumps(self.digests, indent=2, sort_keys=True) + "\n")

    def _key(self, output):
        return output.relative_to(self.out).as_posix()


def check_ids_unique(splits):
    """One line naming both transcript lines of an utterance id given twice, in one split or two: the manifest
    would hold it twice (or a test utterance would be trained on)."""
    first = {}
    for utterances in splits.values():
        for u in utterances:
            if u.id in first:
                raise RecipeError(f"{u.source}: utterance {u.id} again (first at {first[u.id]}); an utterance belongs "
                                  "in one transcript line of the corpus: remove one of the two")  # fmt: skip
            first[u.id] = u.source


def prepare(data, out, scale=None, config_dir=None, workers=1):
    needs("kaldi_native_fbank", "soundfile")
    config = load_config(config_dir, scale=scale)["prepare"]
    data, out = Path(data), Path(out)
    train_splits, eval_splits = list(config["train_splits"]), list(config["eval_splits"])
    plan = {"source": str(data.resolve()), "train_splits": train_splits, "eval_splits": eval_splits,
            "num_mel_bins": int(config["num_mel_bins"]), "sentencepiece": config["sentencepiece"],
            "specaugment": config["specaugment"]}  # fmt: skip
    marker = out / "plan.json"
    old = json.loads(marker.read_text()) if marker.is_file() else plan
    if old != plan:
        changed = sorted(k for k in plan if old.get(k) != plan[k])
        raise RecipeError(f"{out} was prepared with other {', '.join(changed)} (see {marker}); use another --out")
    splits, ignored = {}, {}
    for split in train_splits + eval_splits:  # every input checked before anything is written
        splits[split], ignored[split] = read_split(data, split)
    check_ids_unique(splits)
    if not marker.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(marker, json.dumps(plan, indent=2) + "\n")
    ignored = {s: [p.relative_to(data).as_posix() for p in paths] for s, paths in ignored.items() if paths}
    for split, paths in ignored.items():
        print(f"{split}: ignored {len(paths)} files that are neither SPEAKER/CHAPTER/*.flac nor *.trans.txt: "
              f"{', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''} (all listed in {PREPARED})", flush=True)
    data_dir, features, sources = out / "data", out / "fbank80", Sources(out)
    data_dir.mkdir(exist_ok=True)
    features_of = {}
    for split, utterances in splits.items():
        listing = audio_listing(data, utterances)
        archive = extract_split(utterances, listing, features, split, plan["num_mel_bins"], workers)
        features_of[split] = digest(listing)
        manifest = data_dir / f"{split}.tsv"
        inputs = digest(features_of[split], [(u.id, normalize(u.text), u.speaker) for u in utterances])
        if not sources.stale(manifest, inputs):
            print(f"{split}: done ({manifest})", flush=True)
            continue
        write_manifest(manifest, utterances, zip_entries(archive, utterances))
        sources.record(manifest, inputs)
    cmvn = data_dir / "gcmvn.npz"
    inputs = digest([features_of[s] for s in train_splits])
    if sources.stale(cmvn, inputs):
        global_cmvn([data_dir / f"{s}.tsv" for s in train_splits], cmvn)
        sources.record(cmvn, inputs)
    spm_settings = config["sentencepiece"]
    texts = [normalize(u.text) for s in train_splits for u in splits[s]]
    prefix = data_dir / f"spm_{spm_settings['model_type']}{spm_settings['vocab_size']}"
    spm_model, vocab = Path(f"{prefix}.model"), Path(f"{prefix}.txt")
    inputs = digest(texts, spm_settings)
    if sources.stale(spm_model, inputs, vocab):
        train_sentencepiece(texts, prefix, spm_settings)
        sources.record(spm_model, inputs)
    data_config(data_dir, spm_model, vocab, cmvn, plan["num_mel_bins"], config["specaugment"])
    facts = {"prepared_by": f"{PROG} prepare", **plan, "utterances": {s: len(u) for s, u in splits.items()},
             "ignored": ignored, "sentencepiece_model": str(spm_model),
             "config": str(data_dir / CONFIG_YAML)}  # fmt: skip
    atomic.write_text(data_dir / PREPARED, json.dumps(facts, indent=2) + "\n")
    print(f"{data_dir}: " + ", ".join(f"{s} {n}" for s, n in facts["utterances"].items()) + " utterances", flush=True)
    return facts


def cmd_prepare(args, extra):
    if args.workers < 1:
        raise RecipeError(f"--workers must be >= 1, not {args.workers}")
    prepare(args.data, args.out, args.scale, args.config_dir, args.workers)
    return 0


# ------------------------------------------------------------------ data checks
def check_data_dir(data, subsets):
    """A `prepare` output (config.yaml and the subsets' manifests), or one line saying what lacks."""
    data = Path(data)
    if not data.is_dir():
        raise RecipeError(f"data directory {data} does not exist (make it with `{PROG} prepare`: OUT/data)")
    if not (data / CONFIG_YAML).is_file():
        raise RecipeError(f"{data} has no {CONFIG_YAML}; pass the data directory of `{PROG} prepare` (OUT/data)")
    missing = [s for s in subsets if not (data / f"{s}.tsv").is_file()]
    if missing:
        raise RecipeError(f"{data} has no manifest for {', '.join(missing)} ({missing[0]}.tsv); prepare those splits")


# fairseq's batch_by_size (fairseq/data/data_utils.py) drops the last batch of a set when its size is not a multiple
# of --required-batch-size-multiple (default 8), without a word: validation loses up to 7 of its shortest utterances,
# and a set smaller than the multiple all of them (fairseq then stops with "The dataset is empty", advising more
# tokens or more data). Batches are either smaller than the multiple or a multiple of it, so only 1 keeps them all.
BATCH_MULTIPLE = "required-batch-size-multiple"


def complete_batches(flags, where):
    """``flags`` (a config section of fairseq flags) with required-batch-size-multiple 1, or one line refusing
    another value."""
    multiple = flags.get(BATCH_MULTIPLE, 1)
    if str(multiple) != "1":
        raise RecipeError(f"{where} sets {BATCH_MULTIPLE}: {multiple}; fairseq would leave out the last batch of each "
                          f"set whose size is not a multiple of {multiple} (all of a set smaller than it) without a "
                          "word: set it to 1 or remove it")  # fmt: skip
    return {**flags, BATCH_MULTIPLE: 1}


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ------------------------------------------------------------------ evaluate
WER_SETTINGS = {"wer_tokenizer": "13a", "wer_lowercase": True, "wer_remove_punct": True}


def wer_settings():
    return ("WER x 100 = word edits / reference words over the whole set; fairseq's wer scorer (editdistance) with "
            "sacrebleu's 13a tokenizer, lower-cased, punctuation removed; hypotheses = best beam, sentencepiece "
            "removed (fairseq-generate D- lines); references = the lower-cased LibriSpeech transcripts")  # fmt: skip


def word_error_rate(hyps, refs):
    """(WER x 100, word edits, reference words) with fairseq's WerScorer and the settings above."""
    from fairseq.scoring.wer import WerScorer, WerScorerConfig

    if len(hyps) != len(refs):
        raise RecipeError(f"{len(hyps)} hypotheses but {len(refs)} references; the generate output is incomplete")
    scorer = WerScorer(WerScorerConfig(**WER_SETTINGS))
    for hyp, ref in zip(hyps, refs):
        scorer.add_string(ref, hyp)
    return scorer.score(), scorer.distance, scorer.ref_length


def read_detokenized(path, n):
    """The D-<id> hypotheses of a fairseq-generate output, in id order; all ``n`` ids must be there."""
    hyps = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("D-"):
            head, _, rest = line.partition("\t")
            _score, _, text = rest.partition("\t")
            hyps[int(head[2:])] = text
    if sorted(hyps) != list(range(n)):
        raise RecipeError(f"{path} has {len(hyps)} D- lines for {n} utterances; was fairseq-generate interrupted?")
    return [hyps[i] for i in range(n)]


def generate(data, subset, checkpoint, flags, cpu, work):
    """fairseq-generate ``subset`` into WORK/generate-SUBSET.txt (complete or absent)."""
    output = work / f"generate-{subset}.txt"
    with atomic.atomic_path(work / f"generate-{subset}") as scratch:  # a directory: fairseq names the file
        cmd = ["fairseq-generate", data, "--user-dir", PLUGIN_DIR, "--task", "speech_to_text", "--config-yaml",
               CONFIG_YAML, "--path", checkpoint, "--gen-subset", subset, "--results-path", scratch,
               "--scoring", "wer", *as_flags({k.replace("_", "-"): v for k, v in WER_SETTINGS.items()}),
               *as_flags(flags)]  # fmt: skip
        run_fairseq(cmd + (["--cpu"] if cpu else []))
        os.replace(scratch / f"generate-{subset}.txt", output)
    return output


def score_subset(gen_out, manifest, hyp_out):
    """WER of a generate output against the manifest's transcripts, beside fairseq's own number for it."""
    refs = [row["tgt_text"] for row in read_manifest(manifest)]
    hyps = read_detokenized(gen_out, len(refs))
    atomic.write_text(hyp_out, "".join(h + "\n" for h in hyps))
    wer, edits, words = word_error_rate(hyps, refs)
    printed = FAIRSEQ_WER.findall(Path(gen_out).read_text(encoding="utf-8"))
    return {"wer": wer, "edits": edits, "words": words, "n": len(refs),
            "fairseq_wer": float(printed[-1][1]) if printed else None, "hypotheses": str(hyp_out)}  # fmt: skip


class LibriSpeech(Recipe):
    name, doc, depths = PROG, __doc__, (12, 36)
    depth_help = "encoder layers (the decoder has 6)"
    smoke_help = "smoke: tiny model and vocabulary, a few CPU epochs on a small corpus (tests)"
    eval_smoke_help = "smoke: short decoding, fewer checkpoints averaged"
    evaluate_help = "average, decode dev-clean/dev-other/test-clean/test-other, score WER, write one JSON"
    default_max_tokens = "40000 (frames)"
    required = ("prepare", "train", "tokens_per_update", "evaluate")
    result_keys = ("method", "depth", "wer", "wer_settings")
    decoder_layers = 6
    # fairseq 0.12's speech_to_text is an argparse-only task: its hydra config would be the whole namespace
    hydra = False
    reserved = {**RESERVED_EXTRA, "--encoder-layers": "--depth (or the depth's config file)",
                f"--{BATCH_MULTIPLE}": "nothing (the recipe sets 1: above it, fairseq leaves out validation "
                "utterances, all of a set smaller than the multiple)"}  # fmt: skip

    def load_config(self, config_dir=None, depth=None, scale=None):
        config = super().load_config(config_dir, depth, scale)
        config["train"] = complete_batches(config["train"], "the config's train section")
        evaluate = config["evaluate"]
        evaluate["generate"] = complete_batches(evaluate.get("generate") or {}, "the config's evaluate.generate")
        return config

    def check_data(self, data_bin, subsets):
        check_data_dir(data_bin, subsets)

    def check_train_data(self, data_bin, cmd):
        subsets = [s for flag in ("--train-subset", "--valid-subset") for s in (_flag(cmd, flag) or "").split(",") if s]
        check_data_dir(data_bin, subsets)

    def check_row(self, config, method, depth, scale):
        if method in CONNECTIONS and CONNECTIONS[method].init_scales_embeddings:
            raise RecipeError(
                f"--method {method}: its initialisation scales the source token embeddings, which a speech encoder "
                "does not have, so the speech recipe cannot train it; choose another --method"
            )
        train = config["train"]
        if scale is None and int(train.get("encoder-layers", -1)) != int(depth):
            raise RecipeError(f"{depth}l.yaml must set encoder-layers: {depth}, not {train.get('encoder-layers')}")

    def plan_evaluation(self, config, data_bin):
        needs("editdistance")  # fairseq's WER scorer: fail now, not after the decoding
        subsets = list(config["evaluate"]["subsets"])
        check_data_dir(data_bin, subsets)
        return subsets

    def decode_and_score(self, subsets, config, data_bin, checkpoint, cpu, work):
        ev = config["evaluate"]
        per_subset = {}
        for subset in subsets:
            gen_out = generate(data_bin, subset, checkpoint, ev["generate"], cpu, work)
            per_subset[subset] = score_subset(gen_out, data_bin / f"{subset}.tsv", work / f"hyp-{subset}.txt")
            print(f"{subset}: WER {per_subset[subset]['wer']:.2f} over {per_subset[subset]['words']} words", flush=True)
        return {"wer": {s: r["wer"] for s, r in per_subset.items()}, "subsets": per_subset,
                "wer_settings": wer_settings(), "generate": ev["generate"]}  # fmt: skip

    def headline(self, summary):
        return ", ".join(f"{s} {w:.2f}" for s, w in summary["wer"].items()) + " WER"

    def columns(self, config):
        return list(config["evaluate"]["subsets"])

    def result_cells(self, result, config):
        return [fmt(result["wer"].get(s)) for s in self.columns(config)]

    def published_cells(self, row, config):
        wer = row.get("wer") or {}
        return [fmt(wer.get(s)) for s in self.columns(config)]

    def layers(self, depth):
        return f"{depth}L-{self.decoder_layers}L"

    def table_notes(self, results, config):
        return [f"WER (ours): {'; '.join(sorted({r['wer_settings'] for r in results}))}."]

    def add_prepare_parser(self, sub):
        p = sub.add_parser("prepare", help="FLAC + transcripts -> filterbank zips, manifests, CMVN, vocabulary")
        p.add_argument("--data", required=True, type=Path, help="the LibriSpeech directory (train-clean-100/, "
                       "dev-clean/, ... of SPEAKER/CHAPTER/*.flac and *.trans.txt)")  # fmt: skip
        p.add_argument("--out", required=True, type=Path, help="work directory; fairseq's data directory is OUT/data")
        p.add_argument("--workers", type=int, default=1, help="processes computing filterbanks (default: 1)")
        p.add_argument("--scale", choices=("smoke",), help=self.smoke_help)
        p.set_defaults(func=cmd_prepare)


RECIPE = LibriSpeech()
DEFAULT_CONFIG_DIR, DEPTHS = RECIPE.config_dir, RECIPE.depths
load_config, build_train_command, evaluate = RECIPE.load_config, RECIPE.build_train_command, RECIPE.evaluate
load_results, render_table, build_parser, main = RECIPE.load_results, RECIPE.render_table, RECIPE.build_parser, RECIPE.main


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=logging.INFO, stream=sys.stdout, force=True)  # fmt: skip
    sys.exit(main())
