"""A small spoken corpus in the LibriSpeech layout, synthesised with espeak-ng: strings of spoken digits.

    python -m b2t_fairseq.toy.speech --out toy-librispeech [--train 240 --eval 20]

Each utterance is three to six digit words ("seven one oh four"), spoken by espeak-ng with one of a few voices,
speeds and pitches, resampled to 16 kHz and stored as FLAC in SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac,
with the upper-case transcripts in SPEAKER-CHAPTER.trans.txt, so `librispeech prepare` reads it like the real
corpus. Nothing is downloaded; the same seed gives the same texts (the audio follows espeak-ng's version).
"""
import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from b2t_fairseq.safety import atomic

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "oh")
# (speaker id, espeak-ng voice, words per minute, pitch): a few "speakers" per split
SPEAKERS = ((101, "en-us", 150, 40), (102, "en", 170, 60), (103, "en-us+m3", 140, 50), (104, "en+f2", 160, 55))
SPLITS = ("train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other")


def espeak():
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng; `make setup` does it)")
    return path


def speak(text, voice, speed, pitch, out_flac):
    """``text`` spoken by espeak-ng into a 16 kHz mono FLAC file."""
    import soundfile as sf
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        cmd = [espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
        subprocess.run(cmd, check=True, capture_output=True)
        samples, rate = sf.read(str(wav), dtype="float32")
    if rate != 16000:
        samples = resample_poly(samples, 16000, rate).astype("float32")
    with atomic.atomic_path(out_flac) as tmp:
        sf.write(str(tmp), samples, 16000, format="FLAC")


def write_corpus(root, n_train=240, n_eval=20, seed=1):
    """Write the corpus under ``root``; returns {split: [(utterance id, text)]}."""
    rng = random.Random(seed)
    root = Path(root)
    corpus = {}
    for split in SPLITS:
        count = n_train if split.startswith("train") else n_eval
        speakers = SPEAKERS[:2] if split.startswith("train") or split.endswith("clean") else SPEAKERS[2:]
        utterances = []
        by_chapter = {}
        for i in range(count):
            speaker, voice, speed, pitch = speakers[i % len(speakers)]
            chapter = 1000 + SPLITS.index(split)
            utt = f"{speaker}-{chapter}-{i:04d}"
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
            directory = root / split / str(speaker) / str(chapter)
            directory.mkdir(parents=True, exist_ok=True)
            flac = directory / f"{utt}.flac"
            if not flac.is_file():
                speak(text, voice, speed + rng.randint(-15, 15), pitch + rng.randint(-10, 10), flac)
            by_chapter.setdefault(directory / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt} {text.upper()}")
            utterances.append((utt, text))
        for trans, lines in by_chapter.items():
            atomic.write_text(trans, "".join(line + "\n" for line in lines))
        corpus[split] = utterances
    return corpus


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m b2t_fairseq.toy.speech", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=int, default=240, help="training utterances (default 240)")
    parser.add_argument("--eval", type=int, default=20, help="utterances of each dev/test split (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        corpus = write_corpus(args.out, args.train, args.eval, args.seed)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"{args.out}: " + ", ".join(f"{s} {len(u)}" for s, u in corpus.items()) + " utterances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
