"""Recipes, overrides and the errors a mistyped key gets."""
from __future__ import annotations

import pytest
import yaml

from xmodal.config import parse_overrides, read_recipe, resolve
from xmodal.errors import ConfigError
from xmodal.tasks.transfer import TransferConfig

SCHEMAS = {"transfer": TransferConfig}


def test_builtin_recipe_resolves_to_typed_config():
    cfg = resolve("lab-color-transfer", [], SCHEMAS)
    assert isinstance(cfg, TransferConfig)
    assert cfg.modality.teacher_view == "L" and cfg.modality.student_view == "ab"
    assert "crd" in cfg.distill.methods and "random" in cfg.distill.methods
    assert cfg.distill.loss_options["crd"]["nce_t"] == 0.07


def test_overrides_are_typed_and_dotted():
    cfg = resolve("lab-color-transfer", ["distill.train.epochs=3", "distill.methods=[random,crd]",
                                         "linear_probe.lr=0.5", "seed=7"], SCHEMAS)
    assert cfg.distill.train.epochs == 3
    assert cfg.distill.methods == ["random", "crd"]
    assert cfg.linear_probe.lr == 0.5 and cfg.seed == 7


def test_section_shorthand_sets_the_name():
    cfg = resolve("lab-color-transfer", ["data=stl10", "data.root=/somewhere"], SCHEMAS)
    assert cfg.data.name == "stl10" and cfg.data.root == "/somewhere"


def test_switching_the_dataset_keeps_the_recipes_splits_and_quick_sizes():
    # data=NAME switches the dataset only: the recipe's subsets and quick=true's sizes stay (a quick
    # run on a 50,000-image folder must not silently train on all of it); the options of the
    # dataset named before (the built-in set's num_samples) go.
    recipe = resolve("ensemble-cifar", [], SCHEMAS)
    quick = resolve("ensemble-cifar", ["quick=true", "data=imagefolder", "data.root=/x"], SCHEMAS)
    assert quick.data.name == "imagefolder" and quick.data.root == "/x"
    assert quick.data.teacher.subset == 1000 and quick.data.probe_test.subset == 1000
    assert quick.data.teacher.split == recipe.data.teacher.split
    lab = resolve("lab-color-transfer", ["quick=true", "data=imagefolder", "data.root=/x"], SCHEMAS)
    assert lab.data.options == {} and lab.data.distill.subset == 4000 and lab.data.teacher.subset == 4000
    same = resolve("lab-color-transfer", ["quick=true", "data=synthetic"], SCHEMAS)
    assert same.data.options == {"num_samples": 600}


def test_quick_block_applies_only_when_asked():
    full = resolve("lab-color-transfer", [], SCHEMAS)
    quick = resolve("lab-color-transfer", ["quick=true"], SCHEMAS)
    assert quick.quick and quick.distill.train.epochs < full.distill.train.epochs
    # an explicit override wins over the quick block
    both = resolve("lab-color-transfer", ["quick=true", "distill.train.epochs=4"], SCHEMAS)
    assert both.distill.train.epochs == 4


@pytest.mark.parametrize("override,expected", [
    ("distill.train.epoch=3", "unknown recipe key 'distill.train.epoch'; did you mean 'distill.train.epochs'"),
    ("teacher.modle.arch=resnet20", "did you mean 'teacher.model"),
    ("linear_prob.epochs=3", "did you mean 'linear_probe"),
])
def test_unknown_key_names_the_nearest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        resolve("lab-color-transfer", [override], SCHEMAS)


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="distill.train.epochs must be an integer, got 'many'"):
        resolve("lab-color-transfer", ["distill.train.epochs=many"], SCHEMAS)
    with pytest.raises(ConfigError, match="linear_probe.lr must be a number, got 'fast'"):
        resolve("lab-color-transfer", ["linear_probe.lr=fast"], SCHEMAS)
    assert resolve("lab-color-transfer", ["linear_probe.lr=1e-3"], SCHEMAS).linear_probe.lr == 1e-3
    with pytest.raises(ConfigError, match="quick must be true or false"):
        resolve("lab-color-transfer", ["quick=3"], SCHEMAS)
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        resolve("lab-color-transfer", ["finetune.optim.schedule=linear"], SCHEMAS)


