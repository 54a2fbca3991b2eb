import pytest

from core.config import RunConfig


def test_defaults_pick_the_loss_s_own_miner():
    assert RunConfig(dataset="digits").miner == "semihard"
    assert RunConfig(dataset="digits", loss="contrastive").miner == "all"
    assert RunConfig(dataset="digits", loss="infonce").miner == "all"


@pytest.mark.parametrize("values,message", [
    ({"loss": "arcface"}, "loss must be one of"),
    ({"loss": "infonce", "miner": "semihard"}, "miner 'semihard' does not apply to the infonce loss"),
    ({"epochs": 0}, "epochs must be a whole number from 1"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"batch_size": True}, "batch_size must be a whole number"),
    ({"margin": -0.1}, "margin must be in"),
    ({"temperature": 0}, "temperature must be in"),
    ({"lr": 5}, "learning rate must be in"),
    ({"device": "tpu"}, "device must be one of"),
    ({"encoder": "vit"}, "encoder must be one of"),
    ({"triplet_variant": "squared", "distance": "cosine"}, "squared variant needs the euclidean distance"),
    ({"loss": "supcon", "triplet_variant": "soft-margin"}, "applies to the triplet loss"),
    ({"samples_per_class": 1}, "samples_per_class must be a whole number"),
])
def test_malformed_values_fail_with_a_sentence(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(dataset="digits", **values)


def test_round_trip_through_a_dict_and_unknown_keys_are_refused():
    cfg = RunConfig(dataset="digits", loss="contrastive", miner="hard", margin=0.7)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown run settings: colour"):
        RunConfig.from_dict(dict(cfg.to_dict(), colour="red"))
