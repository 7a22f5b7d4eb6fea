# The two commands of the README:
#   make demo    set everything up, then run the main job on the embedded default (a generated toy corpus)
#   make test    set everything up, then run the whole test suite (what .ci/run runs)
# Set-up goes into .venv/ at the repo root and is reused once complete.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned because fairseq's compiled extensions link against the torch they were built with,
# and because an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build on this machine's disk.
TORCH  := torch==2.13.0
# fairseq 0.12 with packaging fixes for Python >= 3.11. Installed without its dependencies because it
# requires torchaudio, which fairseq's text code never imports and which does not load beside a CPU torch.
FAIRSEQ := fairseq-fixed==0.12.3.1
# fairseq's remaining dependencies, then ours (setup.py, with its speech extra), then test/plot tools. admin-torch is a test-only
# numerical reference for --connection admin (its only requirement, torch, is already satisfied).
DEPS   := cffi hydra-core==1.3.2 omegaconf==2.3.0 regex tqdm bitarray scikit-learn packaging \
          'sacrebleu>=2.0' sentencepiece sacremoses rouge-score==0.1.2 tensorboardX matplotlib pytest pytest-xdist admin-torch==0.1.0 \
          kaldi-native-fbank soundfile editdistance scipy
# Test-only numerical reference for --connection deepnorm and sub-ln, without its dependencies: it requires
# timm (which pulls torchvision and with it another torch) and fairscale, used only for drop path, activation
# checkpointing and FSDP, none of which the compared layers use (tests/test_methods.py stands in for them).
# x-transformers: test-only reference for --norm-type dyt and derf (DynamicTanh, Derf), without its dependencies'
# own dependencies; what it imports is listed (none of them requires torch).
TEST_NODEPS := torchscale==0.3.0 x-transformers==2.31.10 einops==0.8.2 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 \
          torch-einops-utils==0.2.0

DATA ?=
SRC  ?=
TGT  ?=
WORK ?= $(if $(DATA),demo-out/real,demo-out/toy)
DEMO_CONFIG := $(if $(DATA),configs/demo/real.yaml,configs/demo/toy.yaml)
PKG_SOURCES := setup.py $(shell find b2t_fairseq -name '*.py')

# Benchmark-only: CTranslate2, the reference row of benchmarks/bench_cpu_decoding.py. Without its dependencies (it
# imports numpy and pyyaml, both installed already; none of its requirements is torch); never part of setup or test.
BENCH_NODEPS := ctranslate2==4.8.5

.PHONY: setup demo test clean bench-setup

setup: $(VENV)/.b2t-package $(VENV)/.b2t-espeak

# espeak-ng (Debian's package) speaks the synthetic corpus of the LibriSpeech recipe's tests; where it cannot be
# installed (no root, no apt) those tests skip and say so.
$(VENV)/.b2t-espeak: $(VENV)/.b2t-deps
	command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng; } \
		|| echo "warning: could not install espeak-ng; the LibriSpeech smoke tests will be skipped"
	touch $@

$(VENV)/.b2t-deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH) numpy cython
	$(BIN)/pip install --no-build-isolation --no-deps $(FAIRSEQ)
	$(BIN)/pip install $(DEPS)
	$(BIN)/pip install --no-deps $(TEST_NODEPS)
	touch $@

# A regular (non-editable) install, so that `--user-dir b2t_fairseq` resolves from any working directory
# (fairseq also looks for the user dir next to its own package). Reinstalled whenever a source changes; build/ is
# removed first, or setuptools would install a module that has since moved or gone from its stale copy there.
$(VENV)/.b2t-package: $(VENV)/.b2t-deps $(PKG_SOURCES) README.md
	rm -rf build
	$(BIN)/pip install --no-deps --no-build-isolation --quiet .
	touch $@

demo: setup
	$(BIN)/b2t-pipeline --config $(DEMO_CONFIG) --work-dir $(WORK) \
		$(if $(DATA),--data $(DATA)) $(if $(SRC),--src $(SRC)) $(if $(TGT),--tgt $(TGT))

# Two workers, one per core (each test file on one worker, so a file's fixtures are built once): most tests wait on
# a fairseq process starting (single-threaded imports), which a second worker overlaps.
test: setup
	$(BIN)/python -m pytest tests -q -n 2 --dist loadfile

bench-setup: setup
	$(BIN)/pip install --no-deps $(BENCH_NODEPS)

clean:
	rm -rf demo-out build *.egg-info
