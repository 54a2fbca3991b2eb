import pytest

from core.training.config import RunConfig


def test_defaults_pick_the_loss_s_own_miner():
    default = RunConfig(dataset="digits")  # supervised contrastive, τ 0.07; the margin draws the categories
    assert (default.loss, default.miner, default.temperature, default.margin) == ("supcon", "in-batch", 0.07, 0.2)
    assert RunConfig(dataset="digits", loss="triplet").miner == "semi-hard"
    assert RunConfig(dataset="digits", loss="contrastive").miner == "all-pairs"
    assert RunConfig(dataset="digits", loss="infonce").miner == "in-batch"


@pytest.mark.parametrize("values,message", [
    ({"loss": "arcface"}, "loss must be one of"),
    ({"loss": "infonce", "miner": "semi-hard"}, "miner 'semi-hard' does not apply to the infonce loss"),
    ({"loss": "triplet", "temperature": 0.3}, "temperature applies to the .*infonce.* loss, not triplet"),
    ({"loss": "contrastive", "options": {"scale": 2}}, "neither the contrastive loss nor the all-pairs miner has a setting scale"),
    ({"epochs": 0}, "epochs must be a whole number from 1"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"batch_size": True}, "batch_size must be a whole number"),
    ({"margin": -0.1}, "margin must be in"),
    ({"loss": "infonce", "temperature": 0}, "temperature must be in"),
    ({"lr": 5}, "learning rate must be in"),
    ({"device": "tpu"}, "device must be one of"),
    ({"encoder": "vit"}, "encoder must be one of"),
    ({"loss": "triplet", "triplet_variant": "squared", "distance": "cosine"},
     "squared variant needs the euclidean distance"),
    ({"loss": "supcon", "triplet_variant": "soft-margin"}, "applies to the triplet loss"),
    ({"samples_per_class": 1}, "samples_per_class must be a whole number"),
    ({"width": 3}, "width must be a whole number from 4 to 512, got 3"),
    ({"width": 10**9}, "got 1000000000"),
    ({"width": 48.0}, "width must be a whole number"),
    ({"width": "48"}, "got '48'"),
])
def test_malformed_values_fail_with_a_sentence(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(dataset="digits", **values)


def test_round_trip_through_a_dict_and_unknown_keys_are_refused():
    cfg = RunConfig(dataset="digits", loss="contrastive", miner="hard-pairs", margin=0.7)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown run settings: colour"):
        RunConfig.from_dict(dict(cfg.to_dict(), colour="red"))


def test_each_objective_s_defaults_come_from_its_registry_entry():
    from core.metric import registry

    for name, spec in registry.objectives().items():
        cfg = RunConfig(dataset="digits", loss=name)
        assert cfg.miner == spec.default_miner
        for setting in spec.settings:
            assert getattr(cfg, setting.name) == setting.default
    # one margin default per objective, wherever a run is made from
    assert RunConfig(dataset="digits", loss="contrastive").margin == 0.5
    assert RunConfig(dataset="digits", loss="triplet").margin == 0.2
    assert RunConfig(dataset="digits", loss="infonce").temperature == 0.1


def test_configs_stored_by_earlier_versions_load_with_today_s_names():
    old = {"dataset": "digits", "loss": "contrastive", "miner": "hard", "margin": 0.5, "temperature": 0.1,
           "distance": "euclidean", "triplet_variant": "standard"}
    cfg = RunConfig.from_dict(old)
    assert (cfg.miner, cfg.temperature, cfg.triplet_variant) == ("hard-pairs", None, None)
    assert RunConfig.from_stored({"dataset": "digits", "miner": "semihard"}).miner == "semi-hard"
    assert RunConfig.from_stored({"dataset": "digits"}).loss == "triplet"  # stored with no loss: the default then
    # the first versions stored InfoNCE's temperature 0.1 on every run: a triplet config with it still loads,
    # whichever objective the registry lists first
    assert RunConfig.from_stored({"dataset": "digits", "loss": "triplet", "temperature": 0.1}).temperature is None
    with pytest.raises(ValueError, match="temperature applies to the .* loss, not triplet"):
        RunConfig(dataset="digits", loss="triplet", temperature=0.3)
    with pytest.raises(ValueError, match=r"supcon loss has no setting memory_size \(a setting of the .*semi-hard"):
        RunConfig(dataset="digits", options={"memory_size": 512})  # a triplet miner's setting with the default loss
    assert RunConfig.from_dict({"dataset": "digits", "loss": "supcon", "miner": "all"}).miner == "in-batch"


def test_the_width_is_the_encoder_s_default_unless_set_and_old_settings_keep_the_width_they_trained_with():
    from models.widths import DEFAULT_WIDTHS, LEGACY_WIDTHS

    assert RunConfig(dataset="digits").width == DEFAULT_WIDTHS[RunConfig(dataset="digits").encoder]
    assert RunConfig(dataset="digits", encoder="small_cnn").width == DEFAULT_WIDTHS["small_cnn"] == 48
    assert RunConfig(dataset="digits", encoder="resnet18").width == DEFAULT_WIDTHS["resnet18"]
    assert RunConfig(dataset="digits", width=24).width == 24
    stored = RunConfig(dataset="digits", encoder="small_cnn").to_dict()
    assert stored["width"] == DEFAULT_WIDTHS["small_cnn"]  # stored as a number: a later default never changes it
    assert RunConfig.from_stored(stored) == RunConfig(dataset="digits", encoder="small_cnn")
    before = {key: value for key, value in stored.items() if key not in ("width", "augment")}  # stored before the setting
    assert RunConfig.from_stored(before).width == LEGACY_WIDTHS["small_cnn"] == 32
    assert RunConfig.from_stored(dict(before, encoder="resnet18")).width == 64
    assert RunConfig.from_dict(before).width == DEFAULT_WIDTHS["small_cnn"]  # new settings from a person: today's


def test_the_augmentation_is_flips_and_erasing_unless_set_or_on_digits_and_old_settings_trained_without():
    from models.widths import mirror_averaged

    cfg = RunConfig(dataset="fashion-mnist")
    assert (cfg.encoder, cfg.augment) == ("vgg_grid", "flip+erase")
    assert RunConfig(dataset="my uploaded photos").augment == "flip+erase"
    assert RunConfig(dataset="digits").augment == "none"  # a mirrored digit is another glyph
    assert RunConfig(dataset="digits", augment="erase").augment == "erase"  # unless a person asks
    assert mirror_averaged(cfg.augment) and mirror_averaged("flip") and not mirror_averaged("erase")
    assert not mirror_averaged("none") and not mirror_averaged(None) and not mirror_averaged(["flip"])
    stored = cfg.to_dict()
    assert stored["augment"] == "flip+erase"  # stored as the name: a later default never changes it
    assert RunConfig.from_stored(stored) == cfg
    before = {key: value for key, value in stored.items() if key != "augment"}  # a run stored before the setting
    assert RunConfig.from_stored(before).augment == "none"
    assert RunConfig.from_dict(before).augment == "flip+erase"  # new settings from a person: today's
    for bad in ("crop", "", 3, ["flip"], "erase+flip", "FLIP"):
        with pytest.raises(ValueError, match="augment must be one of: none, flip, erase, flip\\+erase"):
            RunConfig(dataset="fashion-mnist", augment=bad)


def test_settings_shown_for_a_run_stored_before_the_augment_setting_say_it_trained_without():
    from core.training.config import flat_settings

    old = {"dataset": "digits", "encoder": "small_cnn", "embedding_dim": 64, "width": 32, "samples_per_class": 4,
           "precision": "fp32"}
    assert list(flat_settings(old)) == ["dataset", "encoder", "embedding_dim", "width", "samples_per_class", "augment",
                                        "precision"]
    assert flat_settings(old)["augment"] == "none"
    assert flat_settings(RunConfig(dataset="digits", augment="erase").to_dict())["augment"] == "erase"
    loaded = {"source_run": 3, "encoder": {"encoder": "small_cnn", "embedding_dim": 128, "samples_per_class": 4}}
    assert flat_settings(loaded)["encoder.augment"] == "none"


def test_settings_shown_for_a_run_stored_before_the_width_setting_name_the_width_it_trained_with():
    from core.training.config import flat_settings

    old = {"dataset": "digits", "encoder": "small_cnn", "embedding_dim": 64, "loss": "triplet"}
    assert list(flat_settings(old).items()) == [("dataset", "digits"), ("encoder", "small_cnn"), ("embedding_dim", 64),
                                                ("width", 32), ("loss", "triplet")]
    today = RunConfig(dataset="digits", width=24).to_dict()
    assert flat_settings(today)["width"] == 24
    # an embedding run's config holds its checkpoint's training settings under "encoder"
    loaded = {"source_run": 3, "encoder": {"encoder": "resnet18", "embedding_dim": 128}}
    assert flat_settings(loaded)["encoder.width"] == 64


def test_setting_text_shows_whole_floats_as_typed():
    from core.training.config import setting_text

    assert setting_text(256.0) == "256"  # the Train form's number field stores the memory as a float
    assert setting_text(256) == "256"
    assert setting_text(0.003) == "0.003"
    assert setting_text(None) == "—"
    assert setting_text(True) == "True"
    assert setting_text(float("inf")) == "inf"