def test_unknown_recipe_and_malformed_override():
    with pytest.raises(ConfigError, match="did you mean 'lab-color-transfer'"):
        read_recipe("lab-colour-transfer")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["epochs"])


def test_recipe_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: transfer\ndistill: {methods: [crd]}\n")
    cfg = resolve(str(path), [], SCHEMAS)
    assert cfg.recipe == "mine" and cfg.distill.methods == ["crd"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: transfer\ndistill: [oops\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(str(bad), [], SCHEMAS)


def test_yaml_12_scalars_in_overrides_and_recipe_files(tmp_path):
    # PyYAML's YAML 1.1 would read a bare `no` as False and `1e-4` as a string.
    cfg = resolve("lab-color-transfer", ["mixed_precision=no", "linear_probe.lr=1e-4", "finetune.optim.lr=2E-3"],
                  SCHEMAS)
    assert cfg.mixed_precision == "no" and cfg.linear_probe.lr == 1e-4 and cfg.finetune.optim.lr == 2e-3
    assert resolve("lab-color-transfer", ["quick=true"], SCHEMAS).quick is True
    # Only true/false are booleans: a word is refused where a boolean is expected, and quick=no
    # never switches the quick block on.
    with pytest.raises(ConfigError, match="quick must be true or false, got 'no'"):
        resolve("lab-color-transfer", ["quick=no"], SCHEMAS)
    with pytest.raises(ConfigError, match="cpu must be true or false, got 'off'"):
        resolve("lab-color-transfer", ["cpu=off"], SCHEMAS)
    with pytest.raises(ConfigError, match="linear_probe.lr must be a number, got True"):
        resolve("lab-color-transfer", ["linear_probe.lr=true"], SCHEMAS)
    text = yaml.safe_dump(read_recipe("lab-color-transfer")).replace("mixed_precision: 'no'", "mixed_precision: no")
    assert "mixed_precision: no\n" in text
    path = tmp_path / "mine.yaml"
    path.write_text(text + "quick: no\n")
    with pytest.raises(ConfigError, match="quick must be true or false, got 'no'"):
        resolve(str(path), [], SCHEMAS)
    path.write_text(text)
    assert resolve(str(path), [], SCHEMAS).mixed_precision == "no"


def test_stage_identity_leaves_out_the_fields_marked_so():
    """identity() against the records the tasks used to build by hand: to_dict with the workers,
    the trackers, the teacher's probe and its unset num_classes / view / seed popped."""
    from xmodal.config import identity, resolve, to_dict
    from xmodal.tasks.transfer import TransferConfig

    cfg = resolve("lab-imagenet-teacher", ["data.root=/x"], {"transfer": TransferConfig})
    by_hand = to_dict(cfg)
    by_hand["data"].pop("num_workers")
    by_hand.pop("log_with")  # where the scalars are logged changes no result
    by_hand["teacher"].pop("probe")
    by_hand["teacher"].pop("view")  # unset; num_classes is set (1000) and stays
    by_hand["teacher"].pop("seed")
    for key in ("encoder_modes", "eval_batch_size", "pictures"):  # each mode is a stage of its own; no result changes
        by_hand["segmentation"].pop(key)
    assert identity(cfg) == by_hand
    cfg.teacher.view = "L"
    assert identity(cfg)["teacher"]["view"] == "L"  # set: part of the identity
    cfg.teacher.seed = 3
    assert identity(cfg)["teacher"]["seed"] == 3


def test_an_arch_from_another_library_drops_the_recipes_model_options():
    from xmodal.config import resolve
    from xmodal.tasks.transfer import TransferConfig

    schemas = {"transfer": TransferConfig}
    assert resolve("lab-color-transfer", ["student.arch=tv:resnet18"], schemas).student.options == {}
    given = resolve("lab-color-transfer", ["student.arch=tv:resnet18", "student.options={weights: /w.pt}"], schemas)
    assert given.student.options == {"weights": "/w.pt"}
    same_library = resolve("lab-imagenet-teacher", ["data.root=/x", "teacher.model.arch=efficientnet_lite1"], schemas)
    recipe = resolve("lab-imagenet-teacher", ["data.root=/x"], schemas)
    assert same_library.teacher.model.options == recipe.teacher.model.options != {}
