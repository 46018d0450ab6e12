"""The live observer of a run (``Reporter``): on the process that writes, it draws what needs the
run's models and data while they exist (``accuracy.png`` at the end; with ``--save-attention``,
``--save-tsne``, ``--save-exemplars``, ``--save-samples`` each phase's pictures) and logs
TensorBoard scalars. ``cilearn.api`` hands it to the engine as its ``Observer``."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..attention import gradcam, teacher_gradcam
from ..evaluate import predict
from ..events import Observer
from ..models.net import eval_mode, freeze
from ..tblog import TensorBoardLog, summary_writer_class
from .figures import accuracy_plot
from .pictures import exemplar_plot, overlay_grid, sample_grid, tsne_figure


def tsne_plot(ctx, phase, data, before: dict | None, per_class: int = 100) -> None:
    # ctx: the run's objects (``cilearn.runner.RunView``: cfg, out, net, memory, augmenter, autocast_dtype, class_names)
    """``--save-tsne``: ``tsne-phase<i>.png`` in the run directory, a t-SNE (scikit-learn) of the
    embeddings of up to ``per_class`` test images of every seen class (light dots) with the
    exemplars in memory (large dots, black edge), as Figure 1 of the Mnemonics paper. With an
    exemplar optimizer, two panels share one t-SNE: the exemplars as selected before this
    phase's optimisation (new classes: the selection rule's, herding by default) and after it."""

    mem = ctx.memory
    seen = (data.test_y < phase.end).nonzero().flatten()
    rng = np.random.RandomState(phase.index)
    keep = [seen[data.test_y[seen] == c] for c in range(phase.end)]
    keep = torch.cat([k[torch.from_numpy(rng.permutation(len(k))[:per_class]).to(k.device)] for k in keep])
    sets = [("exemplars", mem.exemplars)] if before is None else [("selected (before optimisation)", before),
                                                                 (f"{ctx.cfg.memory.optimizer} (optimised)", mem.exemplars)]
    xs, ys, panels = [data.test_x[keep]], [data.test_y[keep]], []
    for name, ex in sets:
        ids = [c for c in sorted(ex) if c < phase.end]
        xs += [ex[c].float() for c in ids]
        ys += [torch.full((len(ex[c]),), c, dtype=torch.long, device=data.test_y.device) for c in ids]
        panels.append((name, sum(len(ex[c]) for c in ids)))
    emb = predict(ctx.net, torch.cat([x.float() for x in xs]), ctx.augmenter, ctx.cfg.train.eval_batch_size,
                  ctx.autocast_dtype)[1].cpu().numpy()                                  # [N, D], one pass
    tsne_figure(emb, torch.cat(ys).cpu().numpy(), len(keep), panels, ctx.class_names[:phase.end],
                ctx.out / f"tsne-phase{phase.index}.png", f"phase {phase.index}: {phase.end} classes, seed {ctx.cfg.seed}")


def attention_figure(run, phase: int, teacher: torch.nn.Module, num_old: int, n: int) -> Path:
    """``--save-attention N``: ``attention-phase<i>.png`` in the run directory, N test images of the
    seen classes (a fixed draw per phase) with the previous phase's model's (the teacher's) and the
    current model's Grad-CAM for b, the teacher's top old class (LwM's Fig. 1; ``overlay_grid``).
    Drawn from the end of phase i-1 and the end of phase i, so a resumed run has no figure for the
    phase it resumed in."""
    data, aug, net = run.data, run.augmenter, run.net
    seen = (data.test_y < run.net.num_classes).nonzero().flatten()
    pick = seen[torch.from_numpy(np.random.RandomState(phase).permutation(len(seen))[:n]).to(seen.device)]
    x, y = data.test_x[pick], data.test_y[pick]
    cam_t, b, _ = teacher_gradcam(teacher, aug.test(x), num_old)
    with eval_mode(net), torch.enable_grad():
        o = net(aug.test(x).requires_grad_(True))
        cam_s = gradcam(o.maps[-1], o.logits, b, create_graph=False, retain_graph=False)
    names = run.class_names
    titles = [f"y={names[int(a)]} b={names[int(c)]}" for a, c in zip(y, b)]
    return overlay_grid(aug.centre(x).cpu(), cam_t, cam_s, run.out / f"attention-phase{phase}.png", titles)   # what the nets saw


def exemplar_figure(ctx, phase, originals: dict) -> Path:
    # ctx: as tsne_plot's
    """``--save-exemplars N``: ``compressed-phase<i>.png`` in the run directory. Top rows: up to N
    of this phase's new exemplars (taken in turn from each new class, selection order), as selected
    (box of the compressor drawn in red) and as stored (decoded); bottom: exemplars per class in
    memory against the uncompressed baseline's (the budget share in whole images)."""
    mem, n = ctx.memory, ctx.cfg.report.save_exemplars
    picks = []                                        # (class, index within the class)
    depth = max((len(v) for v in originals.values()), default=0)
    for i in range(depth):
        picks += [(c, i) for c in sorted(originals) if i < len(originals[c])]
    picks = picks[:n]
    orig = [originals[c][i] for c, i in picks]
    stored = [mem.exemplars[c][i] for c, i in picks]
    boxes = [mem.codes[c].boxes[i].tolist() if c in mem.codes and mem.codes[c].with_boxes else None for c, i in picks]
    counts = [len(mem.exemplars.get(c, ())) for c in range(phase.end)]
    path = ctx.out / f"compressed-phase{phase.index}.png"
    name = ctx.cfg.memory.compressor
    exemplar_plot(orig, stored, boxes, [ctx.class_names[c] for c, _ in picks], counts, mem.budget.share(phase.seen),
                  ctx.class_names[:phase.end], path,
                  f"phase {phase.index}: compressor {name}, {len(mem)} exemplars, {mem.nbytes} bytes")
    return path


class Reporter(Observer):
    """The figures and TensorBoard scalars of one run, drawn from its events (``cilearn.events``)
    on the process that writes: ``accuracy.png`` when the run completes; with ``--save-exemplars``,
    ``--save-tsne``, ``--save-attention``, ``--save-samples`` the pictures of each phase; with
    ``--tensorboard`` the scalars (``cilearn.tblog``)."""

    def __init__(self) -> None:
        self.run = None
        self.tb = None
        self.previous = None          # --save-attention: the model of the previous phase (frozen), its classes

    @staticmethod
    def check(cfg) -> None:
        """Before the run writes anything: what the reporting options need is installed."""
        if cfg.report.tensorboard:
            summary_writer_class()                 # a ConfigError naming the package when it is missing

    def on_start(self, run) -> None:
        self.run = run
        if run.cfg.report.tensorboard:
            self.tb = TensorBoardLog(run.out, run.cfg.train.base_epochs or run.cfg.train.epochs or 0)

    def on_epoch(self, phase, stage, epoch, epochs, scalars) -> None:
        if self.tb is not None:
            self.tb.on_epoch(phase, stage, epoch, epochs, scalars)

    def on_phase(self, row) -> None:
        if self.tb is not None:
            self.tb.on_phase(row)
        n = self.run.cfg.report.save_attention
        if n > 0:
            if self.previous is not None:
                attention_figure(self.run, row["phase"], *self.previous, n)
            self.previous = (freeze(copy.deepcopy(self.run.net)), row["classes_seen"])

    def on_memory(self, phase, originals, selected) -> None:
        rep = self.run.cfg.report
        if rep.save_exemplars:
            exemplar_figure(self.run, phase, originals)
        if rep.save_tsne:
            tsne_plot(self.run, phase, self.run.data, selected)

    def wants(self, kind: str) -> int:
        rep = self.run.cfg.report if self.run is not None else None
        return rep.save_samples if rep is not None and kind == "samples" else 0

    def on_images(self, kind, phase, data) -> None:
        if kind == "samples":
            sample_grid(data["images"], data["rows"], data["cols"], data["labels"],
                        self.run.out / f"samples-phase{phase}.png")

    def on_complete(self, out, metrics) -> None:
        accuracy_plot(metrics, out / "accuracy.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


