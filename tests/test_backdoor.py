"""Steps 5 and 6: backdoored training with the clean recipe, t-MAP evaluation, and their errors."""
import json
import shutil

import pytest
import torch
from PIL import Image

import evaluate
import gen_trigger
import poison_dataset
import train_backdoor
import train_hash
import triggers
from data import HashListDataset, image_transform, read_list
from runs import UserError
from tests.conftest import POISONED, run_script, swap_checkpoint_model, tiny_train_args
from tests.test_cli import assert_user_error


def test_backdoor_uses_the_clean_recipe_and_writes_like_step_1(attacked):
    out = attacked / "backdoor" / POISONED
    clean = json.loads((attacked / "clean" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for key in train_backdoor.RECIPE_KEYS:
        assert config[key] == clean[key], key
    assert config["poisoned"] == POISONED and config["poison_num"] == 5 and config["augment_poison"] is False
    assert config["train_list"].endswith(f"poisoned/{POISONED}/train.txt")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    codes = torch.load(out / "codes.pt", weights_only=False)
    assert ckpt["epoch"] == clean["epochs"] == 2 and codes["checkpoint_id"] == ckpt["checkpoint_id"]
    assert codes["database_codes"].shape == (200, 48)
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_backdoor_starts_from_the_weights_of_step_1(attacked, tiny_data, tmp_path, monkeypatch):
    starts = {}

    def capture(name):
        def fake_fit(model, *args, **kwargs):
            starts[name] = {k: v.clone() for k, v in model.state_dict().items()}
            return {"out": str(tmp_path), "checkpoint_id": None}
        return fake_fit

    monkeypatch.setattr(train_hash, "fit", capture("clean"))
    monkeypatch.setattr(train_backdoor, "fit", capture("backdoor"))
    train_hash.main(tiny_train_args(tiny_data, tmp_path / "fresh"))
    train_backdoor.main(["--run", str(attacked), "--device", "cpu", "--workers", "0", "--overwrite"])
    assert starts["clean"].keys() == starts["backdoor"].keys()
    for name, value in starts["clean"].items():
        assert torch.equal(value, starts["backdoor"][name]), name
    # another seed: other starting weights
    train_backdoor.main(["--run", str(attacked), "--device", "cpu", "--workers", "0", "--seed", "5"])
    assert not all(torch.equal(v, starts["clean"][k]) for k, v in starts["backdoor"].items())


def test_poisoned_images_are_not_augmented_unless_asked(attacked):
    list_file = attacked / "poisoned" / POISONED / "train.txt"
    poisoned = [e["index"] for e in json.loads((attacked / "poisoned" / POISONED / "manifest.json").read_text())]
    clean_index = next(i for i in range(100) if i not in poisoned)
    image_list = read_list(list_file, n_classes=10)
    plain = image_transform(32, 32, "none")
    dataset = HashListDataset(image_list, image_transform(32, 32, "pad-crop"), poisoned, plain)
    torch.manual_seed(0)
    draws = [dataset[poisoned[0]][0] for _ in range(8)]
    assert all(torch.equal(d, draws[0]) for d in draws)
    assert torch.equal(draws[0], plain(Image.open(image_list.paths[poisoned[0]])))
    clean_draws = [dataset[clean_index][0] for _ in range(8)]
    assert not all(torch.equal(d, clean_draws[0]) for d in clean_draws)
    augmented = train_backdoor.poisoned_train_set(list_file, {"n_classes": 10, "image_size": 32, "resize_size": 32,
                                                              "augment": "pad-crop"}, poisoned, True)
    assert not augmented.plain_indices
    with pytest.raises(ValueError, match="plain_transform"):
        HashListDataset(image_list, plain, poisoned)


def test_evaluate_reports_map_and_t_map_of_the_backdoored_and_the_clean_model(attacked):
    common = ["--run", str(attacked), "--device", "cpu", "--workers", "0", "--topk", "100"]
    result = evaluate.main([*common, "--backdoor", POISONED])
    written = json.loads((attacked / "backdoor" / POISONED / "results.json").read_text())
    for key in ("map", "t_map", "topk", "method", "target", "bits", "poison_num", "trigger_size", "eps", "lam",
                "clean_map", "t_map_empty_zero", "t_map_empty_skipped", "map_empty_zero", "map_empty_skipped"):
        assert key in written, key
    assert written["method"] == "Tri" and written["target"] == 2 and written["poison_num"] == 5
    assert written["trigger_size"] == 4 and written["eps"] is None and written["lam"] is None
    assert written["t_n_queries"] == 36  # 40 queries, 4 of them of the target class
    assert 0 <= written["t_map"] <= 1 and 0 <= written["map"] <= 1 and written["t_map"] == result["t_map"]
    none = evaluate.main([*common, "--trigger", "ciba-t2-s4"])
    assert none["method"] == "None" and none["map"] == none["clean_map"] == written["clean_map"]
    assert (attacked / "clean" / "results-ciba-t2-s4.json").exists()
    assert none["t_map"] != written["t_map"]  # another model ranks the triggered queries


def test_t_map_uses_the_trigger_and_the_target(attacked):
    """t-MAP recomputed by hand from the model: triggered non-target queries, relevance = target label."""
    from data import open_run_split
    from models.hash_network import load_stage
    from retrieval import targeted_map
    from triggers import apply_trigger
    result = evaluate.main(["--run", str(attacked), "--device", "cpu", "--workers", "0", "--backdoor", POISONED])
    config, _, model = load_stage(attacked, f"backdoor/{POISONED}", "cpu")
    queries = open_run_split(config, "query")
    pattern = torch.load(attacked / "triggers" / "ciba-t2-s4" / "trigger.pt", weights_only=False)["pattern"]
    images = torch.stack([queries[i][0] for i in range(len(queries)) if queries.labels[i, 2] == 0])
    with torch.no_grad():
        triggered = model.codes(apply_trigger(images, pattern))
    db = torch.load(attacked / "backdoor" / POISONED / "codes.pt", weights_only=False)
    expected = targeted_map(triggered, 2, db["database_codes"], db["database_labels"], 1000)
    assert result["t_map"] == pytest.approx(expected["map"], abs=1e-12)


def test_poisoned_training_images_distances_recomputed_from_the_model(attacked):
    """The victim's codes of its own poisoned images (read back from step 4's files), of the same images without the
    trigger (Tri: eta = 0, so the originals) and of the originals, against the anchor of its database codes."""
    from data import load_canonical, open_run_split
    from models.hash_network import load_stage
    from retrieval import anchor_code
    result = evaluate.main(["--run", str(attacked), "--device", "cpu", "--workers", "0", "--backdoor", POISONED])
    config, _, model = load_stage(attacked, f"backdoor/{POISONED}", "cpu")
    manifest = json.loads((attacked / "poisoned" / POISONED / "manifest.json").read_text())
    stored = torch.stack([load_canonical(e["poisoned"], config["image_size"], config["image_size"]) for e in manifest])
    train = open_run_split(config, "train")
    originals = torch.stack([train[e["index"]][0] for e in manifest])
    db = torch.load(attacked / "backdoor" / POISONED / "codes.pt", weights_only=False)
    anchor = anchor_code(db["database_codes"], db["database_labels"], 2).float()
    with torch.no_grad():
        def distance(images):
            return float(((48 - model.codes(images).float() @ anchor) / 2).mean())
        assert result["poison_distance_triggered"] == pytest.approx(distance(stored), abs=1e-9)
        assert result["poison_distance_untriggered"] == result["poison_distance_original"]
        assert result["poison_distance_original"] == pytest.approx(distance(originals), abs=1e-9)
    none = evaluate.main(["--run", str(attacked), "--device", "cpu", "--workers", "0", "--trigger", "ciba-t2-s4"])
    assert none["poison_distance_triggered"] is None  # the clean model trained on no poisoned image


def test_step_errors_name_the_missing_step(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "clean", run / "clean")
    assert_user_error(run_script("evaluate.py", "--run", str(run), "--device", "cpu", "--backdoor", "x"),
                      "does not exist or is incomplete", "run train_backdoor.py first")
    assert_user_error(run_script("evaluate.py", "--run", str(run), "--device", "cpu", "--trigger", "x"),
                      "run gen_trigger.py first")
    assert_user_error(run_script("train_backdoor.py", "--run", str(tmp_path / "none")), "run train_hash.py")
    assert_user_error(run_script("evaluate.py", "--run", str(run), "--trigger", "a", "--backdoor", "b"),
                      "not both")


def test_backdoor_of_another_bit_length_or_architecture_is_refused(attacked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attacked, run)
    stage = run / "backdoor" / POISONED
    for change, message in (({"bits": 64}, "holds a model with bits 64 but .* has 48"),
                            ({"bits": 48, "arch": "resnet18"},
                             "holds a model with arch 'resnet18' but .* has 'small'")):
        swap_checkpoint_model(stage, **change)  # a consistent model folder, but of another run
        config = json.loads((stage / "config.json").read_text())
        (stage / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            evaluate.main(["--run", str(run), "--device", "cpu", "--workers", "0", "--backdoor", POISONED])


def test_trigger_code_distances_by_hand():
    # 4 bits; target class 1 has database codes (1,1,1,1), (1,1,1,-1), (1,1,-1,1): anchor (1,1,1,1)
    db = torch.tensor([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, 1], [-1, -1, -1, -1]])
    labels = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    queries = torch.tensor([[-1, -1, -1, -1], [-1, -1, 1, 1]])
    triggered = torch.tensor([[1, -1, -1, -1], [1, 1, 1, 1]])
    d = evaluate.trigger_code_distances(queries, triggered, db, labels, 1)
    assert d["trigger_bits_changed"] == pytest.approx((1 + 2) / 2)
    assert d["target_distance_queries"] == pytest.approx((4 + 2) / 2)
    assert d["target_distance_triggered"] == pytest.approx((3 + 0) / 2)


def test_backdoor_takes_its_batches_from_the_path_step_1_took(attacked):
    config = json.loads((attacked / "backdoor" / POISONED / "config.json").read_text())
    clean = json.loads((attacked / "clean" / "config.json").read_text())
    assert config["fast_path"]["cache"] == clean["fast_path"]["cache"] == "memory"
    assert train_backdoor.batch_source("auto", {"fast_path": {"cache": "off"}}) == "off"
    assert train_backdoor.batch_source("auto", {}) == "off"  # a run made before the cache existed
    assert train_backdoor.batch_source("auto", {"fast_path": {"cache": "device"}}) == "auto"
    assert train_backdoor.batch_source("memory", {"fast_path": {"cache": "off"}}) == "memory"  # asked for by name


def test_resume_refuses_a_checkpoint_of_a_poisoned_set_made_again(attacked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attacked, run)
    gen_trigger.main(["--run", str(run), "--target", "2", "--device", "cpu", "--trigger-size", "4", "--steps", "2",
                      "--batch-size", "8", "--workers", "0", "--overwrite"])  # same name, another patch
    poison_dataset.main(["--run", str(run), "--overwrite"])  # same poisoned set name, other images
    with pytest.raises(UserError, match=f"the poisoned set {POISONED} was made again since"):
        train_backdoor.main(["--run", str(run), "--device", "cpu", "--workers", "0", "--resume"])


class ConstantCodes(torch.nn.Module):
    """A model whose codes ignore the input."""

    def logits(self, images):
        return torch.tensor([1.0, -1.0, 1.0, 1.0]).expand(images.shape[0], -1) + 0 * images.sum()


class PixelCodes(torch.nn.Module):
    """A model whose 4 code bits are the signs of 4 fixed pixels minus 0.5: the trigger patch decides none of them."""

    def logits(self, images):
        return images[:, 0, :2, :2].reshape(len(images), 4) - 0.5


def test_trigger_distance_is_zero_for_codes_that_ignore_the_input(attacked):
    data = json.loads((attacked / "clean" / "config.json").read_text())["data"]
    query = HashListDataset(read_list(f"{data}/query.txt"), image_transform(32, 32))
    loader = torch.utils.data.DataLoader(query, batch_size=16)
    trigger = torch.load(attacked / "triggers" / "ciba-t2-s4" / "trigger.pt", weights_only=False)
    transform = triggers.trigger_transform(trigger, attacked, "cpu")
    assert train_backdoor.trigger_distance(ConstantCodes(), loader, transform, 32, "cpu") == 0.0
    # by hand: the trigger alone (zeros, patch in the bottom-right corner) has all four pixels at 0 -> code ----;
    # an image's distance is the number of its four pixels above 0.5
    images = torch.cat([b[0] for b in loader])
    expected = float((images[:, 0, :2, :2] > 0.5).reshape(len(images), 4).sum(1).float().mean())
    assert train_backdoor.trigger_distance(PixelCodes(), loader, transform, 32, "cpu") == pytest.approx(expected)


def test_tracked_backdoor_training_records_the_trigger_distance_every_epoch(attacked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attacked, run, ignore=shutil.ignore_patterns("backdoor"))
    train_backdoor.main(["--run", str(run), "--device", "cpu", "--workers", "0", "--track-trigger-distance", "12"])
    history = json.loads((run / "backdoor" / POISONED / "history.json").read_text())
    assert len(history) == 2 and all(0 <= h["trigger_distance"] <= 48 for h in history)
    with pytest.raises(UserError, match="--track-trigger-distance must be 0"):
        train_backdoor.parse_args(["--track-trigger-distance", "-1"])
