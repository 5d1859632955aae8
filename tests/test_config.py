import dataclasses
import json

import pytest

from kcls.config import (
    ConfigError,
    ExportConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    from_dict,
    to_json,
    valid_keys,
)


def test_overrides_are_parsed_with_the_field_type():
    recipe = apply_overrides(Recipe(name="r"), [
        "train.frozen_epochs=3", "train.learning_rate=2e-4", "train.jit_compile=false",
        "data.source=folder:/tmp/images", "train.steps_per_epoch=7", "model.weights=none",
        "train.precision=mixed_bfloat16",
    ])
    assert recipe.train.frozen_epochs == 3 and isinstance(recipe.train.frozen_epochs, int)
    assert recipe.train.learning_rate == pytest.approx(2e-4)
    assert recipe.train.jit_compile is False
    assert recipe.data.source == "folder:/tmp/images"
    assert recipe.train.steps_per_epoch == 7
    assert recipe.model.weights is None
    assert recipe.train.precision == "mixed_bfloat16"


def test_overrides_leave_the_input_unchanged_and_keep_other_fields():
    original = Recipe(name="r")
    changed = apply_overrides(original, ["data.batch_size=8"])
    assert original.data.batch_size == 64
    assert changed.data == dataclasses.replace(original.data, batch_size=8)
    assert changed.train == original.train


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as error:
        apply_overrides(Recipe(name="r"), ["train.epochz=1"])
    message = str(error.value)
    assert "'train.epochz'" in message
    assert "train.frozen_epochs" in message and "data.batch_size" in message


def test_unknown_section_is_an_unknown_key():
    with pytest.raises(ConfigError, match="Unknown override key 'optim.lr'"):
        apply_overrides(Recipe(name="r"), ["optim.lr=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.frozen_epochs=three", "expected an integer"),
    ("train.learning_rate=fast", "expected a number"),
    ("train.jit_compile=maybe", "expected a boolean"),
    ("train.precision=fp8", "expected one of auto, float32, mixed_bfloat16, mixed_float16"),
    ("data.augment=wild", "expected one of none, light, randaugment, strong"),
])
def test_bad_value_names_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError) as error:
        apply_overrides(Recipe(name="r"), [override])
    assert override.split("=")[0] in str(error.value)
    assert expected in str(error.value)


@pytest.mark.parametrize("override", [
    "train.frozen_epochs=-1", "data.image_size=4", "data.batch_size=0",
    "data.validation_fraction=1.5", "data.source=s3://bucket", "model.dropout=1",
    "data.cutout=0.95", "data.cutout=nan",
])
def test_values_that_parse_but_are_invalid_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        apply_overrides(Recipe(name="r"), [override])


def test_both_phases_empty_is_rejected():
    with pytest.raises(ConfigError, match="at least one epoch"):
        apply_overrides(Recipe(name="r"), ["train.frozen_epochs=0", "train.unfrozen_epochs=0"])


def test_malformed_override_shows_the_expected_form():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Recipe(name="r"), ["train.frozen_epochs"])


def test_json_round_trip():
    recipe = apply_overrides(Recipe(name="r"), ["train.steps_per_epoch=5", "model.weights=x.h5"])
    assert from_dict(json.loads(to_json(recipe))) == recipe


def test_valid_keys_cover_every_field():
    keys = valid_keys(Recipe(name="r"))
    assert "export.top_k" in keys and "model.backbone" in keys
    assert len(keys) == len(set(keys))


CHOICES = [("train", "optimizer", "adam"), ("data", "augment", "strongg"),
           ("data", "resize", "crop"), ("train", "precision", "fp8"),
           ("train", "strategy", "tpu"), ("train", "class_weights", "auto")]


@pytest.mark.parametrize("section, field, value", CHOICES)
def test_choice_fields_are_checked_by_the_dataclass_and_on_read_back(section, field, value):
    section_type = type(getattr(Recipe(name="r"), section))
    with pytest.raises(ConfigError, match=rf"'{value}' for '{section}.{field}': expected one of"):
        section_type(**{field: value})
    data = json.loads(to_json(Recipe(name="r")))  # what run dirs and exports hold
    data[section][field] = value
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        from_dict(data)


def test_a_recipe_file_with_an_unknown_choice_fails_to_load(tmp_path):
    from kcls.recipes import load_recipe

    path = tmp_path / "typo.py"
    path.write_text('"""A typo."""\n'
                    "from kcls.config import Recipe, TrainConfig\n"
                    "def get_config():\n"
                    "    return Recipe(name='typo', train=TrainConfig(optimizer='adam'))\n")
    with pytest.raises(ConfigError, match="'adam' for 'train.optimizer': expected one of"):
        load_recipe(str(path))


def test_consumers_of_choices_raise_instead_of_falling_through():
    import numpy as np

    from kcls.data.augment import build_augmentation
    from kcls.data.pipeline import prepare_image

    with pytest.raises(ValueError, match="strongg"):
        build_augmentation("strongg")
    with pytest.raises(ValueError, match="crop"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), 16, "crop")


UNSAFE_NAMES = ["../../escaped", "a/b", "a\\b", "..", ".", "", " ", ".hidden", "tab\there",
                "nul\x00", "new\nline"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_names_used_as_folders_must_be_one_safe_path_component(name):
    with pytest.raises(ConfigError, match="export.model_name"):
        ExportConfig(model_name=name)
    with pytest.raises(ConfigError, match="'name'"):
        Recipe(name=name)
    with pytest.raises(ConfigError, match="export.model_name"):
        apply_overrides(Recipe(name="r"), [f"export.model_name={name}"])


def test_safe_names_are_accepted():
    assert Recipe(name="my-recipe_2.1", export=ExportConfig(model_name="ants v2")).model_name \
        == "ants v2"


WRONG_TYPES = [("data", "batch_size", "64", "an integer"),
               ("data", "batch_size", 64.0, "an integer"),
               ("data", "batch_size", True, "an integer"),
               ("train", "learning_rate", "1e-3", "a number"),
               ("train", "ema", 1, "a boolean"),
               ("train", "steps_per_epoch", "7", "an integer or none"),
               ("data", "source", 3, "a string"),
               ("model", "dropout", None, "a number"),
               ("export", "enabled", "yes", "a boolean")]


@pytest.mark.parametrize("section, field, value, expected", WRONG_TYPES)
def test_field_types_are_checked_by_the_dataclass(section, field, value, expected):
    section_type = type(getattr(Recipe(name="r"), section))
    with pytest.raises(ConfigError, match=rf"for '{section}.{field}': expected {expected}"):
        section_type(**{field: value})


def test_ints_are_accepted_for_floats():
    assert TrainConfig(learning_rate=1, label_smoothing=0).learning_rate == 1


def test_a_section_of_the_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="'data'.*DataConfig"):
        Recipe(name="r", data={"batch_size": 64})


def test_a_recipe_file_with_a_wrong_type_names_the_field(tmp_path):
    from kcls.recipes import load_recipe

    path = tmp_path / "typed.py"
    path.write_text("from kcls.config import DataConfig, Recipe\n"
                    "def get_config():\n"
                    "    return Recipe(name='typed', data=DataConfig(batch_size='64'))\n")
    with pytest.raises(ConfigError, match="'64' for 'data.batch_size': expected an integer"):
        load_recipe(str(path))
