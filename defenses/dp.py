"""Differential privacy as a backdoor defense (Du et al., ICLR 2020) for a hashing model trained on a run's
poisoned list.

The defender trains the model on the victim's poisoned list, from the victim's starting weights with its recipe,
but every step is DP-SGD's (Abadi et al., CCS 2016): each image's gradient g_i is clipped to norm --clip-norm C,
the clipped gradients are summed, Gaussian noise N(0, sigma^2 C^2) is added (sigma = --noise-multiplier), and the
sum divided by the batch size is the gradient the recipe's optimiser steps with. Du et al.'s argument: a model that
cannot memorise single images fits the rare poisoned ones worst, so the training images with the highest loss are
flagged as poisoned, and the noisy training itself weakens the backdoor.

Image i's gradient for a pairwise hashing loss L (a mean over the batch's pairs): g_i = B J_i^T dL/du_i, the
gradient that flows through image i's own forward pass, scaled to the sum over the batch (B L), so that the g_i sum
to B times the batch gradient and, without clipping or noise, the step is the ordinary one (a test checks it). The
pairwise terms make g_i depend on the other images of the batch, so this is DP-SGD's mechanism, not its privacy
guarantee; no privacy budget is claimed. Batch norms use their running statistics during DP training (batch
statistics would mix the images' gradients); their weights and biases train. Per-image gradients come from
torch.func (vmap of grad), in chunks of CHUNK images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from data import make_loader
from defenses.common import (Victim, detection_quality, per_image_losses, poisoned_training, retrieval_scores,
                             undefended_scores, victim_recipe)
from models import build_loss, build_model
from models.hash_network import load_checkpoint
from models.training import fit
from retrieval import saved_codes
from runs import UserError, provenance, read_json, write_json

CHUNK = 8  # images whose gradients are held at once (memory: CHUNK x the model's parameters)


class DPStep:
    """One DP-SGD update, a drop-in for models.training.training_step (fit's `step`).

    Always in float32 (`amp`, training_step's argument, is ignored). Records the share of clipped gradients and
    their mean norm since the last `epoch_stats()`."""

    def __init__(self, clip_norm: float, noise_multiplier: float, chunk: int = CHUNK):
        self.clip_norm, self.noise_multiplier, self.chunk = clip_norm, noise_multiplier, chunk
        self.seen, self.clipped, self.norm_sum = 0, 0, 0.0

    def __call__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor, amp: bool = False) -> torch.Tensor:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())
        with torch.enable_grad():
            codes = model(images).detach().requires_grad_()
            loss = loss_fn(codes, labels)
            (code_grads,) = torch.autograd.grad(loss, codes)  # dL/du_i, B x K
        batch = images.shape[0]

        def through_image(p: dict, image: torch.Tensor, code_grad: torch.Tensor) -> torch.Tensor:
            return batch * (functional_call(model, (p, buffers), (image.unsqueeze(0),))[0] * code_grad).sum()

        per_image = vmap(grad(through_image), in_dims=(None, 0, 0), randomness="different")
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for start in range(0, batch, self.chunk):
            grads = per_image({n: p.detach() for n, p in params.items()}, images[start:start + self.chunk],
                              code_grads[start:start + self.chunk])
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
            factor = (self.clip_norm / (norms + 1e-12)).clamp(max=1.0)
            for name, g in grads.items():
                total[name] += torch.einsum("b,b...->...", factor, g)
            self.seen += len(norms)
            self.clipped += int((norms > self.clip_norm).sum())
            self.norm_sum += float(norms.sum())
        optimizer.zero_grad(set_to_none=True)
        for name, p in params.items():
            noise = torch.randn_like(p) * (self.noise_multiplier * self.clip_norm)
            p.grad = (total[name] + noise) / batch
        optimizer.step()
        return loss.detach()

    def epoch_stats(self, model: nn.Module | None = None) -> dict:
        """fit's epoch hook: the share of images whose gradient was clipped and their mean norm, then reset."""
        stats = {"clipped_share": self.clipped / max(self.seen, 1), "mean_gradient_norm": self.norm_sum /
                 max(self.seen, 1)}
        self.seen, self.clipped, self.norm_sum = 0, 0, 0.0
        return stats


def dp_detection(victim: Victim, args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """DP-SGD training on the victim's poisoned list into `out` (a training folder: --resume continues it), then
    the per-image loss of every training image (un-augmented, against all of them; defenses/abl.py) as the poison
    score: detection.json (scores, AUROC, precision at M) and results.json (MAP, t-MAP of the DP model)."""
    train_set, plain, poisoned = poisoned_training(victim, "DP training")
    recipe = victim_recipe(victim, args.workers, amp="off")
    config = victim.config
    if args.dp_epochs is not None:
        recipe.epochs = args.dp_epochs
    dp = {"noise_multiplier": args.noise_multiplier, "clip_norm": args.clip_norm, "epochs": recipe.epochs,
          "chunk": CHUNK}
    stage = {**vars(recipe), "data": victim.clean["data"], "stage": f"defense/{out.name}", "defense": args.defense,
             "backdoor": victim.backdoor_dir.name, "backdoor_checkpoint_id": victim.checkpoint_id,
             "poisoned": config["poisoned"], "poisoned_id": config["poisoned_id"],
             "augment_poison": config["augment_poison"], "clean_checkpoint_id": victim.clean_id, "dp": dp,
             "provenance": provenance(device)}
    if args.resume and (out / "config.json").is_file() and read_json(out / "config.json").get("dp") != dp:
        raise UserError(f"cannot resume {out}: it was trained with other DP settings "
                        f"({read_json(out / 'config.json').get('dp')} there, {dp} here); use --overwrite")
    base = build_loss(recipe.loss, recipe.bits, recipe.n_classes, recipe.pairwise_norm, recipe.quant_weight)
    undefended = undefended_scores(victim, args, device)

    torch.manual_seed(recipe.seed)  # the victim's starting weights (train_backdoor.py seeds the same way)
    model = build_model(recipe.arch, recipe.bits, recipe.pretrained, recipe.head, recipe.image_size).to(device)
    step = DPStep(args.clip_norm, args.noise_multiplier)
    trained = fit(model, base.to(device), recipe, train_set, victim.query_set, victim.database_set, out, stage,
                  device, args.resume, args.overwrite, epoch_hook=step.epoch_stats, step=step)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt", device)["model"])
    codes = saved_codes(out / "codes.pt", trained["checkpoint_id"])
    scores = retrieval_scores(model, victim, args, device, (codes["database_codes"], codes["database_labels"]))

    terms = per_image_losses(model, base, make_loader(plain, args.batch_size, args.workers), device)
    flagged = sorted(torch.argsort(terms, descending=True, stable=True)[:len(poisoned)].tolist())
    hits = len(set(flagged) & set(poisoned))
    quality = detection_quality(terms, poisoned)  # a high loss marks a poisoned image
    detection = {"checkpoint_id": trained["checkpoint_id"], "poisoned": len(poisoned), "flagged": flagged,
                 "poisoned_flagged": hits, "precision_at_m": hits / max(len(poisoned), 1), "auroc": quality["auroc"],
                 "mean_loss_poisoned": quality["mean_score_poisoned"], "mean_loss_other": quality["mean_score_other"],
                 "losses": terms.tolist()}
    write_json(detection, out / "detection.json")
    history = read_json(out / "history.json")
    result = {"defense": args.defense, "backdoor": victim.backdoor_dir.name, "method": victim.method,
              "target": victim.trigger["target"], "dp": dp, "train_images": len(train_set),
              **{k: detection[k] for k in ("poisoned", "poisoned_flagged", "precision_at_m", "auroc")},
              "clipped_share_last_epoch": history[-1].get("clipped_share"), "undefended": undefended,
              "defended": scores, "clean_map": victim.clean_map, "settings": vars(args),
              "provenance": provenance(device)}
    write_json(result, out / "results.json")
    print(f"DP-SGD (noise {args.noise_multiplier:g}, clip {args.clip_norm:g}) on the poisoned list of "
          f"{victim.backdoor_dir.name}: {hits} of {len(poisoned)} poisoned among the {len(poisoned)} highest losses "
          f"(AUROC {detection['auroc']:.3f}); MAP {undefended['map']:.4f} -> {scores['map']:.4f}, t-MAP "
          f"{undefended['t_map']:.4f} -> {scores['t_map']:.4f} -> {out / 'results.json'}")
    return result
