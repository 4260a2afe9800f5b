"""BadHash's networks (Hu et al., ACM MM 2022; docs/method.md), trained for `gen_trigger.py --method badhash`.

LabCLN first (pairs of smoothed and plain label vectors, NT-Xent + MSE + quantisation), then generator and
discriminator against the frozen clean model, each image with a confusing label drawn from the training set's label
vectors. The networks are trained once per run (RUN/triggers/badhash-net-*/) and shared by every target; a target's
trigger is the generator with that target's LabCLN feature. The models live in models/badhash.py; the settings come
from gen_trigger.py's arguments (`args`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import make_loader, open_run_split
from data.images import save_png
from models.badhash import (Discriminator, Generator, LabCLN, build_lpips, file_id, hash_attack_loss, labcln_loss,
                            lsgan_loss)
from models.hash_network import HashModel, binarize
from models.training import seed_epoch
from runs import UserError, atomic_path, atomic_save, load_saved, provenance, read_json, write_json, write_timing
from triggers import quantize, trigger_transform
from triggers.preview import sample_grid, sample_images

GAN_STATE = "training-state.pt"  # BadHash's networks between epochs, deleted once they are trained

BADHASH_KEYS = ("labcln_steps", "labcln_batch", "gen_epochs", "gen_batch", "gen_lr", "gen_width", "w_rec",
                "lpips_weight", "w_hash", "w_gan", "d_every", "seed")


def badhash_settings(args: argparse.Namespace, arch: str) -> dict:
    settings = {k: getattr(args, k) for k in BADHASH_KEYS}
    settings["w_hash"] = default_w_hash(arch) if args.w_hash is None else args.w_hash
    return settings


def badhash_net_name(args: argparse.Namespace, arch: str) -> str:
    """badhash-net-e<epochs>[-nolpips]-<hash of every setting>: other settings, another folder."""
    settings = json.dumps(badhash_settings(args, arch), sort_keys=True)
    return (f"badhash-net-e{args.gen_epochs}" + ("-nolpips" if args.lpips_weight == 0 else "") +
            f"-{hashlib.sha256(settings.encode()).hexdigest()[:8]}")


def badhash_trigger(model: HashModel, clean: dict, clean_id: str, target: int, args: argparse.Namespace,
                    device: torch.device, preview: Path) -> tuple[dict, float]:
    """The trigger of one target: the run's BadHash generator (trained here once, then reused by every target)
    with the target's LabCLN feature; also writes a preview grid for this target. Returns the trigger and the
    seconds spent on the networks (training them, or finding them made)."""
    t0 = time.time()
    net_dir = badhash_networks(model, clean, clean_id, args, device)
    network_seconds = time.time() - t0
    labcln_saved = load_saved(net_dir / "labcln.pt", "gen_trigger.py --method badhash --overwrite")
    if not bool(labcln_saved["label_set"][:, target].any()):
        raise UserError(f"target {target} is unknown to LabCLN in {net_dir}: no label vector it was trained on "
                        f"carries it (it learned the training set's labels); choose another --target")
    labcln = LabCLN(labcln_saved["n_classes"], labcln_saved["bits"])
    labcln.load_state_dict(labcln_saved["state"])
    label = torch.zeros(1, labcln.n_classes)
    label[0, target] = 1
    with torch.no_grad():
        feature, relaxed, _ = labcln.eval()(label)
    trigger = {"kind": "generator", "generator": str((net_dir / "generator.pt").relative_to(args.run)),
               "generator_id": file_id(net_dir / "generator.pt"), "label_feature": feature,
               "labcln_code": binarize(relaxed)[0].tolist()}
    transform = trigger_transform(trigger, args.run, device)
    images = sample_images(open_run_split(clean, "train"), args.seed).to(device)
    save_png(sample_grid(images, transform(images)), preview)
    return trigger, network_seconds


def badhash_networks(model: HashModel, clean: dict, clean_id: str, args: argparse.Namespace,
                     device: torch.device) -> Path:
    """RUN/triggers/badhash-net-*/: LabCLN, generator and discriminator, trained against the clean model, or the
    ones already there when they were made for this model with these settings."""
    net_dir = Path(args.run) / "triggers" / badhash_net_name(args, clean["arch"])
    settings = badhash_settings(args, clean["arch"])
    if (net_dir / "config.json").exists() and not args.overwrite:
        check_badhash_networks(net_dir, clean, clean_id, settings)
        print(f"{net_dir} holds BadHash's networks for this model; reusing them")
        return net_dir
    train_set = open_run_split(clean, "train")
    label_set = torch.unique(train_set.labels, dim=0)
    t0 = time.time()
    state_path = net_dir / GAN_STATE
    if args.overwrite:
        state_path.unlink(missing_ok=True)
    if state_path.exists():  # an interrupted training: LabCLN as it was, the generator from its last epoch
        labcln_saved = load_saved(net_dir / "labcln.pt", "gen_trigger.py --method badhash --overwrite")
        labcln = LabCLN(labcln_saved["n_classes"], labcln_saved["bits"]).to(device)
        labcln.load_state_dict(labcln_saved["state"])
        labcln_history = labcln_saved["history"]
    else:
        labcln, labcln_history = train_labcln(label_set, clean["bits"], args, device)
        atomic_save({"state": labcln.state_dict(), "n_classes": labcln.n_classes, "bits": labcln.bits,
                     "label_set": label_set, "history": labcln_history}, net_dir / "labcln.pt")
    generator, discriminator, history = train_generator(model, labcln.eval(), label_set, train_set,
                                                       clean["image_size"], settings, clean_id, args, device,
                                                       state_path, t0)
    atomic_save({"state": generator.state_dict(), "image_size": generator.image_size, "width": generator.width,
                 "bits": clean["bits"], "n_classes": clean["n_classes"], "clean_checkpoint_id": clean_id},
                net_dir / "generator.pt")
    atomic_save({"state": discriminator.state_dict(), "image_size": generator.image_size, "width": args.gen_width,
                 "n_classes": clean["n_classes"]}, net_dir / "discriminator.pt")
    images = sample_images(train_set, args.seed).to(device)
    picks = torch.arange(len(images)) % len(label_set)
    with torch.no_grad():
        features = labcln(label_set[picks].to(device))[0]
        save_png(sample_grid(images, quantize(generator(images, features))), net_dir / "samples.png")
    plot_losses(history, net_dir / "losses.png")
    resumed = {k: history.pop(k) for k in ("resumed_after_epoch", "seconds_before")}
    write_json({"labcln": labcln_history, **history}, net_dir / "history.json")
    final = {k: float(np.mean(v[-max(1, len(v) // args.gen_epochs):])) for k, v in history.items()  # last epoch
             if k != "d_steps" and v}
    write_timing(net_dir / "config.json", {"seconds": round(resumed["seconds_before"] + time.time() - t0, 2),
                                           "resumed_after_epoch": resumed["resumed_after_epoch"]})
    write_json({**settings, "image_size": clean["image_size"], "bits": clean["bits"], "arch": clean["arch"],
                "n_classes": clean["n_classes"], "clean_checkpoint_id": clean_id, "n_train": len(train_set),
                "labels": label_set.shape[0], "final_losses": final, "provenance": provenance(device)},
               net_dir / "config.json")  # last: marks a complete folder
    state_path.unlink(missing_ok=True)
    return net_dir


def default_w_hash(arch: str) -> float:
    """The public code's hash weight: 5 with VGG-11, 10 with ResNet-50 (and, here, every other backbone)."""
    return 5.0 if arch == "vgg11" else 10.0


