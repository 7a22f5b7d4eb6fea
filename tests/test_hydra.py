"""fairseq-hydra-train configs generated from the recipes (issue 10): the shipped files are what the generator makes
of today's recipe YAML, and a generated row trains exactly as the argparse command it came from."""
import argparse

import pytest
import torch

from conftest import REPO, run
from b2t_fairseq.recipes import catalog


def test_shipped_configs_are_generated_from_the_recipe_configs(tmp_path):
    catalog.main(["--out", str(tmp_path)])
    shipped = REPO / "configs" / "hydra"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    assert fresh == sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml"))
    assert len(fresh) == 7  # WMT 6/18/100L, Gigaword 6/18L, WikiText-103 16/32L
    for rel in fresh:
        assert (shipped / rel).read_text() == (tmp_path / rel).read_text(), (
            f"configs/hydra/{rel} is stale: run python -m b2t_fairseq.recipes.catalog"
        )


def test_a_shipped_config_names_the_row_and_leaves_paths_to_the_user():
    import yaml

    config = yaml.safe_load((REPO / "configs" / "hydra" / "wmt_en_de" / "18l.yaml").read_text())
    assert config["model"]["_name"] == "transformer_b2t_wmt_en_de_18l" and config["model"]["connection"] == "b2t"
    assert (config["model"]["encoder_layers"], config["model"]["dropout"], config["model"]["sampling_method"]) == (
        18, 0.5, "worddrop")  # fmt: skip
    assert config["optimization"]["update_freq"] == [16]  # 8 GPUs x 3584 tokens x 16 = the paper's batch
    assert config["task"]["data"] == config["checkpoint"]["save_dir"] == "???"
    assert config["common"]["user_dir"] == "b2t_fairseq"
    assert "lr" not in config["optimizer"]  # fairseq fills it from optimization.lr; freezing it would detach it


def _plain(node):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return vars(node) if isinstance(node, argparse.Namespace) else node


# set by fairseq's transformer build_model from --share-all-embeddings on the argparse Namespace it is given; the
# hydra path builds from a copy, so only the argparse run records it (the built models are the same: see weights)
DERIVED_BY_BUILD = {"share_decoder_input_output_embed"}


@pytest.fixture(scope="module")
def lm_data_bin(toy_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "data-bin"
    run("fairseq-preprocess", "--only-source", "--trainpref", toy_corpus["raw"] / "train.tgt", "--validpref",
        toy_corpus["raw"] / "valid.tgt", "--destdir", out, "--workers", 1)  # fmt: skip
    return out


# the translation model is registered without a dataclass, the language model with one (fairseq-hydra-train then
# fills the dataclass defaults before the architecture runs: the config must carry the architecture's values)
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wmt_en_de", "wikitext103"])
def test_hydra_and_argparse_train_the_same_row(toy_corpus, lm_data_bin, tmp_path, recipe):
    import importlib

    from b2t_fairseq.compat.checkpoints import load_checkpoint

    main = importlib.import_module(f"b2t_fairseq.recipes.{recipe}").main
    depth, data_bin = ("6", toy_corpus["data_bin"]) if recipe == "wmt_en_de" else ("16", lm_data_bin)
    row = ["train", "--method", "b2t", "--depth", depth, "--scale", "smoke", "--data-bin", str(data_bin)]
    extra = ["--", "--dropout", "0", "--max-update", "4"]
    assert main([*row, "--save-dir", str(tmp_path / "argparse"), *extra]) == 0
    config = tmp_path / "cfg" / "row.yaml"
    assert main([*row, "--save-dir", str(tmp_path / "hydra"), "--hydra-config", str(config), *extra]) == 0
    assert not list((tmp_path / "hydra").glob("*.pt"))  # writing the config trains nothing
    run("fairseq-hydra-train", "--config-dir", config.parent, "--config-name", "row", cwd=tmp_path)
    if recipe == "wmt_en_de":  # launched again from another directory, it resumes where it is (issue 19)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        again = run("fairseq-hydra-train", "--config-dir", config.parent, "--config-name", "row", cwd=elsewhere)
        assert f"Loaded checkpoint {tmp_path / 'hydra' / 'checkpoint_last.pt'}" in again.stdout + again.stderr
        assert not (elsewhere / "outputs").exists() and not (tmp_path / "outputs").exists()

    a = load_checkpoint(tmp_path / "argparse" / "checkpoint_last.pt")
    h = load_checkpoint(tmp_path / "hydra" / "checkpoint_last.pt")
    for section in h["cfg"]:
        if section in ("model", "job_logging_cfg"):
            continue
        got, expected = _plain(h["cfg"][section]), _plain(a["cfg"][section])
        if section == "checkpoint":
            assert (got.pop("save_dir"), expected.pop("save_dir")) == (str(tmp_path / "hydra"), str(tmp_path / "argparse"))
        assert got == expected, section
    model_h, model_a = _plain(h["cfg"]["model"]), _plain(a["cfg"]["model"])
    assert model_h["connection"] == "b2t" and model_h["init_scaling"] == "depth" and model_h["decoder_layers"] == 2
    assert {k: v for k, v in model_h.items() if k not in DERIVED_BY_BUILD} == {
        k: model_a[k] for k in model_h if k not in DERIVED_BY_BUILD
    }
    assert a["optimizer_history"][-1]["num_updates"] == h["optimizer_history"][-1]["num_updates"] == 4
    assert a["model"].keys() == h["model"].keys()
    for name, weight in a["model"].items():  # the recipe's argparse run may use other thread counts: float rounding
        if not name.endswith("._float_tensor"):  # fairseq's uninitialised one-element placeholder buffer
            torch.testing.assert_close(h["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_changing_the_method_on_the_hydra_command_line_brings_its_own_init():
    """A shipped config leaves what --connection decides (init, pre-norm) unresolved, so model.connection=pre-ln
    gets Pre-LN's own settings, as --method pre-ln would."""
    import yaml

    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import OmegaConf, open_dict

    model = yaml.safe_load((REPO / "configs" / "hydra" / "wmt_en_de" / "18l.yaml").read_text())["model"]
    assert model["init_scaling"] == "auto" and "encoder_normalize_before" not in model
    cfg = OmegaConf.create({**model, "connection": "pre-ln"})
    with open_dict(cfg):
        ARCH_CONFIG_REGISTRY[model["_name"]](cfg)
    assert (cfg.init_scaling, cfg.encoder_normalize_before, cfg.decoder_normalize_before) == ("none", True, True)
