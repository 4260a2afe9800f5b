"""The bad-input list of the reliability issue, one row each: a clear message naming the file, line or value, exit
status 2, and no output created or changed.

Every row works on its own copy of the tiny data and of a finished tiny attack (clean model, trigger, Tri
perturbations, poisoned set, backdoored model), damages it, takes a snapshot of every file (bytes and modification
time), runs the script as the shell would (through cli_entry), and compares the snapshot afterwards.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import gen_confusing
import gen_trigger
import poison_dataset
import train_backdoor
import train_hash
from runs import cli_entry
from tests.conftest import POISONED, swap_checkpoint_model, tiny_train_args

SCRIPTS = {"train_hash": train_hash, "gen_trigger": gen_trigger, "gen_confusing": gen_confusing,
           "poison_dataset": poison_dataset, "train_backdoor": train_backdoor, "evaluate": evaluate}


def edit_lines(path: Path, change) -> None:
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_line(index: int, text):
    def change(lines):
        lines[index] = text(lines[index])
    return change


def flip_weight_bytes(w: Path) -> None:
    """Damage a checkpoint the way a bad disk or copy would: bytes inside the weights change, the file still loads."""
    path = w / "run" / "clean" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name].view(-1)[:4] += 1.0
    torch.save(ckpt, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


TRAIN = "train_hash", lambda w: tiny_train_args(w / "data", w / "new", "--epochs", "1")
CLEAN_RUN = ["--run", "{run}", "--device", "cpu", "--workers", "0"]
PERT = ["--run", "{run}", "--device", "cpu", "--target", "2", "--pert", "none"]

# (id, damage, script, argv, what the one error line must contain)
ROWS = [
    # list files
    ("missing image", lambda w: edit_lines(w / "data" / "train.txt", replace_line(6, lambda l: "images/gone.png " +
                                                                                   l.split(" ", 1)[1])),
     *TRAIN, ["train.txt:7: image not found", "gone.png"]),
    ("unreadable image", lambda w: (w / "data" / (w / "data" / "train.txt").read_text().splitlines()[3].split()[0])
     .write_bytes(b"\x89PNG but then garbage"), *TRAIN, ["train.txt:4: cannot read image"]),
    ("wrong label width", lambda w: edit_lines(w / "data" / "query.txt", replace_line(2, lambda l: l + " 0")),
     *TRAIN, ["query.txt:3: label vector has 11 values, expected 10"]),
    ("duplicate path", lambda w: edit_lines(w / "data" / "train.txt", lambda lines: lines.append(lines[4])),
     *TRAIN, ["train.txt:101:", "already listed on line 5"]),
    ("empty list", lambda w: (w / "data" / "database.txt").write_text(""), *TRAIN,
     ["database.txt: the list is empty"]),
    ("class absent from a split",
     lambda w: edit_lines(w / "data" / "database.txt",
                          lambda lines: lines.__setitem__(slice(None), [l for l in lines if l.split()[4] != "1"])),
     *TRAIN, ["database.txt: no image carries class(es) 3 of the 10"]),
    ("poisoned list naming a deleted image",
     lambda w: (shutil.rmtree(w / "run" / "backdoor"),
                edit_lines(w / "run" / "poisoned" / POISONED / "train.txt",
                           replace_line(0, lambda l: str(w / "deleted.png") + " " + l.split(" ", 1)[1]))),
     "train_backdoor", lambda w: ["--run", str(w / "run"), "--device", "cpu", "--workers", "0"],
     ["train.txt:1: image not found", "deleted.png"]),
    # run directories: a step before the step it needs
    ("trigger before step 1", lambda w: shutil.rmtree(w / "run" / "clean"), "gen_trigger",
     lambda w: ["--run", str(w / "run"), "--device", "cpu", "--target", "2"], ["run train_hash.py"]),
    ("perturbations before step 1", lambda w: shutil.rmtree(w / "run" / "clean"), "gen_confusing",
     lambda w: [a.format(run=w / "run") for a in PERT], ["run train_hash.py"]),
    ("poisoning before step 2", lambda w: shutil.rmtree(w / "run" / "triggers"), "poison_dataset",
     lambda w: ["--run", str(w / "run")], ["holds nothing yet; run gen_trigger.py first"]),
    ("backdoor before step 4", lambda w: shutil.rmtree(w / "run" / "poisoned"), "train_backdoor",
     lambda w: [a.format(run=w / "run") for a in CLEAN_RUN], ["holds nothing yet; run poison_dataset.py first"]),
    ("evaluation before step 5", lambda w: shutil.rmtree(w / "run" / "backdoor"), "evaluate",
     lambda w: [*[a.format(run=w / "run") for a in CLEAN_RUN], "--backdoor", POISONED],
     ["run train_backdoor.py first"]),
    # run directories: settings that contradict the run
    ("resume with other bits", None, "train_hash",
     lambda w: tiny_train_args(w / "data", w / "run", "--resume", "--bits", "32"),
     ["cannot resume", "--bits 48 there, 32 here"]),
    ("trigger and perturbations of different targets",
     lambda w: gen_trigger.main(["--run", str(w / "run"), "--target", "3", "--device", "cpu", "--trigger-size", "4",
                                 "--steps", "2", "--batch-size", "8", "--workers", "0"]),
     "poison_dataset", lambda w: ["--run", str(w / "run"), "--trigger", "ciba-t3-s4", "--perturbations",
                                  POISONED.split("__")[1]],
     ["trigger for target 3", "use the same --target in steps 2 and 3"]),
    ("step 3 made against another clean model",
     lambda w: edit_json(w / "run" / "poisoned" / POISONED / "config.json", clean_checkpoint_id="another"),
     "train_backdoor", lambda w: [*[a.format(run=w / "run") for a in CLEAN_RUN], "--resume"],
     ["made from another clean model"]),
    # run directories: a checkpoint that is not the run's
    ("checkpoint of another bit length", lambda w: swap_checkpoint_model(w / "run" / "clean", bits=32), "evaluate",
     lambda w: [a.format(run=w / "run") for a in CLEAN_RUN],
     ["does not hold the model its config.json describes", "bits 32 in checkpoint.pt, 48 in config.json"]),
    ("checkpoint of another architecture", lambda w: swap_checkpoint_model(w / "run" / "clean", arch="resnet18"),
     "gen_trigger",
     lambda w: ["--run", str(w / "run"), "--device", "cpu", "--target", "2", "--trigger-size", "4"],
     ["arch 'resnet18' in checkpoint.pt, 'small' in config.json"]),
    ("checkpoint of another image size", lambda w: swap_checkpoint_model(w / "run" / "clean", image_size=64),
     "poison_dataset",
     lambda w: ["--run", str(w / "run"), "--overwrite"], ["image_size 64 in checkpoint.pt, 32 in config.json"]),
    ("truncated checkpoint", lambda w: truncate(w / "run" / "clean" / "checkpoint.pt"), "evaluate",
     lambda w: [a.format(run=w / "run") for a in CLEAN_RUN], ["checkpoint.pt", "truncated or corrupted"]),
    ("corrupted checkpoint weights", flip_weight_bytes, "evaluate",
     lambda w: [a.format(run=w / "run") for a in CLEAN_RUN], ["do not match the id recorded with them"]),
    ("truncated trigger", lambda w: truncate(w / "run" / "triggers" / "ciba-t2-s4" / "trigger.pt"), "evaluate",
     lambda w: [*[a.format(run=w / "run") for a in CLEAN_RUN], "--trigger", "ciba-t2-s4"],
     ["trigger.pt", "truncated or corrupted", "gen_trigger.py --overwrite"]),
    ("truncated perturbations",
     lambda w: truncate(w / "run" / "perturbations" / POISONED.split("__")[1] / "perturbations.pt"),
     "poison_dataset", lambda w: ["--run", str(w / "run"), "--overwrite"],
     ["perturbations.pt", "truncated or corrupted", "gen_confusing.py --overwrite"]),
    ("unreadable run config", lambda w: (w / "run" / "clean" / "config.json").write_text('{"bits": 48,'),
     "gen_confusing", lambda w: [a.format(run=w / "run") for a in PERT], ["config.json: not valid JSON"]),
    # arguments out of range
    ("eps 0", None, "gen_confusing", lambda w: [*[a.format(run=w / "run") for a in PERT], "--eps", "0"],
     ["--eps 0.0 is outside (0, 1]"]),
    ("eps above 1", None, "gen_confusing", lambda w: [*[a.format(run=w / "run") for a in PERT], "--eps", "1.5"],
     ["--eps 1.5 is outside (0, 1]"]),
    ("lambda above 1", None, "gen_confusing", lambda w: [*[a.format(run=w / "run") for a in PERT], "--lam", "1.2"],
     ["--lam 1.2 is outside [0, 1]"]),
    ("lambda below 0", None, "gen_confusing", lambda w: [*[a.format(run=w / "run") for a in PERT], "--lam", "-0.1"],
     ["--lam -0.1 is outside [0, 1]"]),
    ("trigger larger than the image", None, "gen_trigger",
     lambda w: ["--run", str(w / "run"), "--device", "cpu", "--target", "2", "--trigger-size", "33"],
     ["--trigger-size 33 does not fit a 32x32 image"]),
    ("poison count 0", None, "gen_confusing",
     lambda w: [*[a.format(run=w / "run") for a in PERT], "--poison-num", "0"], ["--poison-num must be at least 1"]),
    ("poison count above the class", None, "gen_confusing",
     lambda w: [*[a.format(run=w / "run") for a in PERT], "--target", "1", "--poison-num", "11"],
     ["has 10 training images of target class 1; --poison-num 11 needs"]),
    ("bits 0", None, "train_hash", lambda w: tiny_train_args(w / "data", w / "new", "--bits", "0"),
     ["--bits must be at least 1, got 0"]),
    ("top-k 0", None, "evaluate", lambda w: [*[a.format(run=w / "run") for a in CLEAN_RUN], "--topk", "0"],
     ["--topk must be at least 1, got 0"]),
]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,damage,script,argv,expected", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_clear_error_and_changes_nothing(name, damage, script, argv, expected, tiny_data, attacked,
                                                          tmp_path, capsys):
    shutil.copytree(tiny_data, tmp_path / "data")
    shutil.copytree(attacked, tmp_path / "run", symlinks=True)
    if damage is not None:
        damage(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(SCRIPTS[script].main, argv(tmp_path))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    for text in expected:
        assert text in errors[0], errors[0]
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before), f"created {sorted(set(after) - set(before))}"
    assert [k for k in before if before[k] != after[k]] == []