def check_badhash_networks(net_dir: Path, clean: dict, clean_id: str, settings: dict) -> None:
    """Networks in a run's folder must fit its clean model (image size, bits, classes) and the settings asked for."""
    saved = load_saved(net_dir / "generator.pt", "gen_trigger.py --method badhash --overwrite")
    for key in ("image_size", "bits", "n_classes"):
        if saved[key] != clean[key]:
            raise UserError(f"{net_dir / 'generator.pt'} is a generator for {key} {saved[key]} but the clean model "
                            f"of {clean.get('run', 'this run')} has {key} {clean[key]}; it belongs to another run: "
                            f"train it again with --overwrite")
    if saved["clean_checkpoint_id"] != clean_id:
        raise UserError(f"{net_dir} was trained against another clean model than the one in the run now; train it "
                        f"again with --overwrite")
    config = read_json(net_dir / "config.json")
    for key, value in settings.items():
        if config.get(key) != value:
            raise UserError(f"{net_dir} was trained with {key} {config.get(key)!r}, not {value!r}; train it again "
                            f"with --overwrite (or ask for the settings it has)")


def train_labcln(label_set: torch.Tensor, bits: int, args: argparse.Namespace,
                 device: torch.device) -> tuple[LabCLN, list[dict]]:
    """LabCLN on batches of label vectors drawn from the training set's label vectors; Adam, learning rate divided
    by 10 at half and at three quarters of the steps (public code)."""
    torch.manual_seed(args.seed)
    net = LabCLN(label_set.shape[1], bits).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.gen_lr, betas=(0.5, 0.999))
    steps = args.labcln_steps
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2, steps * 3 // 4], gamma=0.1)
    rng = torch.Generator().manual_seed(args.seed)
    labels = label_set.to(device)
    values = []
    for _ in tqdm(range(steps), desc="LabCLN", disable=None):
        batch = labels[torch.randint(len(labels), (args.labcln_batch,), generator=rng).to(device)]
        parts = labcln_loss(net, batch)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        schedule.step()
        values.append(torch.stack([v.detach() for v in parts.values()]))
    table = torch.stack(values).cpu().T.tolist()
    history = [dict(zip(parts, row)) for row in zip(*table)]
    print(f"LabCLN: {steps} steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    return net.eval(), history


def train_generator(model: HashModel, labcln: LabCLN, label_set: torch.Tensor, train_set, size: int, settings: dict,
                    clean_id: str, args: argparse.Namespace, device: torch.device, state_path: Path,
                    started: float) -> tuple[Generator, Discriminator, dict]:
    """Generator and discriminator against the frozen clean model; each image gets a confusing label drawn at random
    from the label set. Adam (betas 0.5, 0.999); the learning rate is constant for the first half of the epochs and
    decays linearly to 0 over the second. Returns the networks and the losses per step.

    After every epoch the whole training state goes to `state_path` (atomically); a later call with the same
    settings and clean model continues from it and repeats exactly what the uninterrupted training would have done
    (the data order of every epoch is seeded by (seed, epoch), the confusing labels' generator is saved). The state
    also keeps the seconds spent since `started` (LabCLN included), so the recorded wall time spans every call.
    """
    n_classes = label_set.shape[1]
    torch.manual_seed(args.seed)
    generator = Generator(size, args.gen_width).to(device)
    discriminator = Discriminator(size, n_classes, args.gen_width).to(device)
    perceptual = build_lpips(device) if args.lpips_weight > 0 else None
    model.eval().requires_grad_(False)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.gen_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.gen_lr, betas=betas)
    keep = args.gen_epochs // 2

    def decay(epoch: int) -> float:
        return 1 - max(0, epoch + 1 - keep) / (args.gen_epochs - keep + 1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (opt_g, opt_d)]
    rng = torch.Generator().manual_seed(args.seed + 1)
    names = ("g_loss", "mse", "lpips", "hash", "gan_g")
    history: dict = {**{n: [] for n in names}, "d_loss": [], "d_steps": []}
    start, step, seconds_before = 0, 0, 0.0
    if state_path.exists():
        state = load_saved(state_path, "gen_trigger.py --method badhash --overwrite (training from the start)",
                           device)
        if state["settings"] != settings or state["clean_checkpoint_id"] != clean_id:
            raise UserError(f"{state_path} is an interrupted BadHash training with other settings or another clean "
                            f"model; delete it or pass --overwrite to train from the start")
        for part, saved in zip((generator, discriminator, opt_g, opt_d, *schedules), state["parts"]):
            part.load_state_dict(saved)
        rng.set_state(state["rng"])
        start, step, history = state["epoch"], state["step"], state["history"]
        seconds_before = state.get("seconds", 0.0)  # absent in states of the first version of this file
        print(f"resuming BadHash's networks from {state_path} after epoch {start} of {args.gen_epochs}")
    labels_dev = label_set.to(device)
    with torch.no_grad():
        features, relaxed, _ = labcln(labels_dev)
        label_codes = binarize(relaxed)
    for epoch in range(start, args.gen_epochs):
        loader = make_loader(train_set, args.gen_batch, args.workers, shuffle=True,
                             generator=seed_epoch(args.seed, epoch))
        values, d_values = [], []
        for images, labels, _ in tqdm(loader, desc=f"BadHash epoch {epoch + 1}/{args.gen_epochs}", disable=None):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            pick = torch.randint(len(label_set), (len(images),), generator=rng).to(device)
            fake = generator(images, features[pick])
            if step % args.d_every == 0:
                discriminator.requires_grad_(True)
                d_loss = (lsgan_loss(discriminator(images), labels, True) +
                          lsgan_loss(discriminator(fake.detach()), labels_dev[pick], False)) / 2
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                d_values.append(d_loss.detach())
                history["d_steps"].append(step)
            discriminator.requires_grad_(False)
            gan = lsgan_loss(discriminator(fake), labels_dev[pick], True)
            mse = F.mse_loss(fake, images)
            lp = perceptual(fake, images, normalize=True).mean() if perceptual is not None else mse.new_zeros(())
            hash_term = hash_attack_loss(model(fake), label_codes[pick])
            total = (settings["w_rec"] * (mse + args.lpips_weight * lp) + settings["w_hash"] * hash_term +
                     settings["w_gan"] * gan)
            opt_g.zero_grad()
            total.backward()
            opt_g.step()
            values.append(torch.stack([total.detach(), mse.detach(), lp.detach(), hash_term.detach(), gan.detach()]))
            step += 1
        for schedule in schedules:
            schedule.step()
        epoch_values = torch.stack(values).cpu()
        for name, column in zip(names, epoch_values.T.tolist()):
            history[name].extend(column)
        history["d_loss"].extend(torch.stack(d_values).cpu().tolist() if d_values else [])
        atomic_save({"parts": [p.state_dict() for p in (generator, discriminator, opt_g, opt_d, *schedules)],
                     "rng": rng.get_state(), "epoch": epoch + 1, "step": step, "history": history,
                     "seconds": seconds_before + time.time() - started,
                     "settings": settings, "clean_checkpoint_id": clean_id}, state_path)
        print(f"BadHash epoch {epoch + 1}/{args.gen_epochs}: " +
              ", ".join(f"{n} {v:.4f}" for n, v in zip(names, epoch_values.mean(0).tolist())), flush=True)
    return generator.eval(), discriminator.eval(), {**history, "resumed_after_epoch": start or None,
                                                    "seconds_before": seconds_before}


def plot_losses(history: dict, path: Path) -> None:
    """The generator's loss terms and the discriminator's loss per step (matplotlib, written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    names = [n for n in ("g_loss", "mse", "lpips", "hash", "gan_g") if any(history.get(n, []))]  # lpips 0: left out
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3))
    for axis, name in zip(axes, names):
        axis.plot(history[name], linewidth=0.8)
        axis.set_title(name)
        axis.set_xlabel("step")
    axes[-1].plot(history["d_steps"], history["d_loss"], linewidth=0.8)
    axes[-1].set_title("d_loss")
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
