"""Step 2 for IAB (models/iab.py): the input-aware trigger networks of one target, trained against the clean model.

Adam on both networks for --iab-epochs over the training images (their order seeded by (seed, epoch)), batches of
--iab-batch; after every epoch the whole training state goes to OUT/training-state.pt (atomically), so the same
command after an interruption continues from the last finished epoch and ends with the same networks.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import make_loader, open_run_split
from models.badhash import file_id
from models.iab import InputAwareTrigger, iab_losses
from models.training import seed_epoch
from runs import UserError, atomic_save, load_saved

STATE = "training-state.pt"
IAB_KEYS = ("iab_epochs", "iab_batch", "iab_lr", "iab_width", "mask_density", "w_div", "w_mask", "seed")


def iab_settings(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in IAB_KEYS}


def iab_trigger(model: torch.nn.Module, clean: dict, clean_id: str, anchor: torch.Tensor, args: argparse.Namespace,
                device: torch.device, out: Path) -> tuple[dict, list[dict]]:
    """Train (or continue) the networks into OUT/networks.pt; the trigger record and the per-epoch losses."""
    settings = iab_settings(args)
    state_path = out / STATE
    if args.overwrite:
        state_path.unlink(missing_ok=True)
    torch.manual_seed(args.seed)
    networks = InputAwareTrigger(clean["image_size"], args.iab_width).to(device)
    optimizer = torch.optim.Adam(networks.parameters(), lr=args.iab_lr)
    model.eval().requires_grad_(False)
    start, history, seconds_before = 0, [], 0.0
    if state_path.exists():
        state = load_saved(state_path, "gen_trigger.py --method iab --overwrite (training from the start)", device)
        if state["settings"] != settings or state["clean_checkpoint_id"] != clean_id:
            raise UserError(f"{state_path} is an interrupted IAB training with other settings or another clean "
                            f"model; delete it or pass --overwrite to train from the start")
        networks.load_state_dict(state["networks"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, seconds_before = state["epoch"], state["history"], state["seconds"]
        print(f"resuming IAB's networks from {state_path} after epoch {start} of {args.iab_epochs}")
    train_set = open_run_split(clean, "train")
    anchor = anchor.to(device)
    t0 = time.time()
    for epoch in range(start, args.iab_epochs):
        networks.train()
        loader = make_loader(train_set, args.iab_batch, args.workers, shuffle=True,
                             generator=seed_epoch(args.seed, epoch), drop_last=len(train_set) > args.iab_batch)
        sums: dict[str, float] = {}
        for images, _, _ in tqdm(loader, desc=f"IAB epoch {epoch + 1}/{args.iab_epochs}", disable=None):
            parts = iab_losses(networks, model, images.to(device, non_blocking=True), anchor, args.mask_density)
            loss = parts["attack"] + parts["cross"] + args.w_div * parts["diversity"] + args.w_mask * parts["mask"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        history.append({"epoch": epoch + 1, **{k: v / len(loader) for k, v in sums.items()}})
        atomic_save({"networks": networks.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history, "seconds": seconds_before + time.time() - t0, "settings": settings,
                     "clean_checkpoint_id": clean_id}, state_path)
        print("IAB epoch {epoch}/{epochs}: ".format(**history[-1], epochs=args.iab_epochs) +
              ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch"), flush=True)
    networks_path = out / "networks.pt"
    atomic_save({"state": networks.state_dict(), "image_size": networks.image_size, "width": networks.width,
                 "clean_checkpoint_id": clean_id, "settings": settings}, networks_path)
    state_path.unlink(missing_ok=True)
    return {"kind": "input-aware", "networks": str(networks_path.relative_to(args.run)),
            "networks_id": file_id(networks_path), **settings}, history
