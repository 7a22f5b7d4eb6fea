"""b2t-fairseq: the B2T connection (Takase et al., Findings of ACL 2023) as a fairseq plugin.

Pins, and why:
- fairseq-fixed==0.12.3.1: stock fairseq 0.12.2 does not build on Python >= 3.11; this fork is fairseq
  0.12 with packaging fixes only. We subclass fairseq internals (TransformerEncoderLayerBase and friends),
  so the exact version matters.
- torch is deliberately not listed: fairseq-fixed already requires it, and listing it here would let pip
  pull a multi-GB CUDA build onto machines that have a CPU build. Install torch first (see README).
- sacrebleu>=2.0: our scorer uses the 2.x object API (BLEU().corpus_score, get_signature).
- rouge-score==0.1.2: the Gigaword recipe's ROUGE; pinned because its tokenizer and stemmer define the numbers
  in our tables (0.1.2 has been the release for years).
- tensorboardX (unpinned): fairseq's --tensorboard-logdir writes through torch.utils.tensorboard, which needs the
  full tensorboard package, or else tensorboardX; without either fairseq only warns and logs nothing. tensorboardX
  is the small one (protobuf is its only other requirement).
- the "speech" extra (unpinned), for the LibriSpeech recipe only: kaldi-native-fbank computes the filterbanks
  (torchaudio on the registry is built for an older torch than ours), soundfile reads FLAC, editdistance is what
  fairseq's WER scorer needs, scipy resamples the synthetic test corpus.
"""
from setuptools import find_packages, setup

setup(
    name="b2t-fairseq",
    version="0.1.0",
    description="B2T connection (bottom-to-top residual) Transformers for stock fairseq, as a --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["b2t_fairseq", "b2t_fairseq.*"]),
    install_requires=[
        "fairseq-fixed==0.12.3.1",
        "sacrebleu>=2.0",
        "sentencepiece",
        "sacremoses",
        "rouge-score==0.1.2",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest"],
        "plots": ["matplotlib"],
        "speech": ["kaldi-native-fbank", "soundfile", "editdistance", "scipy"],
    },
    entry_points={
        "console_scripts": [
            "b2t-average-checkpoints=b2t_fairseq.tools.average_checkpoints:cli_main",
            "b2t-score=b2t_fairseq.tools.score:cli_main",
            "b2t-pipeline=b2t_fairseq.tools.pipeline:cli_main",
            "b2t-toy-data=b2t_fairseq.toy.translation:main",
            "b2t-grad-norms=b2t_fairseq.analysis.grad_norms:cli_main",
            "b2t-loss-curves=b2t_fairseq.analysis.loss_curves:cli_main",
        ]
    },
)
